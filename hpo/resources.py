"""How much memory a trial needs, and whether the device has it.

Before anything runs, `check_fits` sizes the search space's largest corner (the most layers,
the widest layers, the largest batch, the optimizer with the most state) against the memory
free on the training device, and refuses a spec whose largest model cannot fit, with the
numbers. A spec that sets `training.max_params` or `training.memory_limit` opts into searching
such a space anyway: each configuration past the limit fails as a trial, with the reason,
before it is built (`too_large`).

The estimate is an upper bound made of plain arithmetic on float32 tensors, so it is cheap and
needs no model:
- weights, their gradients, the optimizer's state and the copy of the best epoch's weights;
- activations kept for the backward pass at the batch size, and one evaluation batch;
- the train, validation and test tensors, once per process that holds them;
- Python's own objects for each layer (in the host's memory, counted on every device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hpo.config import Spec
from hpo.distributions import Distribution, largest
from hpo.params import PARAMS, TrialConfig
from hpo.train import EVAL_BATCH

FLOAT = 4  # bytes per float32
# Tensors per hidden unit and row the backward pass keeps: the linear output, batch norm's
# output, the activation's output, dropout's output and mask, and one gradient in flight.
SAVED_PER_UNIT = 6
HOST_BYTES_PER_LAYER = 16 * 1024  # Python objects of a hidden block (Linear, norm, activation)
# Optimizer state in copies of the weights (sgd and rmsprop keep one more with momentum).
OPTIMIZER_STATE = {"sgd": 1, "adam": 2, "adamw": 2, "nadam": 2, "rmsprop": 2, "adagrad": 1}
# Copies of the weights besides the state: the weights, gradients and the best epoch's copy.
WEIGHT_COPIES = 3


@dataclass
class Shape:
    """What the data contributes: features, outputs and the rows each split puts on the device."""

    n_features: int
    n_outputs: int
    n_rows: int  # train + validation + test

    @classmethod
    def of(cls, data: Any) -> Shape:  # data: hpo.data.Data
        info = data.info
        return cls(
            data.n_features, data.n_outputs, info["n_train"] + info["n_val"] + info["n_test"]
        )


@dataclass
class Footprint:
    """One configuration's memory, in bytes, with its parameter count."""

    params: int
    n_layers: int
    weights: int  # weights, gradients, optimizer state, the kept copy
    activations: int
    data: int
    host: int  # Python objects of the layers, in the host's memory

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.data + self.host

    def describe(self) -> str:
        parts = [
            f"{human(self.weights)} for weights, gradients, optimizer state and the kept copy",
            f"{human(self.activations)} for activations",
        ]
        if self.data:
            parts.append(f"{human(self.data)} for the data")
        if self.host >= 1e8:
            parts.append(f"{human(self.host)} for {self.n_layers:,} layers' Python objects")
        return f"{self.params:,} parameters: {', '.join(parts)}"


def human(n: float) -> str:
    """Bytes as a short figure: 512 B, 3.4 MB, 1.2 GB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def footprint(
    layers: list[tuple[int, int]],
    shape: Shape,
    batch_size: int,
    optimizer: str = "adam",
    momentum: bool = True,
    on_cpu: bool = True,
    data_copies: int = 1,
) -> Footprint:
    """The memory one configuration needs on its device (see the module docstring).

    `layers` lists the hidden layers as (width, how many in a row), so that a million layers
    cost one line of arithmetic."""
    fan_in, params, units, n_layers, widest = shape.n_features, 0, 0, 0, 0
    for width, count in [*layers, (shape.n_outputs, 1)]:
        if count <= 0:
            continue
        # weights and biases, and batch norm's scale and shift (an upper bound)
        params += fan_in * width + 3 * width + (count - 1) * (width * width + 3 * width)
        units += width * count
        n_layers += count
        widest = max(widest, width)
        fan_in = width
    n_layers -= 1  # the head is not a hidden layer
    state = OPTIMIZER_STATE.get(optimizer, 2) - (0 if momentum else 1)
    batch = min(batch_size, shape.n_rows)
    activations = FLOAT * (
        SAVED_PER_UNIT * batch * units
        + batch * shape.n_features
        + 2 * min(EVAL_BATCH, shape.n_rows) * widest
    )
    return Footprint(
        params=params,
        n_layers=n_layers,
        weights=FLOAT * params * (WEIGHT_COPIES + max(state, 0) + (1 if on_cpu else 0)),
        activations=activations,
        data=data_copies * shape.n_rows * (FLOAT * shape.n_features + 8),
        host=HOST_BYTES_PER_LAYER * (n_layers + 1),
    )


def of_config(config: TrialConfig, shape: Shape, on_cpu: bool) -> Footprint:
    """The footprint of one sampled configuration (its `widths`, batch size and optimizer)."""
    return footprint(
        [(int(w), 1) for w in config.widths],
        shape,
        config.batch_size,
        config.optimizer,
        config.momentum > 0,
        on_cpu,
        data_copies=0,  # the data is there already, and counted once for the whole run
    )


def corner(spec: Spec) -> tuple[int, int, int, str]:
    """The search space's largest corner: layers, width, batch size, and the optimizer that
    keeps the most state."""
    space = spec.space
    n_layers = int(largest(space.get("n_layers"), PARAMS["n_layers"].default))
    width = int(largest(space.get("width"), PARAMS["width"].default))
    batch = int(largest(space.get("batch_size"), PARAMS["batch_size"].default))
    opt = space.get("optimizer", PARAMS["optimizer"].default)
    choices = opt.choices if isinstance(opt, Distribution) else [opt]
    worst = max(choices or ["adam"], key=lambda o: OPTIMIZER_STATE.get(str(o), 2))
    return n_layers, width, batch, str(worst)


def free_memory(device: Any) -> tuple[int, str]:
    """Bytes free for training on `device` (a torch.device), and what that memory is."""
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)} (of {human(total)})"
    return host_available(), "available on this machine"


def host_available() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def limits(spec: Spec) -> tuple[int | None, int | None]:
    """The spec's opt-in limits: training.max_params and training.memory_limit in bytes."""
    t = spec.training
    return t.max_params, t.memory_limit


