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
from torch.nn import functional as F

from hpo.backprop import manual_step
from hpo.model import train_forward
from hpo.redact import first_line
from hpo.registry import LR_SCHEDULES, OPTIMIZERS, PRECISIONS

Tensors = tuple[torch.Tensor, torch.Tensor]
EVAL_BATCH = 8192  # rows per forward pass when evaluating; bounded so memory stays flat

# Saturated sigmoid/tanh units and shrinking weights produce denormal floats, which x86 CPUs
# handle tens of times slower (a 4 x 509 sigmoid net ran 19 s an epoch instead of 3). The
# flush-to-zero mode is per thread, and torch's intra-op worker threads copy it from the thread
# that starts them: set it here, before any of them exists, and check it again in `train`.
torch.set_flush_denormal(True)


@dataclass
class TrainConfig:
    task: str = "classification"  # classification | regression
    optimizer: str = "adam"  # a name in registry.OPTIMIZERS
    lr: float = 1e-3
    momentum: float = 0.0  # sgd and rmsprop
    nesterov: bool = False  # sgd, only with momentum > 0
    weight_decay: float = 0.0  # L2 penalty (decoupled for adamw)
    l1: float = 0.0  # L1 penalty on weights, added to the loss
    batch_size: int = 128
    lr_schedule: str = "none"  # a name in registry.LR_SCHEDULES
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
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
    def from_params(cls, params: dict[str, Any], **kw: Any) -> TrainConfig:
        """Take the training hyperparameters out of a sampled configuration."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in params.items() if k in names}, **kw)


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


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimizer named in the config, given the settings it takes (lr, L2 weight decay,
    momentum, Nesterov); `capturable`: its state kept on the device, so that a CUDA graph can
    replay its step (`StepGraph`), where it takes that setting."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}"
        )
    cls = OPTIMIZERS.load(cfg.optimizer)
    settings = {
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum,
        "nesterov": cfg.nesterov and cfg.momentum > 0,  # torch refuses Nesterov without momentum
        "capturable": capturable,
    }
    takes = inspect.signature(cls).parameters
    device = next(model.parameters()).device
    if "fused" in takes and device.type in ("cpu", "cuda"):
        settings["fused"] = True  # one kernel per step for all parameters, not one per tensor
    opt = cls(model.parameters(), **{k: v for k, v in settings.items() if k in takes})
    if capturable:
        # Its warm-up steps and the epochs' last batches run outside the graph, by design: no
        # warning that a capturable optimizer stepped uncaptured.
        opt._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]
    return opt


STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")  # Adam's state per parameter


def optimizer_step(opt: torch.optim.Optimizer) -> Callable[[], Any]:
    """`opt.step`, but for a fused Adam or AdamW on a CPU, whose kernel is called directly
    once the first step has made its state: the same update without the optimizer's Python
    bookkeeping (50 us a step, 4% of a 784-64-64-10 step at batch 512 on a 2-core CPU)."""
    group = opt.param_groups[0]
    params: list[torch.Tensor] = group["params"]
    if not (
        isinstance(opt, torch.optim.Adam)
        and len(opt.param_groups) == 1
        and group["fused"]
        and all(p.device.type == "cpu" for p in params)
        and not any(group[k] for k in ("amsgrad", "maximize", "capturable", "differentiable"))
    ):
        return opt.step
    kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
    state: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step() -> None:
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            opt.step()  # which skips a parameter without a gradient
            return
        if not state:
            opt.step()  # makes the state
            count = opt.state[params[0]]["step"]  # the parameters step together: one counter
            for p in params:
                opt.state[p]["step"] = count
            state[:] = [[opt.state[p][k] for p in params] for k in STATE_KEYS]
            return
        exp_avgs, exp_avg_sqs, steps = state
        steps[0].add_(1)
        beta1, beta2 = group["betas"]
        kernel(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
            beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
            maximize=False, grad_scale=None, found_inf=None,
        )  # fmt: skip

    return step


@torch.no_grad()
def add_l1_gradient(weights: list[torch.Tensor], l1: float | torch.Tensor) -> None:
    """Add the gradient of the L1 penalty `l1 * sum(|w|)` (`l1` a float, or one rate per
    member of a stack, shaped to broadcast) to the weights' gradients: `l1 * sign(w)`, as
    autograd would give for the penalty added to the loss, without its graph (which made an
    epoch of 784-512-512 at batch 128 cost 1.28x one without L1; this, 1.10x)."""
    for w in weights:
        assert w.grad is not None
        if isinstance(l1, torch.Tensor):
            w.grad.addcmul_(w.sign(), l1)
        else:
            w.grad.add_(w.sign(), alpha=l1)


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
    torch.set_flush_denormal(True)
    if denormals_flushed():
        return fn()
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        torch.set_flush_denormal(True)
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


def graphable(opt: torch.optim.Optimizer) -> bool:
    """Whether a CUDA graph can replay `opt`'s step: its state lives on the device (SGD keeps
    no step count; the others must be capturable)."""
    return isinstance(opt, torch.optim.SGD) or all(
        g.get("capturable", False) for g in opt.param_groups
    )


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
    the step can be captured at all (see `graphable`).
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
        if not self.on or len(idx) != self.batch:
            self.step(idx)
            return
        if key != self.key:
            if self.graph is not None:
                self.stale = self.graph
            self.graph, self.key = None, key
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
        device = self.idx.device.index
        device = torch.cuda.current_device() if device is None else device
        with contextlib.suppress(Exception):
            pool = graph.pool()
            for release in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
                with contextlib.suppress(Exception):
                    getattr(torch._C, release)(device, pool)


# A learning-rate schedule: built from the optimizer and config, stepped once per epoch with
# that epoch's metrics; None is a constant rate.
Schedule = Callable[[dict[str, float]], Any]


def constant_lr(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Schedule | None:
    """No schedule."""
    return None


def cosine_lr(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Schedule | None:
    """Cosine annealing from `lr` to 0 over `max_epochs`."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs)
    return lambda metrics: sched.step()


