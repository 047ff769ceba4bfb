"""An ensemble of a study's best trials: Caruana et al. (2004), "Ensemble selection from
libraries of models": start empty and, `size` times, add (with replacement) the candidate
model that most improves the ensemble's validation metric; a model chosen k times weighs
k / size. The ensemble predicts the weighted mean of its members' class probabilities (or,
for regression, of their values).

Plain tensors in and out: the candidates' outputs on a split, its targets; no Optuna, no
MLflow.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

TINY = 1e-30  # the least probability a log is taken of (as `hpo.serving.Predictor` does)


def combine(outputs: list[torch.Tensor], weights: list[float], classify: bool) -> torch.Tensor:
    """The ensemble's answer from its members' raw outputs (rows, outputs): the weighted mean
    of their probabilities (classification) or of their values."""
    if classify:
        return sum(w * torch.softmax(o.float(), 1) for w, o in zip(weights, outputs, strict=True))
    return sum(w * o.float() for w, o in zip(weights, outputs, strict=True))


def scores(combined: torch.Tensor, y: torch.Tensor, classify: bool, y_scale: float = 1.0):
    """An ensemble's metrics on a split, from `combine`'s answer: loss and accuracy (the loss
    is the negative log-likelihood of the mean probabilities), or loss and RMSE in the
    target's unit."""
    if classify:
        loss = F.nll_loss(torch.log(combined.clamp_min(TINY)), y).item()
        return {"loss": loss, "accuracy": (combined.argmax(1) == y).float().mean().item()}
    mse = (combined.squeeze(1) - y).pow(2).mean().item()
    return {"loss": mse, "rmse": math.sqrt(mse) * y_scale}


def select(
    outputs: list[torch.Tensor], y: torch.Tensor, classify: bool, metric: str, size: int
) -> list[int]:
    """How many times each candidate is chosen in `size` rounds of greedy forward selection
    with replacement, on the study's metric (`val_accuracy`, `val_loss`, `val_rmse`); ties
    on accuracy go to the lower loss, then to the earlier candidate (the better trial)."""
    counts = [0] * len(outputs)
    members = [torch.softmax(o.float(), 1) if classify else o.float() for o in outputs]
    total: torch.Tensor | None = None
    for k in range(size):
        best: tuple[tuple[float, ...], int] | None = None
        for i, m in enumerate(members):
            mean = m if total is None else (total + m) / (k + 1)
            s = scores(mean, y, classify)
            key = (-s["accuracy"], s["loss"]) if metric.endswith("accuracy") else (s["loss"],)
            if best is None or key < best[0]:
                best = (key, i)
        assert best is not None
        counts[best[1]] += 1
        total = members[best[1]] if total is None else total + members[best[1]]
    return counts


class Averaged(torch.nn.Module):
    """Networks as one, for evaluation: the log of their weighted mean probabilities
    (classification: its cross-entropy is the mean's negative log-likelihood) or their
    weighted mean values. The logged model holds them as `hpo.serving.Predictor` pairs."""

    def __init__(self, pairs: list[tuple[float, torch.nn.Module]], classify: bool):
        super().__init__()
        self.pairs, self.classify = pairs, classify
        self.nets = torch.nn.ModuleList([net for _, net in pairs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [net(x) for net in self.nets]
        mean = combine(outputs, [w for w, _ in self.pairs], self.classify)
        return torch.log(mean.clamp_min(TINY)) if self.classify else mean
