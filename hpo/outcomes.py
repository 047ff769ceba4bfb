"""What a study's trials add up to, as functions of plain data (Optuna's `FrozenTrial`s and
hpo's records), shared by the driver, the summary, the reports and `hpo compare`: the one
definition of the best trial, the budget, the counts, what a finished record becomes in
Optuna and in the tracker, and the comparison with the baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.config import metric_direction
from hpo.trial import TrialRecord

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class BaselineComparison:
    """The best baseline against the search's best trial, on validation and on test."""

    metric: str
    name: str  # the best baseline's
    number: int
    value: float
    searched_number: int | None = None  # the best trial that is not a baseline
    searched_value: float | None = None
    test_metric: str = ""
    baseline_test: float | None = None
    searched_test: float | None = None  # when the study's best trial is a searched one

    def sentences(self) -> list[str]:
        """What a reader wants to know, in one or two lines."""
        first = (
            f"best baseline {self.name!r} (trial #{self.number}): {self.metric} = {self.value:.4f}"
        )
        if self.searched_value is None:
            return [first + "; no searched trial completed yet"]
        first += (
            f"; the search's best (trial #{self.searched_number}, {self.searched_value:.4f}) "
            + _verdict(self.metric, self.searched_value, self.value)
        )
        lines = [first]
        if self.baseline_test is not None and self.searched_test is not None:
            lines.append(
                f"on the test split: {self.test_metric} {self.searched_test:.4f} (trial "
                f"#{self.searched_number}) against {self.baseline_test:.4f} (baseline "
                f"{self.name!r}): "
                + _verdict(self.test_metric, self.searched_test, self.baseline_test)
            )
        elif self.baseline_test is not None:
            lines.append(
                f"on the test split: the baseline {self.name!r} is the study's best, "
                f"{self.test_metric} = {self.baseline_test:.4f}"
            )
        return lines


def _verdict(metric: str, ours: float, theirs: float) -> str:
    gain = (ours - theirs) * (1 if metric_direction(metric) == "maximize" else -1)
    if gain > 0:
        return f"beats it by {abs(ours - theirs):.4f}"
    if gain < 0:
        return f"falls short of it by {abs(ours - theirs):.4f}"
    return "ties it"


def rank(value: float, number: int, direction: str) -> tuple[float, int]:
    """A trial's place in the one order of "best": lower ranks first (see `pick_best`)."""
    return (-value if direction.lower() == "maximize" else value), number


def pick_best(trials: list[FrozenTrial], direction: str) -> FrozenTrial | None:
    """The best complete trial: the best value, then the lowest number among equal values.

    The one definition of "best" (checkpoints, the test evaluation, the summary, reports): a
    total order, so every process names the same trial whatever order ties finished in."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return min(done, key=lambda t: rank(t.value, t.number, direction), default=None)


def best_of(study: optuna.Study, baseline: bool) -> FrozenTrial | None:
    """The best complete trial among the baselines, or among the searched trials."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    chosen = [t for t in trials if ("baseline" in t.user_attrs) == baseline]
    return pick_best(chosen, study.direction.name)


def compare_with_baselines(study: optuna.Study) -> BaselineComparison | None:
    """The search against its best baseline, or None when no baseline completed."""
    bb = best_of(study, baseline=True)
    if bb is None:
        return None
    metric = study.user_attrs.get("metric", "value")
    bs = best_of(study, baseline=False)
    attrs = study.user_attrs
    test_metric = "test_" + metric.removeprefix("val_")
    c = BaselineComparison(metric, bb.user_attrs["baseline"], bb.number, bb.value)  # type: ignore[arg-type]
    c.test_metric = test_metric
    if bs is not None:
        c.searched_number, c.searched_value = bs.number, bs.value
    if attrs.get("baseline_test_trial") == bb.number:
        c.baseline_test = attrs.get("baseline_test_metrics", {}).get(test_metric)
    if bs is not None and attrs.get("test_trial") == bs.number:
        c.searched_test = attrs.get("test_metrics", {}).get(test_metric)
    return c


