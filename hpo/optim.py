"""A member's update: its optimizer, learning-rate schedule, L1 penalty and gradient clipping.

Every member of a cohort, and a trial alone (a cohort of one), is updated by an `Update` over
its own parameters: a module's, or its rows of a stacked model's tensors. So an optimizer or a
schedule is torch's own and one registry entry (`hpo.registry.OPTIMIZERS`, `LR_SCHEDULES`):
what a trial alone does, each member of a cohort does with the same code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.adagrad import adagrad
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from hpo import _private
from hpo.registry import LR_SCHEDULES, OPTIMIZERS

# A learning-rate schedule: built from the optimizer and the member's training settings,
# stepped once per epoch with that epoch's metrics; None is a constant rate.
Schedule = Callable[[dict[str, float]], Any]


def make_optimizer(
    params: list[torch.Tensor], cfg: Any, capturable: bool = False
) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names over `params`, given lr, weight decay and the
    settings its registry entry `takes` (momentum, Nesterov); torch's fused kernel where the
    class has one for the device; `capturable`: its state kept on the device, so that a CUDA
    graph can replay its step (`hpo.train.StepGraph`), where the class can."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}"
        )
    cls = OPTIMIZERS.load(cfg.optimizer)
    settings: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    settings |= {name: getattr(cfg, name) for name in OPTIMIZERS[cfg.optimizer].takes}
    if "nesterov" in settings:  # torch refuses Nesterov without momentum
        settings["nesterov"] = cfg.nesterov and cfg.momentum > 0
    # What torch's class can do, read from it: keep its state on the device for a CUDA
    # graph; one kernel per step for all parameters, not one per tensor.
    takes = inspect.signature(cls).parameters
    if capturable and "capturable" in takes:
        settings["capturable"] = True
    if "fused" in takes and params[0].device.type in ("cpu", "cuda"):
        settings["fused"] = True
    opt = cls(params, **settings)
    if capturable:
        # Its warm-up steps and the epochs' last batches run outside the graph, by design.
        _private.quiet_uncaptured_steps(opt)
    return opt


def warm_up() -> None:
    """Pay a process's one-time cost of torch's optimizers before its first trial: the first
    `torch.optim.Optimizer` imports `torch._dynamo` (about a second on a CPU; a tenth of a
    30-trial digits study), which a worker does while the driver opens its stores."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def can_capture(name: str) -> bool:
    """Whether the optimizer `name` can keep its state on the device, as a CUDA graph of its
    step needs: SGD keeps no step count; the others must take `capturable`."""
    cls = OPTIMIZERS.load(name)
    return issubclass(cls, torch.optim.SGD) or "capturable" in inspect.signature(cls).parameters


def fast_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """`opt.step`, or for a fused Adam, AdamW, SGD or Adagrad on a CPU, torch's functional
    form of the same update (`torch.optim.adam.adam`, ...) called with the state the first
    `opt.step` made: the same kernel without the optimizer's per-step Python bookkeeping
    (about 35 us a step, 4-10% of a small net's step on a 2-core CPU)."""
    group = opt.param_groups[0]
    params: list[torch.Tensor] = group["params"]
    functional = _FUNCTIONAL.get(type(opt))
    if (
        functional is None
        or len(opt.param_groups) != 1
        or not group.get("fused")
        or any(p.device.type != "cpu" for p in params)
        or any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable"))
    ):
        return opt.step
    state: list[Callable[[], None]] = []

    @torch.no_grad()
    def step() -> None:
        if state and all(p.grad is not None for p in params):
            state[0]()
            return
        opt.step()  # the first step makes the state; a missing gradient, its own rule
        if not state:
            state.append(functional(opt, params))

    return step


def _adam(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[], None]:
    group, states = opt.param_groups[0], [opt.state[p] for p in params]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]

    def step() -> None:
        beta1, beta2 = group["betas"]
        adam(
            params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, fused=True,
            decoupled_weight_decay=group["decoupled_weight_decay"], amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )  # fmt: skip

    return step


def _sgd(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[], None]:
    group = opt.param_groups[0]
    buffers = [opt.state[p].get("momentum_buffer") for p in params]

    def step() -> None:
        sgd(
            params, [p.grad for p in params], buffers, fused=True,
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=False,
        )  # fmt: skip

    return step


