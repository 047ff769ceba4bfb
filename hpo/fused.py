"""Fused trials: K networks of one shape trained as one stacked model on the same mini-batches.

A cohort's members share everything that changes the network's shape or the step's code
(`STRUCTURAL`: depth, widths, activation, batch norm, batch size, optimizer, Nesterov, schedule)
and each keeps its own initialisation, learning rate, weight decay, L1, dropout, momentum,
gradient clipping, early stopping and pruning. Their weights are stacked along a leading member
dimension (`hpo.model.StackedMLP`), so one step is a handful of batched matrix products for all
K instead of K sets of tiny kernels: the first layer is a single product of the shared batch
with every member's weights side by side, the others are batched products.

The optimizers are torch's own: on a CPU its fused kernels, called on each member's rows of the
stacked tensors (`_MemberKernels`); elsewhere its formulas written over the stacked tensors,
with each member's hyperparameters as a vector (`_Optimizer`). Either way a member follows the
curve it would follow trained alone (see `tests/test_fused.py`). A member that stops (early
stopping, pruning, a non-finite loss) is handed back at once with its best weights and dropped
from the stack; the others go on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hpo.model import StackedMLP
from hpo.train import (
    EVAL_BATCH,
    STOP_REASONS,
    Flag,
    StepGraph,
    Tensors,
    TrainConfig,
    TrainResult,
    Watch,
    _metrics,
    add_l1_gradient,
    matmul_precision,
    products,
    training_loop,
)

# Hyperparameters a cohort shares: they change the network's shape or the step's code.
STRUCTURAL = (
    "n_layers",
    "width",
    "activation",
    "batchnorm",
    "batch_size",
    "optimizer",
    "nesterov",
    "lr_schedule",
)
FUSABLE_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "nadam")

# Torch's defaults for the settings the spec does not expose.
BETAS = (0.9, 0.999)
ADAM_EPS, RMS_ALPHA, RMS_EPS, ADAGRAD_EPS, NADAM_DECAY = 1e-8, 0.99, 1e-8, 1e-10, 4e-3


def is_structural(name: str) -> bool:
    """Whether a parameter name (per-layer widths are `width_0`, `width_1`, ...) is shared."""
    return name in STRUCTURAL or name.startswith("width_")


def structure(config: dict[str, Any]) -> tuple:
    """What members of one cohort must have in common."""
    return (
        tuple(int(w) for w in config["widths"]),
        config["activation"],
        bool(config["batchnorm"]),
        int(config["batch_size"]),
        config["optimizer"],
        bool(config["nesterov"]),
        config["lr_schedule"],
    )


# (member index, epoch, metrics) -> None or a stop reason, for every member still training.
EpochHook = Callable[[dict[int, dict[str, float]], int], dict[int, str | None]]
DoneHook = Callable[[int, TrainResult], None]


class _Optimizer:
    """Torch's update rules over stacked tensors, each member with its own settings."""

    def __init__(self, name: str, nesterov: bool, hp: dict[str, torch.Tensor], n: int):
        self.name, self.nesterov, self.hp = name, nesterov, hp
        self.state: dict[str, list[torch.Tensor | None]] = {
            key: [None] * n for key in ("m", "v", "buf")
        }
        # The step count and NAdam's product of momenta live on the device, so that a CUDA
        # graph of the step (`StepGraph`) advances them at each replay; in float64, as the
        # Python numbers they were (in float32, NAdam's float32 updates moved by 1e-5).
        device = hp["lr"].device
        self.t = torch.zeros((), dtype=torch.float64, device=device)
        self.mu_product = torch.ones((), dtype=torch.float64, device=device)
        self.lr: torch.Tensor | None = None
        self._update = getattr(self, f"_{name}")
        self._note_decay()

    def _note_decay(self) -> None:
        # Known on the host once, not read back from the device every step.
        self.decay = bool((self.hp["weight_decay"] != 0).any())

    def _per(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The members' setting `name`, shaped to broadcast over `like`."""
        return self._view(self.hp[name], like)

    def set_rates(self, rates: list[float]) -> None:
        """Each member's learning rate from now on (an epoch's, schedule applied): on the
        device once, not every step, into the same tensor while the members stay."""
        new = torch.tensor(rates, dtype=self.hp["lr"].dtype)
        if self.lr is not None and self.lr.shape == new.shape:
            self.lr.copy_(new)
        else:
            self.lr = new.to(self.hp["lr"].device)

    @torch.no_grad()
    def step(self, params: list[torch.Tensor]) -> None:
        """One update of every member. In place where torch's rule allows: the update is a
        few passes over memory, which is most of a step for a wide net on a CPU."""
        assert self.lr is not None, "set_rates first"
        t = self.t.add_(1)
        self._prepare(t)
        decay = self.decay
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                continue
            lr_p = self._view(self.lr, p)
            if decay and self.name == "adamw":
                p.mul_(1 - lr_p * self._per("weight_decay", p))
            elif decay:
                g = g.addcmul(p, self._per("weight_decay", p))
            self._update(i, p, g, lr_p)
        if self.name == "nadam":
            self.mu_product.mul_(self.mu)

    def _prepare(self, t: torch.Tensor) -> None:
        """What a step's update of every tensor shares: the bias corrections, from `t`."""
        b1, b2 = BETAS
        if self.name in ("adam", "adamw"):
            self.step_size = self.lr / (1 - b1**t)  # type: ignore[operator]
            self.bias2_sqrt = (1 - b2**t).sqrt()
        elif self.name == "nadam":
            self.mu, mu_next = self._mu(t), self._mu(t + 1)
            product = self.mu_product * self.mu
            self.bias2 = 1 - b2**t
            self.grad_scale = self.lr * (1 - self.mu) / (1 - product)  # type: ignore[operator]
            self.m_scale = self.lr * mu_next / (1 - product * mu_next)  # type: ignore[operator]

    @staticmethod
    def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A member vector shaped to broadcast over one stacked tensor."""
        return v.view(-1, *([1] * (like.dim() - 1)))

    def _zeros(self, key: str, i: int, p: torch.Tensor) -> torch.Tensor:
        s = self.state[key][i]
        if s is None:
            s = self.state[key][i] = torch.zeros_like(p)
        return s

    def _sgd(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        momentum = self._per("momentum", p)
        buf = self.state["buf"][i]
        buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
        self.state["buf"][i] = buf
        d = g.addcmul(momentum, buf) if self.nesterov else buf
        p.addcmul_(d, lr, value=-1)

    def _adam(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        b1, b2 = BETAS
        m, v = self._zeros("m", i, p), self._zeros("v", i, p)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = v.sqrt().div_(self.bias2_sqrt).add_(ADAM_EPS)
        step = torch.div(m, denom, out=denom)  # torch's order: step size x (m / denom)
        p.addcmul_(step, self._view(self.step_size, p), value=-1)

    _adamw = _adam

    def _rmsprop(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor):
        sq = self._zeros("v", i, p)
        sq.mul_(RMS_ALPHA).addcmul_(g, g, value=1 - RMS_ALPHA)
        buf = self._zeros("buf", i, p)
        # momentum 0: buf is this step's
        buf.mul_(self._per("momentum", p)).addcdiv_(g, sq.sqrt().add_(RMS_EPS))
        p.addcmul_(buf, lr, value=-1)

    def _adagrad(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor):
        total = self._zeros("v", i, p)
        total.addcmul_(g, g)
        denom = total.sqrt().add_(ADAGRAD_EPS)
        p.addcmul_(torch.div(g, denom, out=denom), lr, value=-1)

    @staticmethod
    def _mu(t: torch.Tensor) -> torch.Tensor:
        return BETAS[0] * (1.0 - 0.5 * 0.96 ** (t * NADAM_DECAY))

    def _nadam(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
        b1, b2 = BETAS
        m, v = self._zeros("m", i, p), self._zeros("v", i, p)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v / self.bias2).sqrt().add_(ADAM_EPS)
        p.sub_(self._view(self.grad_scale, p) * g / denom)
        p.sub_(self._view(self.m_scale, p) * m / denom)

    def keep(self, rows: torch.Tensor) -> None:
        for key, tensors in self.state.items():
            self.state[key] = [None if s is None else s.index_select(0, rows) for s in tensors]
        self.hp = {k: v.index_select(0, rows) for k, v in self.hp.items()}
        self._note_decay()


class _MemberKernels(_Optimizer):
    """On a CPU, each member's update is torch's own fused kernel for its optimizer (the one
    `train` uses there), called on that member's rows of the stacked tensors with its own
    rate and weight decay: one pass over memory a member instead of one per operation of the
    update rule, which is a large part of a wide member's step (784-512-512-10, K = 8, Adam:
    13% of the step). The vectorized rules above serve CUDA, where one launch per operation
    for all K beats K launches, and the optimizers without a fused kernel."""

    KERNELS = {
        "adam": torch._fused_adam_,
        "adamw": torch._fused_adamw_,
        "sgd": torch._fused_sgd_,
        "adagrad": torch._fused_adagrad_,
    }

    @classmethod
    def fits(cls, name: str, device: torch.device) -> bool:
        return device.type == "cpu" and name in cls.KERNELS

    def __init__(self, name: str, nesterov: bool, hp: dict[str, torch.Tensor], n: int):
        super().__init__(name, nesterov, hp, n)
        self.kernel = self.KERNELS[name]
        self.steps = 0
        self.count = torch.zeros((), dtype=torch.float32)  # the step, as the kernels read it
        self._note_host()

    def _note_host(self) -> None:
        self.host = {k: v.tolist() for k, v in self.hp.items()}  # once, not every step

    def _rows(self, key: str, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Each state tensor split into its members' rows, made (zeros) on first use."""
        return [self._zeros(key, i, p).unbind(0) for i, p in enumerate(params)]

    def set_rates(self, rates: list[float]) -> None:
        self.rates = rates  # the kernels take each member's rate as a number

    @torch.no_grad()
    def step(self, params: list[torch.Tensor]) -> None:
        self.steps += 1
        self.count.fill_(self.steps)
        first = self.steps == 1
        weights = [p.detach().unbind(0) for p in params]
        grads = [p.grad.unbind(0) for p in params]  # type: ignore[union-attr]
        counts = [self.count] * len(params)
        decay = self.host["weight_decay"]
        if self.name in ("adam", "adamw"):
            m, v = self._rows("m", params), self._rows("v", params)
        elif self.name == "adagrad":
            m = self._rows("v", params)
        elif any(self.host["momentum"]):
            m = self._rows("buf", params)
        for k, rate in enumerate(self.rates):
            own = ([w[k] for w in weights], [g[k] for g in grads])
            if self.name in ("adam", "adamw"):
                b1, b2 = BETAS
                self.kernel(
                    *own, [s[k] for s in m], [s[k] for s in v], [], counts, lr=rate, beta1=b1,
                    beta2=b2, weight_decay=decay[k], eps=ADAM_EPS, amsgrad=False,
                    maximize=False,
                )  # fmt: skip
            elif self.name == "adagrad":
                self.kernel(
                    *own, [s[k] for s in m], counts, lr=rate, lr_decay=0.0,
                    weight_decay=decay[k], eps=ADAGRAD_EPS, maximize=False,
                )  # fmt: skip
            else:
                momentum = self.host["momentum"][k]
                self.kernel(
                    *own, [s[k] for s in m] if momentum else [], weight_decay=decay[k],
                    momentum=momentum, lr=rate, dampening=0.0, nesterov=self.nesterov,
                    maximize=False, is_first_step=first,
                )  # fmt: skip

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self._note_host()