def was_interrupted(trial: FrozenTrial) -> bool:
    """Cut short (Ctrl-C, --timeout, its worker killed: marked `interrupted`), or failed without
    a reason of its own: its process died and the heartbeat failed it. Such a trial does not
    count toward n_trials and its configuration runs again, once for a death (`kills`)."""
    if trial.state != TrialState.FAIL:
        return False
    attrs = trial.user_attrs
    if attrs.get("interrupted"):
        return True
    return "fail_reason" not in attrs and attrs.get("kills", 0) < 1


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state, with the interrupted ones (see `was_interrupted`) apart from FAIL."""
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    counts["INTERRUPTED"] = sum(was_interrupted(t) for t in trials)
    counts["FAIL"] -= counts["INTERRUPTED"]
    return counts


def count_finished(study: optuna.Study) -> int:
    """Finished trials toward n_trials: complete, pruned and failed, not the interrupted ones."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return sum(1 for t in trials if not was_interrupted(t))


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that hold a place in n_trials: running ones and finished ones not interrupted."""
    return sum(
        1
        for t in trials
        if t.state == TrialState.RUNNING or (t.state in FINISHED and not was_interrupted(t))
    )


def best_or_none(study: optuna.Study) -> FrozenTrial | None:
    """The study's best trial (see `pick_best`), or None while no trial has completed."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return pick_best(trials, study.direction.name)


def searched_finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials of the search: baselines and interrupted trials left out."""
    return [
        t for t in trials
        if t.state.is_finished() and not was_interrupted(t) and "baseline" not in t.user_attrs
    ]  # fmt: skip


def stop_reason(
    trials: list[FrozenTrial], direction: str, metric: str, stop: Any, noise: float | None
) -> str | None:
    """Why the study should stop now under `study.stop_when` (`stop`), or None.

    target: a complete trial reached it. plateau: the last `trials` finished searched trials
    (baselines and interrupted trials aside, in the order they finished) did not improve the
    best by more than its noise: the best's standard error over its members (`value_se`),
    else `noise` (the seed noise measured by retraining, or 0 when there is none yet)."""
    if stop is None:
        return None
    maximize = direction == "MAXIMIZE"
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if stop.target is not None:
        reached = [t for t in complete if (t.value >= stop.target if maximize
                                           else t.value <= stop.target)]  # fmt: skip
        if reached:
            first = min(reached, key=lambda t: (t.datetime_complete or 0, t.number))
            return (
                f"trial #{first.number} reached {metric} {first.value:.4f} "
                f"(stop_when.target: {stop.target:g})"
            )
    if stop.plateau is None:
        return None
    finished = sorted(
        searched_finished(trials),
        key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number),
    )
    best: FrozenTrial | None = None
    since = 0  # finished trials since the best last improved by more than its noise
    for t in finished:
        since += 1
        if t.state != TrialState.COMPLETE or t.value is None:
            continue
        if best is None:
            best, since = t, 0
            continue
        gain = (t.value - best.value) if maximize else (best.value - t.value)
        if gain > 0:
            margin = best.user_attrs.get("value_se", noise) or 0.0
            if gain > margin:
                since = 0
            best = t
    n = stop.plateau.trials
    if best is None or since < n:
        return None
    se = best.user_attrs.get("value_se")
    what = (f"its standard error ({se:.4f})" if se is not None
            else f"the seed noise ({noise:.4f})" if noise else "anything")  # fmt: skip
    return (
        f"plateau: the last {since} finished trials did not improve the best ({metric} "
        f"{best.value:.4f}, trial #{best.number}) by more than {what} "
        f"(stop_when.plateau.trials: {n})"
    )


@dataclass
class Settled:
    """What a finished trial becomes: its Optuna state, value and user attributes, its tracker
    run's state, final metrics and tags, and whether its configuration runs again."""

    state: TrialState
    value: float | None
    attrs: dict[str, Any] = field(default_factory=dict)
    run_state: str = "FAIL"  # COMPLETE, PRUNED, FAIL or KILLED (it runs again)
    final: dict[str, float] = field(default_factory=dict)  # best_* metrics of the kept epoch
    tags: dict[str, str] = field(default_factory=dict)
    retry: bool = False


