"""What a study's trials add up to, as functions of plain data (Optuna's `FrozenTrial`s and
hpo's records), shared by the driver, the summary, the reports and `hpo compare`: the one
definition of the best trial, the budget, the counts, what a finished record becomes in
Optuna and in the tracker, and the comparison with the baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.config import metric_direction
from hpo.objectives import Objectives, primary
from hpo.trial import TrialRecord
from hpo.warm import ATTR as WARM

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

    def beats(self) -> bool:
        """Whether the search's best beats the best baseline on validation."""
        if self.searched_value is None:
            return False
        gain = self.searched_value - self.value
        return (gain if metric_direction(self.metric) == "maximize" else -gain) > 0

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


def best_of(study: optuna.Study, baseline: bool) -> FrozenTrial | None:
    """The best complete trial (`Objectives.best`) among the baselines, or the searched ones."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    chosen = [t for t in trials if ("baseline" in t.user_attrs) == baseline]
    return Objectives.of_study(study).best(chosen)


def compare_with_baselines(study: optuna.Study) -> BaselineComparison | None:
    """The search against its best baseline, or None when no baseline completed."""
    bb = best_of(study, baseline=True)
    if bb is None:
        return None
    metric = study.user_attrs.get("metric", "value")
    bs = best_of(study, baseline=False)
    attrs = study.user_attrs
    test_metric = "test_" + metric.removeprefix("val_")
    c = BaselineComparison(metric, bb.user_attrs["baseline"], bb.number, primary(bb))  # type: ignore[arg-type]
    c.test_metric = test_metric
    if bs is not None:
        c.searched_number, c.searched_value = bs.number, primary(bs)
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


def warm(trial: FrozenTrial) -> bool:
    """Added from an earlier study (`hpo.warm`): learnt from, not counted in the budget."""
    return WARM in trial.user_attrs


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state, with the interrupted ones (see `was_interrupted`) apart from FAIL;
    `WARM`: the complete ones added from earlier studies (counted in COMPLETE too)."""
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    counts["INTERRUPTED"] = sum(was_interrupted(t) for t in trials)
    counts["FAIL"] -= counts["INTERRUPTED"]
    counts["WARM"] = sum(warm(t) for t in trials)
    return counts


def counted(trial: FrozenTrial) -> bool:
    """A finished trial toward n_trials: complete, pruned or failed, not interrupted and not
    added from an earlier study."""
    return trial.state in FINISHED and not was_interrupted(trial) and not warm(trial)


def count_finished(study: optuna.Study) -> int:
    """Finished trials toward n_trials (`counted`)."""
    return sum(map(counted, study.get_trials(deepcopy=False, states=FINISHED)))


def budget_used(trials: list[FrozenTrial]) -> int:
    """Trials that hold a place in n_trials: running ones and `counted` finished ones."""
    return sum(1 for t in trials if t.state == TrialState.RUNNING or counted(t))


def best_or_none(study: optuna.Study, objectives: Objectives | None = None) -> FrozenTrial | None:
    """The study's model (see `Objectives.best`), or None while no feasible trial completed;
    `objectives`: the study's, when the caller has them (else read from the study)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return (objectives or Objectives.of_study(study)).best(trials)


def searched_finished(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials of the search: baselines and interrupted trials left out."""
    return [t for t in trials if counted(t) and "baseline" not in t.user_attrs]


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
    complete = [t for t in trials if t.state == TrialState.COMPLETE and primary(t) is not None]
    if stop.target is not None:
        values = {t.number: primary(t) or 0.0 for t in complete}
        reached = [t for t in complete if (values[t.number] >= stop.target if maximize
                                           else values[t.number] <= stop.target)]  # fmt: skip
        if reached:
            first = min(reached, key=lambda t: (t.datetime_complete or 0, t.number))
            return (
                f"trial #{first.number} reached {metric} {primary(first):.4f} "
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
        value = primary(t)
        if t.state != TrialState.COMPLETE or value is None:
            continue
        if best is None:
            best, since = t, 0
            continue
        top = primary(best)
        assert top is not None
        gain = (value - top) if maximize else (top - value)
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
        f"{primary(best):.4f}, trial #{best.number}) by more than {what} "
        f"(stop_when.plateau.trials: {n})"
    )