def plateau_lr(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Schedule | None:
    """Halve the rate after 2 epochs without a lower val_loss."""
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    return lambda metrics: sched.step(metrics["val_loss"])


def evaluate(model: nn.Module, data: Tensors, cfg: TrainConfig) -> dict[str, float]:
    """Loss and accuracy (or RMSE) over a whole split, in large batches, without gradients."""
    X, y = data
    model.eval()
    loss_sum = torch.zeros((), device=X.device)
    correct = torch.zeros((), device=X.device)
    cast = matmul_precision(cfg.precision, X.device)
    with torch.inference_mode(), products(cfg.precision, X.device):
        for start in range(0, len(X), EVAL_BATCH):
            with cast():
                out = model(X[start : start + EVAL_BATCH]).float()  # the loss in float32
            yb = y[start : start + EVAL_BATCH]
            if cfg.task == "classification":
                loss_sum += F.cross_entropy(out, yb, reduction="sum")
                correct += (out.argmax(1) == yb).sum()
            else:
                loss_sum += F.mse_loss(out.squeeze(1), yb, reduction="sum")
    loss, hits = torch.stack([loss_sum, correct]).tolist()  # one host sync per split
    return _metrics(loss / max(len(X), 1), hits / max(len(X), 1), cfg)


def _metrics(loss: float, accuracy: float, cfg: TrainConfig) -> dict[str, float]:
    if cfg.task == "classification":
        return {"loss": loss, "accuracy": accuracy}
    return {"loss": loss, "rmse": math.sqrt(max(loss, 0.0)) * cfg.y_scale}


@training_loop
def train(
    model: nn.Module,
    train_data: Tensors,
    val_data: Tensors,
    cfg: TrainConfig,
    on_epoch_end: Callable[[int, dict[str, float]], str | None] | None = None,
    interrupt: Flag | None = None,
) -> TrainResult:
    """Train `model` in place; it ends holding the best epoch's weights when restore_best is set.

    `on_epoch_end(epoch, metrics)` runs after each epoch and may return a reason to stop
    ("pruned" or "interrupted"); `interrupt`, once set, stops training at the next step.
    """
    X, y = train_data
    n = len(X)
    shuffle_seed = cfg.seed if cfg.shuffle_seed is None else cfg.shuffle_seed
    gen = torch.Generator(device=X.device).manual_seed(shuffle_seed)
    opt = make_optimizer(model, cfg, capturable=cuda_graphs(X.device))
    cast = matmul_precision(cfg.precision, X.device)
    step_schedule = LR_SCHEDULES.load(cfg.lr_schedule)(opt, cfg)
    opt_step = optimizer_step(opt)  # after the schedule, which wraps opt.step
    classify = cfg.task == "classification"
    params = list(model.parameters())
    # The backward pass written out where it can be (float32 on a CPU), autograd elsewhere.
    written_out = manual_step(model, cfg.task, resolved_precision(cfg.precision, X.device))
    weights = [p for p in params if p.dim() > 1]  # L1 skips biases
    watch = Watch(cfg)
    best_state: dict[str, torch.Tensor] | None = None
    result = TrainResult()
    # A last batch of one row would break batch norm; it is skipped (the permutation changes
    # every epoch, so no row is left out for good).
    n_used = n - 1 if n % cfg.batch_size == 1 and n > 1 else n

    # Running sums stay on the device: no host sync inside the step loop. The same tensors
    # every epoch, which a CUDA graph of the step adds to.
    sums = torch.zeros(2, device=X.device)
    loss_sum, correct = sums.unbind()

    def step(idx: torch.Tensor) -> None:
        xb, yb = X.index_select(0, idx), y.index_select(0, idx)  # 2x faster than X[idx]
        if written_out is not None:
            loss, out = written_out(xb, yb)
        else:
            with cast():
                out = train_forward(model, xb)
                loss = F.cross_entropy(out, yb) if classify else F.mse_loss(out.squeeze(1), yb)
            for p in params:  # opt.zero_grad(set_to_none=True) in a tenth the time
                p.grad = None
            loss.backward()
        if cfg.l1:
            add_l1_gradient(weights, cfg.l1)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt_step()
        loss_sum.add_(loss.detach() * len(idx))
        if classify:
            correct.add_((out.detach().argmax(1) == yb).sum())

    graph = StepGraph(step, cfg.batch_size, X.device, enabled=graphable(opt))

    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, device=X.device, generator=gen)
        sums.zero_()
        for start in range(0, n_used, cfg.batch_size):
            if interrupt is not None and interrupt.is_set():  # a host flag: no device sync
                break
            idx = perm[start : min(start + cfg.batch_size, n_used)]
            graph(idx, key=opt.param_groups[0]["lr"])  # the rate is baked into the graph
        if interrupt is not None and interrupt.is_set():
            result.stopped_by = "interrupted"  # this epoch is incomplete: not recorded
            break
        train_loss, train_hits = sums.tolist()
        tr = _metrics(train_loss / n_used, train_hits / n_used, cfg)
        va = evaluate(model, val_data, cfg)
        metrics = {f"train_{k}": v for k, v in tr.items()} | {f"val_{k}": v for k, v in va.items()}
        metrics["lr"] = opt.param_groups[0]["lr"]
        metrics["epoch_seconds"] = time.perf_counter() - t0
        result.history.append(metrics)

        bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(metrics[k])]
        if bad:
            result.failure = f"{bad[0]} became {metrics[bad[0]]} at epoch {epoch}"
            result.stopped_by = "diverged"
            break
        if watch.update(metrics[cfg.monitor], first=best_state is None):
            result.best_epoch = epoch
            if cfg.restore_best:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                best_state = {}
        if step_schedule is not None:
            step_schedule(metrics)
        stop = on_epoch_end(epoch, metrics) if on_epoch_end is not None else None
        if stop is not None:
            if stop not in STOP_REASONS:
                raise ValueError(f"on_epoch_end must return None or a stop reason, got {stop!r}")
            result.stopped_by = stop
            break
        if watch.bad_epochs >= cfg.patience:
            result.stopped_by = "early_stopping" if epoch < cfg.max_epochs else "max_epochs"
            break

    if cfg.restore_best and best_state:
        model.load_state_dict(best_state)
    elif result.history and not result.failure:
        result.best_epoch = len(result.history)  # the weights are the last epoch's
    return result
