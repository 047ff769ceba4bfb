"""What one training step does for the members of a cohort: one module, or K stacked.

The epoch loop (`hpo.train.fit`) is the same for a trial alone and for a cohort; a stepper is
what differs: the forward and backward pass of one batch, each member's `Update` (torch's
optimizer, its schedule, L1, clipping: `hpo.optim`), the epoch's running sums, evaluation,
and each member's weights. `ModuleStepper` trains one `nn.Module`; `StackStepper` trains K
networks of one shape as one stacked model (`hpo.model.StackedMLP`) on the same mini-batches,
so that one step is a handful of batched matrix products for all K instead of K sets of tiny
kernels. A member of a stack is updated over views of its rows of the stacked tensors, by the
same `Update` a module gets, so it follows the curve it would follow trained alone
(`tests/test_fused.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hpo.model import StackedMLP, train_forward
from hpo.optim import Update

Tensors = tuple[torch.Tensor, torch.Tensor]
EVAL_BATCH = 8192  # rows per forward pass when evaluating; bounded so memory stays flat


def row_losses(out: torch.Tensor, y: torch.Tensor, classify: bool) -> torch.Tensor:
    """(members, rows, outputs) and the targets, (rows,) shared or (members, rows) each its
    own -> (members, rows) losses."""
    k, rows = out.shape[:2]
    if classify:
        targets = y.reshape(-1) if y.dim() == 2 else y.repeat(k)
        return F.cross_entropy(out.reshape(k * rows, -1), targets, reduction="none").view(k, rows)
    return (out.squeeze(-1) - y).pow(2)


def member_losses(out: torch.Tensor, y: torch.Tensor, classify: bool) -> torch.Tensor:
    """(members, rows, outputs) and the targets -> each member's mean loss."""
    return row_losses(out, y, classify).mean(1)


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of `t` at `idx`: (rows,) -> (rows, ...), or each member's own (members, rows) ->
    (members, rows, ...)."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