class _Schedule:
    """Each member's learning-rate factor, as `train`'s schedules set it."""

    def __init__(self, name: str, max_epochs: int, n: int):
        self.name, self.max_epochs = name, max_epochs
        self.factor = [1.0] * n
        self.plateau_best = [math.inf] * n
        self.plateau_bad = [0] * n

    def step(self, epoch: int, member: int, metrics: dict[str, float]) -> None:
        if self.name == "cosine":
            self.factor[member] = (1 + math.cos(math.pi * epoch / self.max_epochs)) / 2
        elif self.name == "plateau":  # ReduceLROnPlateau(factor=0.5, patience=2), mode min
            value = metrics["val_loss"]
            if value < self.plateau_best[member] * (1 - 1e-4):
                self.plateau_best[member], self.plateau_bad[member] = value, 0
            else:
                self.plateau_bad[member] += 1
            if self.plateau_bad[member] > 2:
                self.factor[member] *= 0.5
                self.plateau_bad[member] = 0

    def keep(self, rows: list[int]) -> None:
        for name in ("factor", "plateau_best", "plateau_bad"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in rows])


def _per_member_loss(out: torch.Tensor, y: torch.Tensor, classify: bool) -> torch.Tensor:
    """(members, rows, outputs) and (rows,) -> each member's mean loss."""
    k, rows = out.shape[:2]
    if classify:
        losses = F.cross_entropy(out.reshape(k * rows, -1), y.repeat(k), reduction="none")
        return losses.view(k, rows).mean(1)
    return (out.squeeze(-1) - y).pow(2).mean(1)


