"""Fit diagnosis: read a trial's per-epoch curves as a practitioner would.

Plain data in (the history of per-epoch metric dicts), a label and one sentence of evidence out.
The label describes the weights the trial kept (its best epoch when early stopping restored it).

Why underfitting is judged on the validation loss: hpo's `train_loss` is the running average
over the epoch, measured with dropout on and while the weights still move, so it overstates how
badly the kept weights fit their training data, and by how much depends on the dropout rate. A
trial with dropout 0.5 and its twin without dropout can reach the same validation accuracy
while their training losses differ by 15-20% of chance. `val_loss` is measured in eval mode,
on the same footing for every trial: two trials with the same `val_loss` get the same verdict.
The training curve is still read, but only for what it shows reliably: whether it kept
falling while `val_loss` rose (overfitting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

# Thresholds, as fractions of the chance-level loss (ln K for K classes; 1.0 for standardised
# regression targets, the MSE of always predicting the mean).
LITTLE = 0.70  # kept val_loss above this: the model learned little, whatever the others did
HIGH_VAL_LOSS = 0.35  # kept val_loss above this is underfit, when the data allows better:
FLOOR = 3.0  # ... an earlier trial's val_loss below val_loss / FLOOR, and this trial's
#               train_loss above that too (it did not fit even its training data as well)
GAP = 0.1  # a val - train loss gap above this, and growing, is overfitting
RISE = 0.10  # val_loss 10% above its minimum while train_loss fell: overfitting ...
MIN_RISE = 0.05  # ... and by at least this much of chance (a loss near 0 moves by % freely)
STEEP = 0.03  # val_loss still falling by 3% or more per epoch at the end: cut short
UNSTABLE = 0.15  # train_loss this much of chance above its lowest, and rising: unstable
NEAR_ZERO = 0.01  # a loss below this much of chance: changes said as shares of chance

FIT_LABELS = ("good", "overfit", "underfit", "unstable")

RULES = (
    "Labels read each trial's curves at the epoch whose weights it kept (a pruned trial, which "
    "keeps none: at its lowest val_loss); chance is the loss of "
    "a model that knows only the class frequencies (the entropy of the training split's "
    "classes: ln K for K balanced classes; 1 for standardised regression). "
    f"Unstable, checked first: train_loss rose over the last 2 epochs to more than "
    f"{UNSTABLE:.0%} of chance above its lowest, or ended that much above the kept epoch's, "
    f"while val_loss ended more than {RISE:.0%} above its lowest: the steps are too large "
    "(usually the learning rate); dropout's noise moves an epoch's average training loss far "
    "less. "
    f"Overfit: val_loss rose more than {RISE:.0%} (and {MIN_RISE:.0%} of chance) above its "
    "minimum while train_loss kept falling, or the train/validation gap grew past "
    f"{GAP:.0%} of chance after val_loss stopped improving; never a model with validation "
    f"accuracy 1.0. Underfit: val_loss above {LITTLE:.0%} of chance; or above "
    f"{HIGH_VAL_LOSS:.0%} of chance while an earlier trial reached a val_loss under 1/{FLOOR:g} "
    "of it and this trial's train_loss stayed above that (proof that this data allows better "
    f"and that the trial did not fit it); or still falling {STEEP:.0%} or "
    "more per epoch when training stopped. Good otherwise. Underfitting is judged on val_loss, "
    "measured without dropout: train_loss is averaged over the epoch with dropout on, and "
    "would call a trial with dropout underfit beside its twin without."
)


class Diagnosis(NamedTuple):
    label: str  # one of FIT_LABELS
    evidence: str


def chance_loss(
    task: str, n_classes: int | None, class_counts: Sequence[int] | None = None
) -> float:
    """Loss of a model that knows only the class frequencies: their entropy (ln K for K
    balanced classes; 0.2 for a 95/5 split), 1.0 for standardised regression."""
    if task != "classification" or not n_classes or n_classes < 2:
        return 1.0
    total = sum(class_counts or ())
    if not total:
        return math.log(n_classes)
    entropy = -sum(c / total * math.log(c / total) for c in class_counts or () if c)
    return entropy if entropy > 0 else math.log(n_classes)


def diagnose_fit(
    history: Sequence[dict[str, float]],
    kept_epoch: int | None = None,
    chance: float = 1.0,
    peer_val_losses: Sequence[float] = (),
    stopped_by: str = "max_epochs",
    lr: float | None = None,
) -> Diagnosis:
    """Label a trial (`FIT_LABELS`) from its train_loss and val_loss curves.

    kept_epoch: the epoch whose weights the trial kept (default: the last; a pruned trial
        keeps none and is read at its lowest val_loss).
    peer_val_losses: the kept val_loss of the trials that completed before this one: the
        lowest says how far this data lets a model's loss on unseen data go down.
    stopped_by: why training ended: "max_epochs", "early_stopping" or "pruned".
    lr: the trial's learning rate, named in the evidence of an unstable trial.
    The rules, in the order they are checked, are `RULES` (and docs/reports.md, "Fit diagnosis").
    """
    tl = [h["train_loss"] for h in history]
    vl = [h["val_loss"] for h in history]
    n = len(vl)
    if n == 0:
        return Diagnosis("underfit", "no epoch finished")
    pruned_note = ""
    if stopped_by == "pruned" and kept_epoch is None:
        seen = [i for i in range(n) if math.isfinite(vl[i])]
        kept_epoch = min(seen, key=vl.__getitem__) + 1 if seen else n
        pruned_note = (
            f" (pruned at epoch {n}; read at its lowest val_loss, epoch {kept_epoch})"
            if kept_epoch < n
            else f" (pruned at epoch {n}, its lowest val_loss)"
        )
    k = min(kept_epoch or n, n)
    unstable = _unstable(history, k, chance, lr)
    if unstable:
        return Diagnosis("unstable", unstable)
    finite = [i for i in range(k) if math.isfinite(vl[i])]
    m = min(finite, key=vl.__getitem__) + 1 if finite else k  # lowest val_loss up to epoch k
    v, t = vl[k - 1], tl[k - 1]
    after = pruned_note or _after_kept(vl, k, stopped_by, chance)
    perfect = history[k - 1].get("val_accuracy") == 1.0  # nothing left to overfit on

    # Overfitting in the kept weights: validation loss turned up while training loss kept falling.
    rose = v - vl[m - 1] if m < k else 0.0
    if not perfect and rose > RISE * vl[m - 1] and rose > MIN_RISE * chance and t < tl[m - 1]:
        return Diagnosis(
            "overfit",
            f"{_move('val_loss', vl, m, k, chance)} while train_loss fell "
            f"{tl[m - 1]:.3g} → {t:.3g}",
        )
    falling = _still_falling(vl, k, stopped_by)
    # Underfitting, plain: the kept weights predict unseen data barely better than chance.
    if not v < LITTLE * chance:
        return Diagnosis(
            "underfit",
            f"learned little: val_loss {v:.3g} at epoch {k} is {_share(v, chance)} of chance "
            f"({chance:.3g}); train_loss {t:.3g}" + (f"; {falling}" if falling else after),
        )
    # A gap that kept growing after val_loss stopped improving is overfitting, once the model
    # fits its training data. Not for weights kept at the lowest val_loss: stopping earlier
    # would not have helped them, and a gap against a train_loss measured with dropout on would
    # favour trials with dropout.
    gap, early_gap = v - t, vl[0] - tl[0]
    if (
        m < k
        and not perfect
        and t < HIGH_VAL_LOSS * chance
        and gap > GAP * chance
        and gap > 2 * max(early_gap, 0.0) + 0.02 * chance
    ):
        return Diagnosis(
            "overfit",
            f"train/validation gap {early_gap:.3g} at epoch 1 → {gap:.3g} at epoch {k} "
            f"(train_loss {t:.3g}, val_loss {v:.3g}), while val_loss had stopped improving "
            f"at epoch {m} ({vl[m - 1]:.3g})",
        )
    # Underfitting against what this data allows: high, and an earlier trial did much better.
    floor_note = ""
    if v > HIGH_VAL_LOSS * chance:
        peers = [p for p in peer_val_losses if math.isfinite(p)]
        best = min(peers) if peers else None
        level = f"val_loss {v:.3g} at epoch {k} is {_share(v, chance)} of chance ({chance:.3g})"
        if best is None:
            floor_note = f"; {level}, with no earlier trial to show whether the data allows better"
        elif v > FLOOR * best and t > best:
            return Diagnosis(
                "underfit",
                f"{level} and train_loss {t:.3g}, while an earlier trial reached val_loss "
                f"{best:.3g}: the data allows better" + after,
            )
        elif v > FLOOR * best:
            floor_note = (
                f"; {level}, though an earlier trial reached val_loss {best:.3g}, but its "
                f"train_loss {t:.3g} is lower than that: it fits its training data"
            )
        else:
            floor_note = (
                f"; {level}, but no earlier trial did better than val_loss {best:.3g}: the "
                "data may allow little better"
            )
    # ... or was cut off while still learning fast.
    if falling:
        return Diagnosis("underfit", falling)  # "when it was pruned" says it

    return Diagnosis(
        "good",
        f"val_loss {v:.3g} and train_loss {t:.3g} at kept epoch {k}, gap {gap:.3g}"
        + floor_note
        + after,
    )


def _still_falling(vl: Sequence[float], k: int, stopped_by: str) -> str:
    """'still improving when it ran out of epochs: ...' when val_loss was still falling by
    STEEP or more per epoch over the last 2 epochs, the last being the kept one; else ''."""
    n = len(vl)
    if stopped_by == "early_stopping" or k != n or n < 3:
        return ""
    slope = (vl[-3] - vl[-1]) / 2 / max(vl[-3], 1e-12)
    if not slope > STEEP:
        return ""
    why = "was pruned" if stopped_by == "pruned" else "ran out of epochs"
    return (
        f"still improving when it {why}: {_move('val_loss', vl, n - 2, n)}, {slope:.0%} per epoch"
    )


def _share(value: float, whole: float) -> str:
    """`value` as a percentage of `whole`, never a bare '0%'."""
    pct = 100 * value / whole
    if abs(pct) >= 1000:  # a loss that exploded: 7926678% says less than 8e+04 times
        return f"{value / whole:.2g} times"
    return f"{pct:.0f}%" if abs(pct) >= 10 or pct == 0 else f"{pct:.2g}%"


def _change(a: float, b: float, chance: float | None = None) -> str:
    """The change from a to b: relative, never printed as a bare '0%'; from a loss near zero
    (under NEAR_ZERO of `chance`) as a share of chance, where a percentage says nothing."""
    if b == a:
        return "unchanged"
    if not (math.isfinite(a) and math.isfinite(b)):
        return "not finite"
    if chance and abs(a) < NEAR_ZERO * chance:
        return f"{b - a:+.2g}, {_share(abs(b - a), chance)} of chance"
    if a == 0:
        return "from zero"
    pct = (b - a) / abs(a) * 100
    return f"{pct:+.0f}%" if abs(pct) >= 10 else f"{pct:+.2g}%"


def _move(key: str, values: Sequence[float], i: int, j: int, chance: float | None = None) -> str:
    """'val_loss 0.31 at epoch 12 → 0.45 at epoch 30 (+45%)' for 1-based epochs i and j."""
    a, b = values[i - 1], values[j - 1]
    return f"{key} {a:.3g} at epoch {i} → {b:.3g} at epoch {j} ({_change(a, b, chance)})"


def _after_kept(vl: Sequence[float], k: int, stopped_by: str, chance: float | None = None) -> str:
    """What happened after the kept epoch (what early stopping, or restoring, rescued)."""
    n = len(vl)
    if k >= n:
        return ""
    who = "early stopping kept" if stopped_by == "early_stopping" else "training kept"
    if abs(vl[-1] - vl[k - 1]) > 0.01 * abs(vl[k - 1]):
        return f"; {who} epoch {k} of {n}: {_move('val_loss', vl, k, n, chance)}"
    return f"; {who} epoch {k} of {n} (val_loss {vl[k - 1]:.3g}), within 1% of it at epoch {n}"


def _unstable(history: Sequence[dict[str, float]], k: int, chance: float, lr: float | None) -> str:
    """The evidence that training went unstable (see `RULES`), or ''."""
    tl = [h["train_loss"] for h in history]
    n = len(tl)
    if not all(math.isfinite(x) for x in tl):
        return ""  # a diverged trial fails with its own reason
    vl = [v for v in (h["val_loss"] for h in history) if math.isfinite(v)]
    if not vl or vl[-1] <= min(vl) * (1 + RISE):
        return ""  # validation did not end worse: a training loss that rises alone is noise
    low = min(range(n), key=tl.__getitem__) + 1  # 1-based epoch of the lowest train_loss
    if n >= 3 and tl[-3] < tl[-2] < tl[-1] and tl[-1] - tl[low - 1] > UNSTABLE * chance:
        end, grew = f"train_loss rose {_moves(tl, low, n)}", tl[-1] - tl[low - 1]
    elif k < n and tl[-1] - tl[k - 1] > UNSTABLE * chance:  # ended high: not a passing spike
        top = max(range(k, n), key=tl.__getitem__) + 1
        end = f"train_loss grew after the kept epoch {k}: {_moves(tl, k, top)}"
        grew = tl[top - 1] - tl[k - 1]
    else:
        return ""
    acc = [h.get("val_accuracy") for h in history]
    if all(a is not None for a in acc) and max(acc) - acc[-1] >= 0.01:  # type: ignore[operator]
        best = max(range(n), key=lambda i: acc[i])  # type: ignore[arg-type,return-value]
        end += f", while val_accuracy fell {acc[best]:.3g} → {acc[-1]:.3g}"
    cause = f"the learning rate (lr {lr:.3g} here)" if lr is not None else "the learning rate"
    return (
        f"{end} ({_share(grew, chance)} of chance): the steps are too large; the usual cause is "
        f"{cause}: lower it, or add a schedule or gradient clipping"
    )


def _moves(values: Sequence[float], i: int, j: int) -> str:
    """'1.35 at epoch 1 → 1.98 at epoch 5' for 1-based epochs i and j."""
    return f"{values[i - 1]:.3g} at epoch {i} → {values[j - 1]:.3g} at epoch {j}"