def padded_rows(data: Tensors, rows: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each member's own rows of `data` stacked, padded to the longest with its last row:
    X (members, n, features), y (members, n), and which rows count (members, n)."""
    n = max(len(r) for r in rows)
    idx = torch.stack([torch.cat([r, r[-1:].expand(n - len(r))]) for r in rows])
    valid = torch.stack(
        [torch.arange(n, device=idx.device) < len(r) for r in rows]
    ).float()  # fmt: skip
    return gather_rows(data[0], idx), gather_rows(data[1], idx), valid


def metrics_of(loss: float, accuracy: float, cfg: Any) -> dict[str, float]:
    """An epoch's loss and accuracy (classification) or RMSE in the target's unit."""
    if cfg.task == "classification":
        return {"loss": loss, "accuracy": accuracy}
    return {"loss": loss, "rmse": math.sqrt(max(loss, 0.0)) * cfg.y_scale}


def evaluate_members(
    forward: Callable[[torch.Tensor], torch.Tensor], k: int, data: tuple[torch.Tensor, ...],
    cfg: Any, precision: Callable[[], Any],
) -> list[dict[str, float]]:  # fmt: skip
    """Each of `k` members' loss and accuracy (or RMSE) over a whole split, in large batches
    without gradients; `forward`: rows -> (members, rows, outputs), called under
    `precision()` (bf16 autocast or nothing) and `torch.inference_mode()`. `data`: (X, y)
    shared by the members, or each member's own from `padded_rows`."""
    X, y = data[0], data[1]
    valid = data[2] if len(data) > 2 else None  # each member's own rows: which are padding
    classify = cfg.task == "classification"
    rows = max(256, EVAL_BATCH // k)
    loss_sum = torch.zeros(k, device=X.device)
    correct = torch.zeros(k, device=X.device)
    n_rows = y.shape[-1]
    with torch.inference_mode():
        for start in range(0, n_rows, rows):
            part = slice(start, start + rows)
            xb, yb = (X[:, part], y[:, part]) if y.dim() == 2 else (X[part], y[part])
            with precision():
                out = forward(xb).float()  # the loss in float32
            losses = row_losses(out, yb, classify)
            hits = out.argmax(-1) == yb if classify else None
            if valid is not None:
                losses = losses * valid[:, part]
                hits = hits * valid[:, part] if hits is not None else None
            loss_sum += losses.sum(1)
            if hits is not None:
                correct += hits.sum(1)
    both = torch.stack([loss_sum, correct]).tolist()  # one host sync per split
    counts = valid.sum(1).tolist() if valid is not None else [n_rows] * k
    return [
        metrics_of(loss / max(n, 1), hits / max(n, 1), cfg)
        for loss, hits, n in zip(*both, counts, strict=True)
    ]


class ModuleStepper:
    """A trial alone: one `nn.Module` and its `Update`."""

    def __init__(
        self, model: nn.Module, cfg: Any, data: Tensors, cast: Callable[[], Any],
        capturable: bool,
    ):  # fmt: skip
        self.model, self.cfg, self.cast = model, cfg, cast
        self.params = list(model.parameters())
        self.updates = [Update(self.params, cfg, capturable)]
        self.X, self.y = data
        self.classify = cfg.task == "classification"
        # The epoch's running sums on the device (no host sync per step), the same tensors
        # every epoch, which a CUDA graph of the step adds to.
        self.sums = torch.zeros(2, 1, device=self.X.device)
        self.generators: tuple[torch.Generator, ...] = ()

    def train_mode(self) -> None:
        self.model.train()

    def step(self, idx: torch.Tensor) -> None:
        idx = idx.view(-1)  # (1, rows) when the member has its own rows
        xb, yb = self.X.index_select(0, idx), self.y.index_select(0, idx)  # 2x faster than X[idx]
        with self.cast():
            out = train_forward(self.model, xb)
            if self.classify:
                loss = F.cross_entropy(out, yb)
            else:
                loss = F.mse_loss(out.squeeze(1), yb)
        for p in self.params:  # opt.zero_grad(set_to_none=True) in a tenth the time
            p.grad = None
        loss.backward()
        self.updates[0]()
        self.sums[0].add_(loss.detach() * len(idx))
        if self.classify:
            self.sums[1].add_((out.detach().argmax(1) == yb).sum())

    def evaluate(self, data: Tensors) -> list[dict[str, float]]:
        self.model.eval()
        return evaluate_members(lambda x: self.model(x).unsqueeze(0), 1, data, self.cfg, self.cast)

    def kept(self, row: int) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def finish(self, row: int, state: dict[str, torch.Tensor] | None, steps: int) -> None:
        """The member at `row` stops, holding `state` (its kept weights) or, with None, its
        weights as they are, after `steps` steps."""
        if state:
            self.model.load_state_dict(state)

    def epoch_end(self, metrics: dict[int, dict[str, float]]) -> None:
        """Each member's schedule, with its epoch's metrics (by row)."""
        for row, m in metrics.items():
            self.updates[row].epoch_end(m)

    def keep(self, rows: list[int]) -> None:
        """Only the members at `rows` go on (a module has one: none do)."""


def one_update(cfgs: list[Any]) -> bool:
    """Whether members with these training settings can share one `Update`: the same
    settings but for their seeds, no per-member gradient clipping, and a schedule that reads
    no member's own metric."""
    first = replace(cfgs[0], seed=0, shuffle_seed=None)
    return (
        first.grad_clip == 0
        and first.lr_schedule != "plateau"
        and all(replace(c, seed=0, shuffle_seed=None) == first for c in cfgs[1:])
    )


class StackStepper:
    """K networks of one shape (`hpo.space.structure`), trained as one `StackedMLP`."""

    def __init__(
        self, models: list[nn.Sequential], cfgs: list[Any], data: Tensors,
        cast: Callable[[], Any], capturable: bool, seed: int,
    ):  # fmt: skip
        self.models, self.cfgs, self.cast = models, cfgs, cast
        self.X, self.y = data
        self.classify = cfgs[0].task == "classification"
        self.stack = StackedMLP(models)
        self.members = list(range(len(models)))  # the member of each row of the stack
        # Members of one configuration (a trial's repeats and folds) share one update over the
        # stacked tensors: an optimizer's step, L1 and a schedule that reads no member's own
        # metric act on each element alone, so one call does what K would, in a fifth of the
        # time for five members. Per-member clipping and the plateau schedule need their own.
        self.shared = len(cfgs) > 1 and one_update(cfgs)
        if self.shared:
            shared = Update(self.stack.params, cfgs[0], capturable, self.stack.weights())
            self.updates = [shared] * len(cfgs)
        else:
            self.updates = [Update(self._views(row), c, capturable) for row, c in enumerate(cfgs)]
        # Each member's dropout masks are its own draws, from one generator for the stack.
        self.masks = torch.Generator(device=self.X.device).manual_seed(seed + 1)
        self.generators = (self.masks,)
        self.sums = torch.zeros(2, len(models), device=self.X.device)
        self.own_val: tuple[torch.Tensor, ...] | None = None  # each member's, `padded_rows`

    def _views(self, row: int) -> list[torch.Tensor]:
        """The member at `row`'s parameters: views of its rows of the stacked tensors, which
        its optimizer updates in place."""
        return [p.detach()[row] for p in self.stack.params]

    def train_mode(self) -> None:
        pass  # the stack is told at each forward pass

    def step(self, idx: torch.Tensor) -> None:
        """One batch: rows `idx` shared by the members, or each member's own (members, rows)."""
        xb, yb = gather_rows(self.X, idx), gather_rows(self.y, idx)
        with self.cast():
            out = self.stack.forward(xb, self.masks, training=True)
            losses = member_losses(out, yb, self.classify)
        for p in self.stack.params:
            p.grad = None
        losses.sum().backward()
        if self.shared:
            self.updates[0]()
        else:
            # Each member's gradients are its rows of the stack's.
            for j, p in enumerate(self.stack.params):
                for update, grad in zip(self.updates, p.grad.unbind(0), strict=True):  # type: ignore[union-attr]
                    update.params[j].grad = grad
            for update in self.updates:
                update()
        self.sums[0].add_(losses.detach() * idx.shape[-1])
        if self.classify:
            self.sums[1].add_((out.detach().argmax(-1) == yb).sum(1))

    def evaluate(self, data: Tensors) -> list[dict[str, float]]:
        k = len(self.members)
        return evaluate_members(
            lambda x: self.stack.forward(x, None, training=False), k, self.own_val or data,
            self.cfgs[0], self.cast,
        )  # fmt: skip

    def kept(self, row: int) -> dict[str, torch.Tensor]:
        return self.stack.member_state(row)

    def epoch_end(self, metrics: dict[int, dict[str, float]]) -> None:
        """Each member's schedule, with its epoch's metrics (by row); a shared one once."""
        if self.shared:
            if metrics:
                self.updates[0].epoch_end(next(iter(metrics.values())))
            return
        for row, m in metrics.items():
            self.updates[row].epoch_end(m)

    def finish(self, row: int, state: dict[str, torch.Tensor] | None, steps: int) -> None:
        model = self.models[self.members[row]]
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):  # what nn.BatchNorm1d counts itself
                module.num_batches_tracked.fill_(steps)
        model.load_state_dict(state or self.stack.member_state(row))

    def keep(self, rows: list[int]) -> None:
        kept = torch.tensor(rows, device=self.X.device)
        self.stack.keep(kept)
        if self.own_val is not None:
            self.own_val = tuple(t.index_select(0, kept) for t in self.own_val)
        self.members = [self.members[r] for r in rows]
        if self.shared:
            self.updates[0].select(kept, self.stack.params, self.stack.weights())
            self.updates = self.updates[: len(rows)]
        else:
            self.updates = [self.updates[r] for r in rows]
            for row, update in enumerate(self.updates):
                update.rebind(self._views(row))
        self.sums = torch.zeros(2, len(rows), device=self.X.device)
