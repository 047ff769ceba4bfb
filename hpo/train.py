"""The training loop: index-sliced mini-batches on the device, per-epoch metrics, early stopping.

Knows nothing of Optuna or MLflow: pruning, deadlines and logging reach it through
`on_epoch_end`, which can ask it to stop. It always returns its history and why it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from hpo import _private
from hpo.optim import can_capture
from hpo.params import PARAMS
from hpo.redact import first_line
from hpo.registry import PRECISIONS
from hpo.steppers import (
    EVAL_BATCH,
    ModuleStepper,
    StackStepper,
    Tensors,
    evaluate_members,
    metrics_of,
    padded_rows,
)

__all__ = ["EVAL_BATCH", "Tensors", "evaluate", "fit", "train"]


def flush_denormals() -> None:
    """Flush denormal floats to zero in this thread, and so in the intra-op worker threads
    it starts from now on.

    Saturated sigmoid/tanh units and shrinking weights produce denormal floats, which x86 CPUs
    handle tens of times slower (a 4 x 509 sigmoid net ran 19 s an epoch instead of 3). The
    mode is per thread, and torch's intra-op worker threads copy it from the thread that
    starts them: hpo's processes call this before their first torch operation, and `fit`
    checks it again (training moves to a fresh thread when the workers do not flush)."""
    torch.set_flush_denormal(True)


@dataclass
class TrainConfig:
    task: str = "classification"  # classification | regression
    # The hyperparameters' defaults are the table's (hpo.params).
    optimizer: str = PARAMS["optimizer"].default
    lr: float = PARAMS["lr"].default
    momentum: float = PARAMS["momentum"].default
    nesterov: bool = PARAMS["nesterov"].default
    weight_decay: float = PARAMS["weight_decay"].default
    l1: float = PARAMS["l1"].default
    batch_size: int = PARAMS["batch_size"].default
    lr_schedule: str = PARAMS["lr_schedule"].default
    grad_clip: float = PARAMS["grad_clip"].default  # max global gradient norm; 0 = off
    max_epochs: int = 30
    monitor: str = "val_loss"
    patience: int = 5  # epochs without improvement before stopping
    min_delta: float = 0.0
    restore_best: bool = True
    seed: int = 0
    shuffle_seed: int | None = None  # the batch order's seed, when not `seed` (fused cohorts)
    y_scale: float = 1.0  # regression: RMSE is reported in the target's unit
    precision: str = "auto"  # a name in PRECISIONS

    @classmethod
    def of(cls, config: Any, **settings: Any) -> TrainConfig:
        """A trial's training settings: the training hyperparameters of its configuration (a
        `hpo.params.TrialConfig`: the table's rows that are fields here; the others shape
        the model) and `settings`, the spec's."""
        return cls(**{name: getattr(config, name) for name in training_params()}, **settings)


def training_params() -> tuple[str, ...]:
    """The hyperparameters the trainer takes (the others are the model's, `build_mlp`'s)."""
    fields = set(TrainConfig.__dataclass_fields__)
    return tuple(name for name in PARAMS if name in fields)


# Why training stopped. Pruning and interruption come from `on_epoch_end` or `interrupt`.
STOP_REASONS = ("max_epochs", "early_stopping", "pruned", "diverged", "interrupted")


class Flag(Protocol):
    """Anything with `is_set()`: a threading.Event set to interrupt training at the next step."""

    def is_set(self) -> bool: ...


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    best_epoch: int = 0
    stopped_by: str = "max_epochs"  # one of STOP_REASONS
    failure: str | None = None  # why the trial failed (e.g. a non-finite loss)

    @property
    def stopped_early(self) -> bool:
        return self.stopped_by == "early_stopping"

    @property
    def best(self) -> dict[str, float]:
        """Metrics of the epoch whose weights the model holds at the end."""
        return self.history[self.best_epoch - 1] if self.best_epoch else {}


def lower_is_better(metric: str) -> bool:
    """Accuracies go up; losses and errors go down."""
    return not metric.endswith("accuracy")


class Watch:
    """Early stopping's bookkeeping for one model: the best monitored value so far and the
    epochs since it."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.lower = cfg, lower_is_better(cfg.monitor)
        self.best = math.inf if self.lower else -math.inf
        self.bad_epochs = 0

    def update(self, value: float, first: bool = False) -> bool:
        """Note an epoch's value; whether it improved on the best by more than min_delta."""
        delta = self.cfg.min_delta
        improved = first or (
            value < self.best - delta if self.lower else value > self.best + delta
        )
        if improved:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return improved