# On a CPU, cohorts of fused trials are formed for nets up to this many parameters: a wider
# one is bound by its matrix products and gains nothing stacked (see space.leads_a_cohort).
FUSE_CPU_MAX_PARAMS = 250_000


def check_fits(
    spec: Spec, shape: Shape, device: Any, concurrent: int = 1, fused: int = 1
) -> list[str]:
    """Problems when the largest model, `concurrent` times on `device` (worker processes,
    each with its own data) and `fused` times in each (cohorts, sharing it), does not fit.

    With `training.max_params` or `training.memory_limit` set, nothing is refused here: the
    configurations past the limit fail as trials instead.
    """
    max_params, memory_limit = limits(spec)
    if max_params is not None or memory_limit is not None:
        return []
    on_cpu = device.type != "cuda"
    n_layers, width, batch, optimizer = corner(spec)
    copies = 1 if concurrent == 1 else 1 + concurrent  # worker processes hold their own copy
    big = footprint([(width, n_layers)], shape, batch, optimizer, True, on_cpu, copies)
    if on_cpu and big.params > FUSE_CPU_MAX_PARAMS:
        fused = 1  # such a model trains alone (smaller fused ones need less than it)
    need = big.total + (concurrent * fused - 1) * (big.total - big.data)
    free, what = free_memory(device)
    problems = []
    for entry in spec.baselines:
        fp = of_config(spec.baseline_config(entry.name), shape, on_cpu)
        if fp.total + big.data > free:
            problems.append(
                f"baselines: {entry.name!r} needs {human(fp.total + big.data)} "
                f"({fp.describe()}); {device} has {human(free)} {what}"
            )
    if need <= free:
        return problems
    at_once = concurrent * fused
    times = f" x {at_once} trials at once" if at_once > 1 else ""
    return problems + [
        f"search_space: its largest model ({n_layers:,} layers of {width:,} units, "
        f"batch size {batch:,}) needs {human(need)}{times} ({big.describe()}); "
        f"{device} has {human(free)} {what}: narrow n_layers, width or batch_size, use fewer "
        "workers or fused trials, or set training.max_params or training.memory_limit to fail the "
        "configurations past it as trials"
    ]


def too_large(fp: Footprint, spec: Spec, copies: int = 1) -> str | None:
    """Why a configuration of footprint `fp` is past the spec's opt-in limits, or None;
    `copies`: the members a trial trains at once (repeats x folds), the data shared."""
    max_params, memory_limit = limits(spec)
    if max_params is not None and fp.params > max_params:
        return f"too large: {fp.params:,} parameters > training.max_params {max_params:,}"
    bound = spec.study.constraints.get("n_params")  # known before training: fail fast
    if bound is not None and bound.max is not None and fp.params > bound.max:
        return (f"infeasible before training: {fp.params:,} parameters > "
                f"study.constraints.n_params.max {bound.max:,.0f}")  # fmt: skip
    if bound is not None and bound.min is not None and fp.params < bound.min:
        return (f"infeasible before training: {fp.params:,} parameters < "
                f"study.constraints.n_params.min {bound.min:,.0f}")  # fmt: skip
    need = fp.total + (copies - 1) * (fp.total - fp.data)
    if memory_limit is not None and need > memory_limit:
        members = f"{copies} members of " if copies > 1 else ""
        return (
            f"too large: needs {human(need)} ({members}{fp.describe()}) > training.memory_limit "
            f"{human(memory_limit)}"
        )
    return None