@dataclass
class Settled:
    """What a finished trial becomes: its Optuna state, value and user attributes, its tracker
    run's state, final metrics and tags, and whether its configuration runs again."""

    state: TrialState
    values: list[float] | None  # one per objective
    attrs: dict[str, Any] = field(default_factory=dict)
    run_state: str = "FAIL"  # COMPLETE, PRUNED, FAIL or KILLED (it runs again)
    final: dict[str, float] = field(default_factory=dict)  # best_* metrics of the kept epoch
    tags: dict[str, str] = field(default_factory=dict)
    retry: bool = False


def settle(
    record: TrialRecord, objectives: Objectives, fused_with: list[int] | None = None
) -> Settled:
    """A record from a worker as the study stores it: complete with its objectives' values
    (the metric at the kept epoch, its costs; failed when one is not finite), pruned, failed
    with its reason, or interrupted: failed, marked, and queued to run again (it does not
    count in the budget). Its costs are kept (`costs`), and with constraints whether it
    keeps them (`feasible`)."""
    metric = objectives.metric
    outcome = record.outcome
    costs = record.costs(objectives.cost_names())
    values: list[float] | None = None
    if outcome == "COMPLETE":
        told = objectives.values(record.kept, costs)
        missing = [n for n, v in zip(objectives.names, told, strict=True) if v is None]
        if missing:
            outcome, record.failure = "FAIL", f"{missing[0]} is not finite at the kept epoch"
        else:
            values = [v for v in told if v is not None]
    attrs: dict[str, Any] = {
        "n_params": record.n_params,
        "epochs_run": len(record.history),
        "stopped_by": record.stopped_by,
    }
    if costs and not objectives.plain:
        attrs["costs"] = costs
    if objectives.several:  # Optuna keeps no intermediate values then: the pruner reads this
        attrs["curve"] = [
            v if v is not None and math.isfinite(v) else None
            for v in (e.get(metric) for e in record.history)
        ]  # fmt: skip
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
    if objectives.constraints and outcome in ("COMPLETE", "PRUNED"):
        attrs["feasible"] = objectives.feasible(as_frozen(-1, attrs, values))
        tags["hpo.feasible"] = str(attrs["feasible"]).lower()
    return Settled(state, values, attrs, run_state, final, tags, retry=interrupted)


def as_frozen(number: int, attrs: dict[str, Any], values: list[float] | None) -> FrozenTrial:
    """A finished trial as it will be told (its values and user attributes), for the
    objectives' functions before the tell."""
    return optuna.trial.FrozenTrial(
        number=number, state=TrialState.COMPLETE if values else TrialState.PRUNED, value=None,
        values=values, datetime_start=None, datetime_complete=None, params={},
        distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={},
        trial_id=-1,
    )  # fmt: skip


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
    candidate: FrozenTrial, complete: list[FrozenTrial], objectives: Objectives, *,
    log_all: bool, baseline: bool, keep_top: int = 0,
) -> tuple[bool, bool]:  # fmt: skip
    """Whether a complete trial (`candidate`, before it is told) keeps its weights (a
    checkpoint), and whether it is the study's model now; `complete`: the study's complete
    trials. It keeps them when it could be the model now or later: when it is feasible and
    no feasible complete trial dominates it (`Objectives.dominated`). With one objective that
    is when it beats or ties the best: a tie with a lower number becomes the best
    (`Objectives.best`), whichever finished first and in whichever process; with several,
    when it is on the front (the model always is, and a trial dominated now stays so). Also
    with `log_all` (every trial's model logged); for a baseline, which is measured on the test
    split beside the best trial after the search; and, for an ensemble's candidates, when
    fewer than `keep_top` feasible complete trials rank above it (`Objectives.ranked`)."""
    others = [t for t in complete if t.number != candidate.number]
    contender = objectives.feasible(candidate) and not any(
        objectives.dominated(candidate, o) for o in objectives.candidates(others)
    )
    is_best = objectives.best([*others, candidate]) is candidate
    ranked = objectives.ranked([*others, candidate])
    top = candidate in ranked and ranked.index(candidate) < keep_top
    return contender or log_all or baseline or top, is_best


def retry_attrs(number: int, user_attrs: dict[str, Any], kills: int) -> dict[str, Any]:
    """The user attributes of a cut-short trial's configuration queued to run again: which
    trial it repeats, how many times its worker died, and its seed and batch order (so that
    it trains as the first run would have); a baseline stays one."""
    attrs = {"retry_of": number, "kills": kills}
    for name in ("baseline", "seed", "batch_seed"):
        if name in user_attrs:
            attrs[name] = user_attrs[name]
    return attrs
