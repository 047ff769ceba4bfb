"""Fit diagnosis: read a trial's per-epoch curves as a practitioner would.

Plain data in (the history of per-epoch metric dicts), a label and one sentence of evidence out.
The label describes the weights the trial kept (its best epoch when early stopping restored it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple

# Thresholds, as fractions of the chance-level loss (ln K for K classes; 1.0 for standardised
# regression targets, the MSE of always predicting the mean).
HIGH_TRAIN_LOSS = 0.35  # kept train_loss above this never fitted its own training data
PEER_FACTOR = 3.0  # ... or above 3x the median of the other trials' (and above MIN_PEER_LOSS)
MIN_PEER_LOSS = 0.1
GAP = 0.1  # a val - train loss gap above this, and growing, is overfitting
RISE = 0.10  # val_loss 10% above its minimum while train_loss fell: overfitting
STEEP = 0.03  # val_loss still falling by 3% or more per epoch at the end: cut short


class Diagnosis(NamedTuple):
    label: str  # "overfit" | "underfit" | "good"
    evidence: str


def chance_loss(task: str, n_classes: int | None) -> float:
    """Loss of a model that knows nothing: ln K for K classes, 1.0 for standardised regression."""
    if task == "classification" and n_classes and n_classes > 1:
        return math.log(n_classes)
    return 1.0


def diagnose_fit(
    history: Sequence[dict[str, float]],
    kept_epoch: int | None = None,
    chance: float = 1.0,
    peer_train_losses: Sequence[float] = (),
    stopped_by: str = "max_epochs",
) -> Diagnosis:
    """Label a trial `overfit`, `underfit` or `good` from its train_loss and val_loss curves.

    kept_epoch: the epoch whose weights the trial kept (default: the last).
    stopped_by: why training ended: "max_epochs", "early_stopping" or "pruned".
    """
    tl = [h["train_loss"] for h in history]
    vl = [h["val_loss"] for h in history]
    n = len(vl)
    if n == 0:
        return Diagnosis("underfit", "no epoch finished")
    k = min(kept_epoch or n, n)
    m = min(range(k), key=vl.__getitem__) + 1  # epoch of the lowest val_loss up to the kept one
    after = _rise_after(vl, k)

    # Overfitting in the kept weights: validation loss turned up while training loss kept falling.
    rise = (vl[k - 1] - vl[m - 1]) / max(vl[m - 1], 1e-12)
    if m < k and rise > RISE and tl[k - 1] < tl[m - 1]:
        return Diagnosis(
            "overfit",
            f"val_loss bottomed at epoch {m} ({vl[m - 1]:.3g}) and rose {rise:.0%} by epoch {k} "
            f"while train_loss fell to {tl[k - 1]:.3g}; final gap {vl[k - 1] - tl[k - 1]:.3g}",
        )
    # Underfitting: the model does not fit even its training data.
    if tl[k - 1] > HIGH_TRAIN_LOSS * chance:
        return Diagnosis(
            "underfit",
            f"train_loss stayed high: {tl[k - 1]:.3g} at epoch {k}, "
            f"{tl[k - 1] / chance:.0%} of the chance level {chance:.3g}" + after,
        )
    # A growing gap only means overfitting once the model fits its training data.
    gap, early_gap = vl[k - 1] - tl[k - 1], vl[0] - tl[0]
    if k >= 3 and gap > GAP * chance and gap > 2 * max(early_gap, 0.0) + 0.02 * chance:
        return Diagnosis(
            "overfit",
            f"train/validation gap grew from {early_gap:.3g} at epoch 1 to {gap:.3g} at epoch {k} "
            f"(train_loss {tl[k - 1]:.3g}, val_loss {vl[k - 1]:.3g})",
        )
    # ... or fits it far worse than the other trials, or was cut off still learning.
    peers = [p for p in peer_train_losses if math.isfinite(p)]
    if peers:
        median = statistics.median(peers)
        if tl[k - 1] > PEER_FACTOR * median and tl[k - 1] > MIN_PEER_LOSS * chance:
            return Diagnosis(
                "underfit",
                f"train_loss {tl[k - 1]:.3g} at epoch {k} is {tl[k - 1] / median:.1f}x the median "
                f"of the other trials ({median:.3g})" + after,
            )
    if stopped_by != "early_stopping" and k == n and n >= 3:
        slope = (vl[-3] - vl[-1]) / 2 / max(vl[-3], 1e-12)
        if slope > STEEP:
            why = "was pruned" if stopped_by == "pruned" else "ran out of epochs"
            return Diagnosis(
                "underfit",
                f"still improving when it {why}: val_loss fell {slope:.0%} per epoch over the "
                f"last 2 epochs to {vl[-1]:.3g} at epoch {n}",
            )

    return Diagnosis(
        "good",
        f"val_loss {vl[k - 1]:.3g} and train_loss {tl[k - 1]:.3g} at kept epoch {k}, "
        f"gap {gap:.3g}" + after,
    )


def _rise_after(vl: Sequence[float], k: int) -> str:
    """How far validation loss rose after the kept epoch (what early stopping rescued)."""
    if k >= len(vl):
        return ""
    rise = (vl[-1] - vl[k - 1]) / max(vl[k - 1], 1e-12)
    if rise <= 0:
        return ""
    return (
        f"; early stopping kept epoch {k}, after which val_loss rose {rise:.0%} by epoch {len(vl)}"
    )