def settle(record: TrialRecord, metric: str, fused_with: list[int] | None = None) -> Settled:
    """A record from a worker as the study stores it: complete with the metric at the kept
    epoch (failed when that is not finite), pruned, failed with its reason, or interrupted:
    failed, marked, and queued to run again (it does not count in the budget)."""
    outcome = record.outcome
    value = record.value(metric) if outcome == "COMPLETE" else None
    if outcome == "COMPLETE" and value is None:
        outcome, record.failure = "FAIL", f"{metric} is not finite at the kept epoch"
    attrs: dict[str, Any] = {
        "n_params": record.n_params,
        "epochs_run": len(record.history),
        "stopped_by": record.stopped_by,
    }
    tags: dict[str, str] = {}
    final: dict[str, float] = {}
    if fused_with:
        tags["hpo.fused_with"] = ",".join(map(str, fused_with))
    if record.members:  # each repeat's or fold's own value and epochs
        attrs["members"] = [
            {"seed": m.seed, "fold": m.fold, "value": m.kept.get(metric),
             "kept_epoch": m.kept_epoch, "epochs": len(m.history), "stopped_by": m.stopped_by}
            for m in record.members
        ]  # fmt: skip
    if record.fit is not None:
        attrs["fit"], attrs["fit_evidence"] = record.fit, record.fit_evidence
        tags["hpo.fit"], tags["hpo.fit_evidence"] = record.fit, str(record.fit_evidence)
    if outcome == "COMPLETE":
        attrs["best_epoch"] = record.kept_epoch
        attrs["stopped_early"] = record.stopped_by == "early_stopping"
        attrs["metrics"] = record.kept
        final = {f"best_{k}": v for k, v in record.kept.items() if k.startswith(("train", "val"))}
        final["best_epoch"] = float(record.kept_epoch or 0)
        se = record.standard_error(metric)
        if se is not None:
            attrs["value_se"] = final[f"best_{metric}_se"] = se
    elif outcome == "FAIL":
        attrs["fail_reason"] = tags["hpo.fail_reason"] = record.failure or "unknown error"
    elif outcome == "INTERRUPTED":
        attrs["interrupted"] = True
    state = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED}.get(
        outcome, TrialState.FAIL
    )
    interrupted = outcome == "INTERRUPTED"
    run_state = "KILLED" if interrupted else outcome
    return Settled(state, value, attrs, run_state, final, tags, retry=interrupted)


def settle_lost(reason: str, kills: int) -> Settled:
    """A trial whose worker died (killed, out of memory): failed, and run again once; a
    configuration that kills its worker a second time is failed for good."""
    if kills >= 1:
        attrs = {"fail_reason": f"{reason}, a second time: not run again"}
        return Settled(TrialState.FAIL, None, attrs, "FAIL", tags={"hpo.fail_reason": reason})
    attrs = {"interrupted": True, "lost": reason}
    tags = {"hpo.fail_reason": reason}
    return Settled(TrialState.FAIL, None, attrs, "KILLED", tags=tags, retry=True)


def checkpoint_policy(
    value: float, number: int, best: FrozenTrial | None, direction: str, *, log_all: bool,
    baseline: bool, ahead: int = 0, keep_top: int = 0,
) -> tuple[bool, bool]:  # fmt: skip
    """Whether a complete trial keeps its weights (a checkpoint), and whether it is the best
    now. It keeps them when it beats or ties the best so far: a tie with a lower number becomes
    the best (`pick_best`), so it must have its checkpoint, whichever of the two finished first
    and in whichever process; with `log_all` (every trial's model logged); for a baseline,
    which is measured on the test split beside the best trial after the search; and, for an
    ensemble's candidates, when fewer than `keep_top` complete trials rank above it (`ahead`)."""
    if best is None:
        return True, True
    # a contender ranks no lower than the best would with the best's number (ties too)
    contender = rank(value, best.number, direction) <= rank(best.value, best.number, direction)
    is_best = rank(value, number, direction) < rank(best.value, best.number, direction)
    return contender or log_all or baseline or ahead < keep_top, is_best


def retry_attrs(number: int, user_attrs: dict[str, Any], kills: int) -> dict[str, Any]:
    """The user attributes of a cut-short trial's configuration queued to run again: which
    trial it repeats, how many times its worker died, and its seed and batch order (so that
    it trains as the first run would have); a baseline stays one."""
    attrs = {"retry_of": number, "kills": kills}
    for name in ("baseline", "seed", "batch_seed"):
        if name in user_attrs:
            attrs[name] = user_attrs[name]
    return attrs