def evaluate_stack(stack: StackedMLP, data: Tensors, cfg: TrainConfig) -> list[dict[str, float]]:
    """Each member's loss and accuracy (or RMSE) over a whole split, in large batches."""
    X, y = data
    k = stack.params[0].shape[0]
    classify = cfg.task == "classification"
    rows = max(256, EVAL_BATCH // k)
    loss_sum = torch.zeros(k, device=X.device)
    correct = torch.zeros(k, device=X.device)
    cast = matmul_precision(cfg.precision, X.device)
    with torch.inference_mode(), products(cfg.precision, X.device):
        for start in range(0, len(X), rows):
            with cast():
                out = stack.forward(X[start : start + rows], None, None, training=False).float()
            yb = y[start : start + rows]
            loss_sum += _per_member_loss(out, yb, classify) * len(yb)
            if classify:
                correct += (out.argmax(-1) == yb).sum(1)
    both = torch.stack([loss_sum, correct]).tolist()  # one host sync per split
    n = max(len(X), 1)
    return [_metrics(loss / n, hits / n, cfg) for loss, hits in zip(*both, strict=True)]


@training_loop
def train_cohort(
    models: list[nn.Sequential],
    cfgs: list[TrainConfig],
    dropouts: list[float],
    activation: str,
    train_data: Tensors,
    val_data: Tensors,
    on_epoch_end: EpochHook | None = None,
    on_done: DoneHook | None = None,
    interrupt: Flag | None = None,
) -> list[TrainResult]:
    """Train the members together; each model ends holding its kept weights.

    `on_epoch_end({member: metrics}, epoch)` answers each member still training with None or
    a stop reason; `on_done(member, result)` hears of each member as soon as it stops, with
    its model already holding its kept weights.
    """
    X, y = train_data
    device = X.device
    lead = cfgs[0]
    n = len(X)
    batch = lead.batch_size
    shuffle_seed = lead.seed if lead.shuffle_seed is None else lead.shuffle_seed
    gen = torch.Generator(device=device).manual_seed(shuffle_seed)
    masks = torch.Generator(device=device).manual_seed(shuffle_seed + 1)
    classify = lead.task == "classification"
    stack = StackedMLP(models, activation)
    cast = matmul_precision(lead.precision, device)

    dtype = stack.params[0].dtype  # the members' rates in the weights' own precision

    names = ("lr", "weight_decay", "momentum", "l1", "grad_clip")
    table = [[float(getattr(c, k)) for c in cfgs] for k in names] + [[float(d) for d in dropouts]]
    # One copy to the device for all the vectors: each copy waits for the device on a GPU.
    vectors = torch.tensor(table, device=device, dtype=dtype).unbind(0)
    hp = dict(zip((*names, "dropout"), vectors, strict=True))
    kind = _MemberKernels if _MemberKernels.fits(lead.optimizer, device) else _Optimizer
    opt = kind(lead.optimizer, lead.nesterov, hp, len(stack.params))
    schedule = _Schedule(lead.lr_schedule, lead.max_epochs, len(models))
    members = list(range(len(models)))  # original index of each row of the stack
    results = [TrainResult() for _ in models]
    watches = [Watch(c) for c in cfgs]
    best: list[dict[str, torch.Tensor] | None] = [None] * len(models)
    n_used = n - 1 if n % batch == 1 and n > 1 else n
    steps = 0

    def finish(row_members: list[int]) -> None:
        nonlocal steps
        for m in row_members:
            result = results[m]
            for module in models[m].modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.num_batches_tracked.fill_(steps)
            if cfgs[m].restore_best and best[m]:
                models[m].load_state_dict(best[m])  # type: ignore[arg-type]
            elif result.history and not result.failure:
                result.best_epoch = len(result.history)
                models[m].load_state_dict(stack.member_state(members.index(m)))
            if on_done is not None:
                on_done(m, result)

    # The epoch's running sums, the same tensors while the members stay (a CUDA graph of the
    # step adds to them), and what the step does this epoch.
    sums = torch.zeros(2, len(members), device=device)
    now = {"l1": False, "clip": False, "dropout": False}

    def step(idx: torch.Tensor) -> None:
        xb, yb = X.index_select(0, idx), y.index_select(0, idx)
        with cast():
            out = stack.forward(xb, opt.hp["dropout"] if now["dropout"] else None, masks, True)
            losses = _per_member_loss(out, yb, classify)
        for p in stack.params:
            p.grad = None
        losses.sum().backward()
        if now["l1"]:
            add_l1_gradient(stack.weights(), opt.hp["l1"].view(-1, 1, 1))
        if now["clip"]:
            _clip(stack.params, opt.hp["grad_clip"])
        opt.step(stack.params)
        sums[0].add_(losses.detach() * len(idx))
        if classify:
            sums[1].add_((out.detach().argmax(-1) == yb).sum(1))

    graph = StepGraph(step, batch, device, generators=(masks,))

    for epoch in range(1, lead.max_epochs + 1):
        if not members:
            break
        t0 = time.perf_counter()
        k = len(members)
        perm = torch.randperm(n, device=device, generator=gen)
        if sums.shape[1] != k:
            sums = torch.zeros(2, k, device=device)
        sums.zero_()
        # Decided on the host from the members' settings: no reads from the device here.
        rates = [float(cfgs[m].lr) * schedule.factor[row] for row, m in enumerate(members)]
        opt.set_rates(rates)
        now["l1"] = any(cfgs[m].l1 > 0 for m in members)
        now["clip"] = any(cfgs[m].grad_clip > 0 for m in members)
        now["dropout"] = any(dropouts[m] > 0 for m in members)
        for start in range(0, n_used, batch):
            if interrupt is not None and interrupt.is_set():
                break
            idx = perm[start : min(start + batch, n_used)]
            # A graph of the step holds the stack's tensors: captured again once they change.
            graph(idx, key=(k, *now.values()))
            steps += 1
        if interrupt is not None and interrupt.is_set():
            for m in members:
                results[m].stopped_by = "interrupted"
            finish(members)
            break
        both = sums.tolist()
        val = evaluate_stack(stack, val_data, lead)
        seconds = time.perf_counter() - t0
        epoch_metrics: dict[int, dict[str, float]] = {}
        stopped: dict[int, str] = {}
        for row, m in enumerate(members):
            tr = _metrics(both[0][row] / n_used, both[1][row] / n_used, cfgs[m])
            metrics = {f"train_{a}": v for a, v in tr.items()}
            metrics |= {f"val_{a}": v for a, v in val[row].items()}
            metrics["lr"] = rates[row]
            metrics["epoch_seconds"] = seconds
            results[m].history.append(metrics)
            bad = [a for a in ("train_loss", "val_loss") if not math.isfinite(metrics[a])]
            if bad:
                results[m].failure = f"{bad[0]} became {metrics[bad[0]]} at epoch {epoch}"
                stopped[m] = "diverged"
                continue
            if watches[m].update(metrics[cfgs[m].monitor], first=best[m] is None):
                results[m].best_epoch = epoch
                best[m] = stack.member_state(row) if cfgs[m].restore_best else {}
            schedule.step(epoch, row, metrics)
            epoch_metrics[m] = metrics
        decisions = on_epoch_end(epoch_metrics, epoch) if on_epoch_end else {}
        for m in epoch_metrics:
            stop = decisions.get(m)
            if stop is not None:
                if stop not in STOP_REASONS:
                    raise ValueError(f"on_epoch_end must answer None or a stop reason: {stop!r}")
                stopped[m] = stop
            elif watches[m].bad_epochs >= cfgs[m].patience:
                stopped[m] = "early_stopping" if epoch < lead.max_epochs else "max_epochs"
            elif epoch == lead.max_epochs:
                stopped[m] = "max_epochs"
        if stopped:
            for m, why in stopped.items():
                results[m].stopped_by = why
            finish([m for m in members if m in stopped])
            rows = [row for row, m in enumerate(members) if m not in stopped]
            members = [members[row] for row in rows]
            if members:
                keep = torch.tensor(rows, device=device)
                stack.keep(keep)
                opt.keep(keep)
                schedule.keep(rows)
    return results


def _clip(params: list[torch.Tensor], max_norm: torch.Tensor) -> None:
    """`clip_grad_norm_` per member: each member's gradients scaled to at most its norm."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(g.pow(2).flatten(1).sum(1) for g in grads)
    norm = torch.as_tensor(sq).sqrt()
    coef = torch.where(max_norm > 0, (max_norm / (norm + 1e-6)).clamp(max=1.0), 1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