def denormals_flushed() -> bool:
    """Whether this thread's matrix products flush denormal floats to zero, on every worker
    thread they use: a product of denormals comes out exactly zero only then."""
    # Built from its bits: converting 5.9e-39 from a Python float would itself flush it.
    tiny = torch.full((128, 128), 0x00400000, dtype=torch.int32).view(torch.float32)
    return not bool((tiny @ torch.ones(128, 128)).any())


def training_loop(loop: Callable[..., Any]) -> Callable[..., Any]:
    """A training loop that takes `train_data` and a `cfg` (or `cfgs`, a cohort's): run by
    `on_flushing_threads` when that data is on a CPU, with its matrix products' precision
    set for the whole loop, backward passes included (see `products`)."""
    signature = inspect.signature(loop)

    @functools.wraps(loop)
    def run(*args: Any, **kw: Any) -> Any:
        bound = signature.bind(*args, **kw).arguments
        device = bound["train_data"][0].device
        cfg = bound["cfg"] if "cfg" in bound else bound["cfgs"][0]

        def within() -> Any:
            with products(cfg.precision, device):
                return loop(*args, **kw)

        return on_flushing_threads(within) if device.type == "cpu" else within()

    return run


def on_flushing_threads(fn: Callable[[], Any]) -> Any:
    """Run `fn` where denormals are flushed: here, or in a new thread (whose intra-op worker
    threads start afresh, with flushing on) when this thread's were started before it was."""
    flush_denormals()
    if denormals_flushed():
        return fn()
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        flush_denormals()
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(e)

    worker = threading.Thread(target=run, name="hpo-train", daemon=True)  # Ctrl-C ends it
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return out[0]