def _adagrad(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> Callable[[], None]:
    group, states = opt.param_groups[0], [opt.state[p] for p in params]
    sums, steps = [s["sum"] for s in states], [s["step"] for s in states]

    def step() -> None:
        adagrad(
            params, [p.grad for p in params], sums, steps, fused=True, lr=group["lr"],
            weight_decay=group["weight_decay"], lr_decay=group["lr_decay"], eps=group["eps"],
            maximize=False,
        )  # fmt: skip

    return step


_FUNCTIONAL: dict[type, Callable[..., Callable[[], None]]] = {
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.SGD: _sgd,
    torch.optim.Adagrad: _adagrad,
}


def constant_lr(opt: torch.optim.Optimizer, cfg: Any) -> Schedule | None:
    """No schedule."""
    return None


def cosine_lr(opt: torch.optim.Optimizer, cfg: Any) -> Schedule | None:
    """Cosine annealing from `lr` to 0 over `max_epochs`."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs)
    return lambda metrics: sched.step()


def plateau_lr(opt: torch.optim.Optimizer, cfg: Any) -> Schedule | None:
    """Halve the rate after 2 epochs without a lower val_loss."""
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    return lambda metrics: sched.step(metrics["val_loss"])


@torch.no_grad()
def add_l1_gradient(weights: list[torch.Tensor], l1: float) -> None:
    """Add the gradient of the L1 penalty `l1 * sum(|w|)` to the weights' gradients:
    `l1 * sign(w)`, as autograd would give for the penalty added to the loss, without its
    graph (which made an epoch of 784-512-512 at batch 128 cost 1.28x one without L1; this,
    1.10x)."""
    for w in weights:
        assert w.grad is not None
        w.grad.add_(w.sign(), alpha=l1)


class Update:
    """One member's update after its gradients are in: L1, clipping, the optimizer's step;
    and once an epoch its schedule. `params`: the member's parameters (a module's, or views
    of its rows of a stack, whose `.grad` the stepper points at its rows of the gradients)."""

    def __init__(
        self, params: list[torch.Tensor], cfg: Any, capturable: bool = False,
        weights: list[torch.Tensor] | None = None,
    ):  # fmt: skip
        self.cfg = cfg
        self.opt = make_optimizer(params, cfg, capturable)
        self.schedule = LR_SCHEDULES.load(cfg.lr_schedule)(self.opt, cfg)
        self._bind(params, weights)

    def _bind(self, params: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> None:
        """`weights`: those L1 applies to, when not every matrix of `params` (a stack's
        biases are matrices too: `hpo.model.StackedMLP.weights`)."""
        self.params = params
        # L1 skips biases (and batch norm's and PReLU's parameters)
        self.weights = weights if weights is not None else [p for p in params if p.dim() > 1]
        self.step_opt = fast_step(self.opt)  # after the schedule, which wraps opt.step

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def __call__(self) -> None:
        if self.cfg.l1:
            add_l1_gradient(self.weights, self.cfg.l1)
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.step_opt()

    def epoch_end(self, metrics: dict[str, float]) -> None:
        if self.schedule is not None:
            self.schedule(metrics)

    def select(
        self, rows: torch.Tensor, params: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> None:
        """Go on over `params`, the rows `rows` of the stacked tensors this update held: the
        optimizer's state of those rows moves to them (a step count stays as it is)."""
        group = self.opt.param_groups[0]
        for old, new in zip(group["params"], params, strict=True):
            state = self.opt.state.pop(old, None)
            if state is not None:
                self.opt.state[new] = {
                    k: v.index_select(0, rows)
                    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == old.shape[0]
                    else v
                    for k, v in state.items()
                }
        group["params"] = list(params)
        self._bind(params, weights)

    def rebind(self, params: list[torch.Tensor]) -> None:
        """Go on over `params` (new tensors of the same shapes, holding the same values): the
        optimizer's state moves to them."""
        group = self.opt.param_groups[0]
        for old, new in zip(group["params"], params, strict=True):
            if old in self.opt.state:
                self.opt.state[new] = self.opt.state.pop(old)
        group["params"] = list(params)
        self._bind(params)