def resolved_precision(precision: str, device: torch.device) -> str:
    """What `precision` means on `device`: fp32, tf32 or bf16.

    auto is TF32 on CUDA (tensor cores, a 10-bit mantissa in the products) and fp32 elsewhere;
    tf32 exists only on CUDA; bf16 is autocast to bfloat16 products, which pays on GPUs and on
    CPUs with AMX or AVX-512 BF16 units. Weights, gradient accumulation and optimizer state
    stay float32 in every mode.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "tf32" if device.type == "cuda" else "fp32"
    if precision == "tf32" and device.type != "cuda":
        return "fp32"
    return precision


def bf16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 products in hardware: a CUDA GPU that supports them,
    or a CPU with AVX-512 BF16 or AMX units. Elsewhere bf16 autocast is emulated: measured on
    2 AVX2 cores (AMD EPYC), 784-512-512-10 trained 18x slower than in float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return True  # mps and others: not known to be slower


def precision_warning(precision: str, device: torch.device) -> str | None:
    """A line for the user when `precision` will be slow on `device`."""
    if resolved_precision(precision, device) != "bf16" or bf16_native(device):
        return None
    where = "a CPU without AVX-512 BF16 or AMX units" if device.type == "cpu" else str(device)
    return (
        f"training.precision: bf16 on {where} is emulated, many times slower than fp32 "
        "(measured: 18x for 784-512-512-10 on an AVX2 CPU); auto or fp32 trains faster here"
    )


@contextlib.contextmanager
def products(precision: str, device: torch.device) -> Iterator[None]:
    """CUDA's float32 products as `precision` says (TF32 or IEEE) while inside, forward and
    backward alike; the process-wide switches are put back on the way out.

    Set with `torch.set_float32_matmul_precision`, which keeps torch's legacy switch and its
    new ones (`torch.backends.*.matmul.fp32_precision`) in agreement: setting only a new one
    makes every reader of the legacy one raise (`torch.get_float32_matmul_precision`,
    `matmul.allow_tf32`, TunableOp's float32 GEMMs)."""
    resolved = resolved_precision(precision, device)
    if device.type != "cuda":
        yield
        return
    switches = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [switch.fp32_precision for switch in switches]
    try:
        legacy: str | None = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller had already set the two apart
        legacy = None
    torch.set_float32_matmul_precision("high" if resolved == "tf32" else "highest")
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        for switch, value in zip(switches, before, strict=True):
            switch.fp32_precision = value


def matmul_precision(precision: str, device: torch.device) -> Callable[[], Any]:
    """A context to compute a forward pass in: bf16 autocast, or nothing to change."""
    if resolved_precision(precision, device) == "bf16":
        # No cache of cast weights: a CUDA graph of the step must cast them at every replay.
        return functools.partial(torch.autocast, device.type, torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext


def cuda_graphs(device: torch.device) -> bool:
    """Whether training steps on `device` are replayed as CUDA graphs: on CUDA, unless the
    environment says `HPO_CUDA_GRAPHS=0`."""
    return (
        device.type == "cuda"
        and os.environ.get("HPO_CUDA_GRAPHS", "1") != "0"
        and not _capture_failed
    )


# Set once a capture has failed in this process: the others would fail alike.
_capture_failed = False


class StepGraph:
    """A training step replayed as one CUDA graph for every full batch of an epoch.

    On a GPU a small net's step is a few dozen tiny kernels, each launched from Python: an H100
    sat idle most of a 784-64-64-10 step at batch 512 (37 kernels, 1.4 ms a step, the GPU
    busy 17% of it), while the same step captured once and replayed took 0.16 ms. `step(idx)`
    does the whole step for the batch of rows `idx`, its running sums included, in place: the
    graph records it once and replays it with `idx` copied into a fixed index tensor, so no
    tensor it touches may be replaced between replays. The first `WARM_STEPS` full batches
    run as usual on a side stream (they make the optimizer's state and the libraries' lazy
    handles, which a capture must not); a batch of another size (an epoch's last) runs as
    usual. A change of `key` (a new learning rate baked into the step's kernels, a cohort's
    member dropped) captures again, into the same memory pool. A capture that fails leaves
    this loop, and every later one in the process, running as usual, with a warning.
    `generators`: those the step draws from besides the device's default. `enabled`: whether
    the step can be captured at all (every optimizer keeps its state on the device:
    `hpo.optim.can_capture`).
    """

    WARM_STEPS = 3

    def __init__(
        self,
        step: Callable[[torch.Tensor], None],
        batch: int,
        device: torch.device,
        generators: tuple[torch.Generator, ...] = (),
        enabled: bool = True,
    ):
        self.step, self.batch, self.generators = step, batch, generators
        self.on = enabled and cuda_graphs(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Any = None
        self.stale: torch.cuda.CUDAGraph | None = None  # the graph a new capture replaces
        self.warm = 0
        if self.on:
            self.idx = torch.zeros(batch, dtype=torch.long, device=device)
            self.stream = torch.cuda.Stream(device)

    def __call__(self, idx: torch.Tensor, key: Any = None) -> None:
        if not self.on or idx.shape[-1] != self.batch:
            self.step(idx)
            return
        if key != self.key:
            if self.graph is not None:
                self.stale = self.graph
            self.graph, self.key = None, key
            if self.idx.shape != idx.shape:  # members with their own rows: (members, rows)
                self.idx = torch.zeros_like(idx)
        if self.graph is None:
            here = torch.cuda.current_stream(idx.device)
            self.stream.wait_stream(here)
            with torch.cuda.stream(self.stream):
                if self.warm < self.WARM_STEPS:
                    self.warm += 1
                    self.step(idx)
                else:
                    self.graph = self._capture()
            here.wait_stream(self.stream)
            if self.graph is None:  # a warm-up step, done; or a failed capture
                if not self.on:
                    self.step(idx)
                return
        self.idx.copy_(idx)
        self.graph.replay()

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        graph = torch.cuda.CUDAGraph()
        # Into the memory pool of the graph it replaces, which is never replayed again: a new
        # pool each time (a schedule's new rate every epoch) would hold one more step's memory
        # each time, until `empty_cache`.
        pool = self.stale.pool() if self.stale is not None else None
        try:
            for gen in self.generators:
                graph.register_generator_state(gen)
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.step(self.idx)  # recorded, not run
            finally:
                graph.capture_end()
        except Exception as e:  # noqa: BLE001 - any failure: train without graphs
            global _capture_failed
            _capture_failed, self.on = True, False
            self._release_pool(graph)
            warnings.warn(
                f"CUDA graph capture failed; training without CUDA graphs from here on: "
                f"{first_line(e)}",
                RuntimeWarning,
                stacklevel=3,
            )
            graph = None
        self.stale = None
        return graph

    def _release_pool(self, graph: torch.cuda.CUDAGraph) -> None:
        """After a failed capture, tell the allocator the capture is over (the failed
        `capture_end` did not), so that `empty_cache` and its out-of-memory retry work.

        Not mended: the device's random generator stays mid-capture (torch 2.11 on an H100:
        the next dropout mask raised "Offset increment outside graph capture encountered
        unexpectedly", and setting its state anew did not help), so a later step that draws
        dropout masks in this process fails its trial."""
        _private.end_capture_pool(graph, self.idx.device)


def evaluate(model: nn.Module, data: Tensors, cfg: TrainConfig) -> dict[str, float]:
    """Loss and accuracy (or RMSE) of `model` over a whole split, in large batches, without
    gradients."""
    model.eval()
    device = data[0].device
    with products(cfg.precision, device):
        return evaluate_members(
            lambda x: model(x).unsqueeze(0), 1, data, cfg, matmul_precision(cfg.precision, device)
        )[0]


# A member's epoch: (epoch, metrics) -> None or a stop reason (one model), or for a cohort
# ({member: metrics}, epoch) -> {member: None or a stop reason}.
# (metrics of each member still training, epoch) -> each member's None or stop reason
EpochHook = Callable[[dict[int, dict[str, float]], int], dict[int, str | None]]
DoneHook = Callable[[int, TrainResult], None]


def train(
    model: nn.Module,
    train_data: Tensors,
    val_data: Tensors,
    cfg: TrainConfig,
    on_epoch_end: Callable[[int, dict[str, float]], str | None] | None = None,
    interrupt: Flag | None = None,
) -> TrainResult:
    """Train `model` in place, a cohort of one; it ends holding the kept epoch's weights (the
    best, with restore_best). `on_epoch_end(epoch, metrics)` runs after each epoch and may
    return a reason to stop ("pruned" or "interrupted"); `interrupt`, once set, stops
    training at the next step."""
    hook = None
    if on_epoch_end is not None:
        hook = lambda metrics, epoch: {0: on_epoch_end(epoch, metrics[0])}  # noqa: E731
    return fit([model], [cfg], train_data, val_data, hook, None, interrupt)[0]


@training_loop
def fit(
    models: list[nn.Module],
    cfgs: list[TrainConfig],
    train_data: Tensors,
    val_data: Tensors,
    on_epoch_end: EpochHook | None = None,
    on_done: DoneHook | None = None,
    interrupt: Flag | None = None,
    own_rows: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> list[TrainResult]:
    """The epoch loop, for one model or several of one shape trained as one stack (a
    cohort; they share the batch order, the first one's `shuffle_seed` or `seed`).

    With `own_rows`, each member has its own: (training rows of `train_data`, validation rows of
    `val_data`), index tensors (a fold of cross-validation, or all rows for a repeat), and
    its own batch order from its own `shuffle_seed` or `seed`; every member takes as many
    rows an epoch as the one with fewest (another permutation each epoch, so no row is left
    out for good), so that a member trained alone with the same rows follows the same curve.

    Each member keeps its own history, early stopping, kept weights and reason to stop.
    `on_epoch_end({member: metrics}, epoch)` answers each member still training with None
    or a stop reason; `on_done(member, result)` hears of each
    member as soon as it stops, with its model already holding its kept weights; the others
    go on. `interrupt`, once set, stops every member at the next step (the unfinished epoch
    is not recorded).
    """
    X, _ = train_data
    device = X.device
    lead = cfgs[0]
    n, batch = len(X) if own_rows is None else min(len(r[0]) for r in own_rows), lead.batch_size

    def order_seed(cfg: TrainConfig) -> int:
        return cfg.seed if cfg.shuffle_seed is None else cfg.shuffle_seed

    shuffle_seed = order_seed(lead)
    gens = [
        torch.Generator(device=device).manual_seed(order_seed(c))
        for c in (cfgs if own_rows is not None else cfgs[:1])
    ]
    if own_rows is not None and (
        len(models) == 1 or all(r[1] is own_rows[0][1] for r in own_rows)
    ):
        # alone, or all on the same validation rows (repeats): those rows, once
        val_data = (val_data[0][own_rows[0][1]], val_data[1][own_rows[0][1]])
    cast = matmul_precision(lead.precision, device)
    # A CUDA graph replays the step when every member's optimizer can keep its state on the
    # device (torch's Adagrad cannot): then each is built `capturable`.
    capturable = cuda_graphs(device) and all(can_capture(c.optimizer) for c in cfgs)
    if len(models) == 1:
        stepper: ModuleStepper | StackStepper = ModuleStepper(
            models[0], lead, train_data, cast, capturable
        )
    else:
        stepper = StackStepper(models, cfgs, train_data, cast, capturable, shuffle_seed)
        if own_rows is not None and any(r[1] is not own_rows[0][1] for r in own_rows):
            stepper.own_val = padded_rows(val_data, [r[1] for r in own_rows])
    graph = StepGraph(
        stepper.step, batch, device, stepper.generators, enabled=capturable,
    )  # fmt: skip
    members = list(range(len(models)))  # the member at each row of the stepper
    results = [TrainResult() for _ in models]
    watches = [Watch(c) for c in cfgs]
    kept: list[dict[str, torch.Tensor] | None] = [None] * len(models)
    # A last batch of one row would break batch norm; it is skipped (the permutation changes
    # every epoch, so no row is left out for good).
    n_used = n - 1 if n % batch == 1 and n > 1 else n
    steps = 0  # counted here: a CUDA graph's replay runs no Python in the step

    def finish(rows: list[int]) -> None:
        for row in rows:
            m = members[row]
            result = results[m]
            if result.history and not result.failure and not cfgs[m].restore_best:
                result.best_epoch = len(result.history)  # the weights are the last epoch's
            stepper.finish(row, kept[m] if cfgs[m].restore_best else None, steps)
            if on_done is not None:
                on_done(m, result)

    for epoch in range(1, lead.max_epochs + 1):
        t0 = time.perf_counter()
        stepper.train_mode()
        if own_rows is None:
            perm = torch.randperm(n, device=device, generator=gens[0])
        else:  # (members, n): each member's own rows in its own order
            orders = [
                torch.randperm(len(own_rows[m][0]), device=device, generator=gens[m])[:n]
                for m in members
            ]
            perm = torch.stack([own_rows[m][0][o] for m, o in zip(members, orders, strict=True)])
        stepper.sums.zero_()
        rates = [u.lr for u in stepper.updates]
        for start in range(0, n_used, batch):
            if interrupt is not None and interrupt.is_set():  # a host flag: no device sync
                break
            # A rate is baked into the step's kernels, and the stack's tensors change when a
            # member leaves: a graph of the step is captured again when either does.
            graph(perm[..., start : min(start + batch, n_used)], key=(len(members), *rates))
            steps += 1
        if interrupt is not None and interrupt.is_set():
            for m in members:
                results[m].stopped_by = "interrupted"  # this epoch is incomplete: not recorded
            finish(list(range(len(members))))
            break
        sums = stepper.sums.tolist()  # one host read of the running sums
        val = stepper.evaluate(val_data)
        seconds = time.perf_counter() - t0
        epoch_metrics: dict[int, dict[str, float]] = {}
        by_row: dict[int, dict[str, float]] = {}  # the same, by the stepper's rows
        stopped: dict[int, str] = {}
        for row, m in enumerate(members):
            cfg = cfgs[m]
            tr = metrics_of(sums[0][row] / n_used, sums[1][row] / n_used, cfg)
            metrics = {f"train_{k}": v for k, v in tr.items()}
            metrics |= {f"val_{k}": v for k, v in val[row].items()}
            metrics["lr"] = rates[row]
            metrics["epoch_seconds"] = seconds
            results[m].history.append(metrics)
            bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(metrics[k])]
            if bad:
                results[m].failure = f"{bad[0]} became {metrics[bad[0]]} at epoch {epoch}"
                stopped[m] = "diverged"
                continue
            if watches[m].update(metrics[cfg.monitor], first=kept[m] is None):
                results[m].best_epoch = epoch
                kept[m] = stepper.kept(row) if cfg.restore_best else {}
            epoch_metrics[m] = metrics
            by_row[row] = metrics
        stepper.epoch_end(by_row)
        last = {
            m
            for m in epoch_metrics
            if watches[m].bad_epochs >= cfgs[m].patience or epoch == lead.max_epochs
        }
        decisions = {}
        if on_epoch_end is not None and epoch_metrics:  # not when every member diverged
            decisions = on_epoch_end(epoch_metrics, epoch)
        for m in epoch_metrics:
            stop = decisions.get(m)
            if stop is not None:
                if stop not in STOP_REASONS:
                    raise ValueError(f"on_epoch_end must answer None or a stop reason: {stop!r}")
                stopped[m] = stop
            elif m in last:
                stopped[m] = "early_stopping" if epoch < lead.max_epochs else "max_epochs"
        if stopped:
            for m, why in stopped.items():
                results[m].stopped_by = why
            finish([row for row, m in enumerate(members) if m in stopped])
            rows = [row for row, m in enumerate(members) if m not in stopped]
            if not rows:
                break
            members = [members[row] for row in rows]
            stepper.keep(rows)
    return results
