"""Report data: plain values computed from a study (and its MLflow runs), nothing drawn yet.

Search-space advice (`search_space_advice`) flags a numeric range, with a wider range to paste,
when the top trials crowd one of its edges or the metric keeps improving toward one; the rules,
with their thresholds, are `ADVICE_RULES`, which the report page states beside the advice.
Baseline trials are left out: they are not samples of the search space.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.config import SpecError
from hpo.diagnose import FIT_LABELS
from hpo.distributions import Distribution
from hpo.objectives import Objectives, primary
from hpo.redact import recorded_uri

EDGE = 0.10  # the outer 10% of a range (log scale where the range is log) counts as its edge
CROWD = 0.5  # flag a range when half or more of the top trials sit in one edge
TOP = 0.2  # the top 20% of complete trials (at least MIN_GROUP) are "the best values"
MIN_GROUP = 5  # no conclusion from fewer trials than this in the group a rule reads
FLAT = 0.05  # importance below 5%: the parameter barely matters here
IMPORTANCE = (
    "fANOVA importances (the share of the metric's variance each parameter explains, from a "
    "random forest fitted to the complete searched trials). optuna-dashboard shows Optuna's "
    "PED-ANOVA instead, over every trial: on studies of a few dozen trials its numbers move "
    "more and can credit a parameter that never varied, so the two can disagree"
)
TREND_MIN = 8  # complete trials a trend needs
TREND_RHO = 0.5  # |Spearman rho| of the metric against the parameter, at least
TREND_P = 0.05  # ... and significant at 5%
TREND_NEAR = 1 / 3  # the best trial within the third of the range nearest the edge

ADVICE_RULES = (
    f"A numeric range is flagged when half or more of the top {TOP:.0%} of complete trials (at "
    f"least {MIN_GROUP}, and at most half of them) sit in its outer {EDGE:.0%}, or when the "
    "metric keeps improving toward one edge: over at "
    f"least {TREND_MIN} complete trials, Spearman's rank correlation between the parameter and "
    f"the metric is {TREND_RHO:g} or more in size (p < {TREND_P:g}), the best trial sits in "
    "the third of the range nearest that edge, and a quadratic fitted to the better half of "
    "the trials does not peak inside the range short of that edge's outer "
    f"{EDGE:.0%}. Positions are on the log scale for log ranges; baselines are left out. A peak "
    "inside the range, or no effect, is not flagged, nor is a parameter whose importance is "
    f"under {FLAT:.0%}: widening a range that barely matters is unlikely to help."
)


class Overview(NamedTuple):
    study: str
    dataset: str
    task: str
    split: dict[str, Any]  # n_train, n_val, n_test, split_hash, test_source
    metric: str
    budget: int | None
    states: dict[str, int]
    wall_time_s: float  # first trial's start to last trial's end, across resumed runs
    trial_time_s: float  # time spent inside trials
    best_number: int | None
    best_value: float | None
    best_config: dict[str, Any]
    test_metrics: dict[str, float]
    test_trial: int | None
    baselines: list[str] = []  # the search against its best baseline, on validation and test
    best_se: float | None = None  # the best value's standard error over its members
    members: str = ""  # what each trial's value is the mean of ("5 folds x 2 seeds"), if any
    # the trials whose value is within one standard error of the best's: (number, value, se)
    close: list[tuple[int, float, float | None]] = []
    test_model: str = ""  # how the tested model was made, when it is not the trial's weights
    ensemble: dict[str, Any] = {}  # tracking.ensemble: members, weights, val and test metrics
    stopped_because: str = ""  # why study.stop_when stopped it before its budget


class FitRow(NamedTuple):
    number: int
    state: str
    value: float | None
    label: str
    evidence: str
    se: float | None = None  # the value's standard error over the trial's members


class Trend(NamedTuple):
    """The metric against one parameter over the complete trials."""

    rho: float  # Spearman's, with the metric's sign turned so that positive means better
    p_value: float
    n_trials: int
    best_at: float  # the parameter's value in the best trial


class Advice(NamedTuple):
    param: str
    edge: str  # "low" or "high"
    share: float  # of the top trials in that edge
    current: tuple[float, float]
    proposed: tuple[float, float]
    snippet: str  # ready-to-paste YAML
    reasons: tuple[str, ...] = ("crowd",)  # "crowd" and/or "trend"
    trend: Trend | None = None
    metric: str = "value"


class BaselineRow(NamedTuple):
    name: str
    number: int
    state: str
    value: float | None
    config: dict[str, Any]
    fit: str | None
    evidence: str | None


class ReportData(NamedTuple):
    overview: Overview
    fit_rows: list[FitRow]
    fit_counts: dict[str, int]
    importances: dict[str, float]
    advice: list[Advice]
    flat: list[str]  # parameters that barely matter
    curves: dict[int, dict[str, list[float]]]  # trial number -> metric -> per-epoch values
    curve_roles: dict[int, str]  # trial number -> why it is shown (best, overfit, underfit)
    baselines: list[BaselineRow] = []  # each baseline trial, in the order they ran
    # several objectives, constraints or study.select: `Objectives.summary` (front, choice)
    front: dict[str, Any] | None = None


def report_data(study: optuna.Study, tracking_uri: str | None = None) -> ReportData:
    """Everything a study report shows, as plain data."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    attrs = study.user_attrs
    spec = _spec_of(study)
    overview = _overview(study, trials, spec)
    fit_rows = [
        FitRow(
            t.number,
            t.state.name,
            primary(t),
            t.user_attrs["fit"],
            t.user_attrs["fit_evidence"],
            t.user_attrs.get("value_se"),
        )  # fmt: skip
        for t in trials
        if "fit" in t.user_attrs
    ]
    fit_counts = {k: sum(r.label == k for r in fit_rows) for k in FIT_LABELS}
    importances = param_importances(study)
    roles = _curve_roles(study, complete, fit_rows)
    uri = tracking_uri or recorded_uri(attrs.get("tracking_uri"))
    curves = _curves(trials, roles, uri) if uri else {}
    searched = spec.space if spec else {}
    advice = search_space_advice(study, searched)
    flat = [p for p, v in importances.items() if v < FLAT and p != "n_params"]
    # A parameter that barely matters is not advised to be widened: said plainly beside it.
    crowded = {a.param: a.edge for a in advice if a.param in flat}
    advice = [a for a in advice if a.param not in flat]
    flat = [
        f"{p} (its best values sit at its {crowded[p]} edge, but it barely matters here: "
        "widening is unlikely to help)"
        if p in crowded
        else p
        for p in flat
    ]
    baselines = baseline_rows(trials)
    objectives = Objectives.of_study(study)
    front = None if objectives.plain else objectives.summary(trials)
    return ReportData(
        overview, fit_rows, fit_counts, importances, advice, flat, curves, roles, baselines,
        front,
    )  # fmt: skip


def baseline_rows(trials) -> list[BaselineRow]:
    """The baselines' trials: one row per baseline, its finished run (the last, when a cut-short
    one ran again)."""
    from hpo.outcomes import was_interrupted

    rows: dict[str, BaselineRow] = {}
    for t in trials:
        name = t.user_attrs.get("baseline")
        if name is None or not t.state.is_finished() or was_interrupted(t):
            continue
        rows[name] = BaselineRow(
            name,
            t.number,
            t.state.name,
            primary(t),
            t.user_attrs.get("config", {}),
            t.user_attrs.get("fit"),
            t.user_attrs.get("fit_evidence"),
        )
    return sorted(rows.values(), key=lambda r: r.number)


def _spec_of(study: optuna.Study):
    from hpo.study import spec_of

    try:
        return spec_of(study)
    except SpecError:  # no stored spec, or one whose data file has moved since
        return None


def _overview(study, trials, spec) -> Overview:
    attrs = study.user_attrs
    data = attrs.get("data", {})
    from hpo.outcomes import best_or_none, compare_with_baselines, state_counts

    compared = compare_with_baselines(study)

    states = {k: v for k, v in state_counts(trials).items() if v}
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0
    best = best_or_none(study)
    best_se = best.user_attrs.get("value_se") if best else None
    close = []
    if best is not None and best_se is not None:
        close = [
            (t.number, primary(t), t.user_attrs.get("value_se"))
            for t in trials
            if t.state == TrialState.COMPLETE and t.number != best.number
            and primary(t) is not None and abs(primary(best) - primary(t)) <= best_se
        ]  # fmt: skip
    folds, repeats = data.get("folds"), spec.training.repeats if spec else 1
    members = " x ".join(
        x for x in (f"{folds} folds" if folds else "", f"{repeats} seeds" if repeats > 1 else "")
        if x
    )  # fmt: skip
    test_model = ""
    if best is not None and attrs.get("test_trial") == best.number:
        test_model = attrs.get("test_model", "")
    return Overview(
        study=study.study_name,
        dataset=data.get("dataset", "?"),
        task=data.get("task", "?"),
        split={
            k: data.get(k)
            for k in ("n_train", "n_val", "n_test", "split_hash", "test_source", "folds")
        },
        metric=attrs.get("metric", "value"),
        budget=spec.study.n_trials if spec else None,
        states=states,
        wall_time_s=span,
        trial_time_s=sum(t.duration.total_seconds() for t in trials if t.duration),
        best_number=best.number if best else None,
        best_value=primary(best) if best else None,
        best_config=best.user_attrs.get("config", best.params) if best else {},
        test_metrics=attrs.get("test_metrics", {}),
        test_trial=attrs.get("test_trial"),
        baselines=compared.sentences() if compared else [],
        best_se=best_se,
        members=members,
        close=close,
        test_model=test_model,
        ensemble=attrs.get("ensemble") or {},
        stopped_because=attrs.get("stopped_because", ""),
    )


def param_importances(study: optuna.Study) -> dict[str, float]:
    """fANOVA importances over `importance_study(study)` (see `IMPORTANCE`). Not Optuna's
    default, PED-ANOVA: measured on studies of hpo's size (12 and 30 trials, one parameter that
    matters and three that do not, 6 seeds each), fANOVA gave the one that matters 0.82-0.93 at
    30 trials where PED-ANOVA gave 0.53-0.97, and PED-ANOVA gave a constant parameter 25%."""
    derived = importance_study(study)
    if derived is None:
        return {}
    try:
        return optuna.importance.get_param_importances(
            derived, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except (ValueError, RuntimeError):  # e.g. every parameter fixed
        return {}


def importance_study(study: optuna.Study) -> optuna.Study | None:
    """An in-memory copy of the complete trials, restricted to the parameters every one of them
    has, plus the parameter count as a derived parameter (per-layer widths and n_layers alone
    say little about model size). Baselines are left out: they have no sampled parameters,
    and one of them would leave no parameter common to all."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "baseline" not in t.user_attrs
    ]
    if len(complete) < MIN_GROUP:  # no conclusion from fewer
        return None
    return _on_common_params(study, complete, with_n_params=True)


def _on_common_params(
    study: optuna.Study, trials: list[FrozenTrial], with_n_params: bool = False
) -> optuna.Study:
    """An in-memory study of `trials` on the parameters all of them have (and, asked, their
    parameter count as one more parameter)."""
    derived = optuna.create_study(direction=study.directions[0])
    common = sorted(set.intersection(*(set(t.distributions) for t in trials)))
    for t in trials:
        params = {k: t.params[k] for k in common}
        dists = {k: t.distributions[k] for k in common}
        if with_n_params and "n_params" in t.user_attrs:
            params["n_params"] = float(t.user_attrs["n_params"])
            dists["n_params"] = optuna.distributions.FloatDistribution(1.0, 1e12, log=True)
        derived.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=primary(t))
        )
    return derived


def parallel_studies(study: optuna.Study) -> list[tuple[str, str, optuna.Study]]:
    """What the parallel-coordinates charts show: (key, title, in-memory study) with the
    searched complete trials and only the parameters each of them has, so that no line falls
    to a missing value: first every searched trial on the parameters they all have; then, for
    each conditional parameter (momentum only for SGD, say), the trials it applies to.
    Baselines are left out (they have no sampled parameters)."""
    searched = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "baseline" not in t.user_attrs
        and t.params
        and primary(t) is not None
        and math.isfinite(primary(t))
    ]
    if len(searched) < 2:
        return []
    groups: list[tuple[str, str, list]] = [("parallel", "all searched trials", searched)]
    names = sorted({k for t in searched for k in t.params})
    seen = {frozenset(t.number for t in searched)}
    for name in names:
        have = [t for t in searched if name in t.params]
        key = frozenset(t.number for t in have)
        if len(have) >= 2 and key not in seen:
            seen.add(key)
            groups.append((f"parallel-{name}", f"the {len(have)} trials with {name}", have))
    return [
        (key, title, _on_common_params(study, trials))
        for key, title, trials in groups
        if set.intersection(*(set(t.params) for t in trials))
    ]


def search_space_advice(study: optuna.Study, space: dict[str, Any]) -> list[Advice]:
    """Numeric ranges whose best values crowd against an edge, or toward whose edge the metric
    keeps improving, each with a wider range to paste (rules: `ADVICE_RULES`)."""
    maximize = study.directions[0].name == "MAXIMIZE"
    complete = sorted(
        (
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "baseline" not in t.user_attrs
            and primary(t) is not None
            and math.isfinite(primary(t))
        ),
        key=lambda t: primary(t),
        reverse=maximize,
    )
    if len(complete) < MIN_GROUP:
        return []
    metric = study.user_attrs.get("metric", "value")
    # crowding reads the best trials: at least MIN_GROUP of them, and at most half the study
    top = complete[: max(MIN_GROUP, round(TOP * len(complete)))]
    if len(top) > len(complete) / 2:
        top = []
    out = []
    for name, d in space.items():
        if not isinstance(d, Distribution) or d.type == "categorical" or d.per_layer:
            continue
        low, high = float(d.low), float(d.high)
        scale = (lambda v: math.log(v)) if d.log else (lambda v: v)
        span = scale(high) - scale(low)
        if span <= 0:
            continue

        def position(v: float, scale=scale, low=low, span=span) -> float:
            return (scale(float(v)) - scale(low)) / span

        pos = [position(t.params[name]) for t in top if name in t.params]
        shares = {
            "low": sum(p <= EDGE for p in pos) / max(len(pos), 1),
            "high": sum(p >= 1 - EDGE for p in pos) / max(len(pos), 1),
        }
        have = [t for t in complete if name in t.params]  # best first
        points = [
            (position(t.params[name]), primary(t) if maximize else -primary(t)) for t in have
        ]
        found = metric_trend(points)
        trend = None
        if found is not None:
            rho, p_value = found[1]
            trend = Trend(rho, p_value, len(points), float(have[0].params[name]))
        for edge, share in shares.items():
            crowded = len(pos) >= MIN_GROUP and share >= CROWD
            trending = found is not None and found[0] == edge
            reasons = ("crowd",) * crowded + ("trend",) * trending
            new = _widen(name, d, edge)
            if reasons and new != (low, high):
                out.append(
                    Advice(
                        name,
                        edge,
                        share,
                        (low, high),
                        new,
                        _snippet(name, d, new),
                        reasons,
                        trend if trending else None,
                        metric,
                    )
                )
    return out


def metric_trend(points: list[tuple[float, float]]) -> tuple[str, tuple[float, float]] | None:
    """The edge ("low" or "high") toward which the score keeps improving, with Spearman's rho
    and its p-value, or None. `points` are (position in the range, 0 to 1; score, higher is
    better), best first."""
    from scipy import stats

    if len(points) < TREND_MIN:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(set(xs)) < 3 or len(set(ys)) < 2:
        return None
    rho, p_value = (float(v) for v in stats.spearmanr(xs, ys))
    if not (math.isfinite(rho) and abs(rho) >= TREND_RHO and p_value < TREND_P):
        return None
    edge = "high" if rho > 0 else "low"
    best = xs[0]
    if (best < 1 - TREND_NEAR) if edge == "high" else (best > TREND_NEAR):
        return None  # the best values are not near that edge
    # A quadratic through the better half of the trials (the worse half, failed trials among
    # them, would only bend it): a peak inside the range, short of the edge's outer tenth, is a
    # peak and not a trend (the metric would not keep improving past it).
    import numpy as np

    better = points[: max(4, len(points) // 2)]  # best first
    c2, c1, _ = np.polyfit([p[0] for p in better], [p[1] for p in better], 2)
    if c2 < 0:
        peak = -c1 / (2 * c2)
        if (peak < 1 - EDGE) if edge == "high" else (peak > EDGE):
            return None
    return edge, (rho, p_value)


def _widen(name: str, d: Distribution, edge: str) -> tuple[float, float]:
    from hpo.params import PARAMS

    low, high = float(d.low), float(d.high)
    rule = PARAMS[name]
    if d.log:
        low, high = (low / 10, high) if edge == "low" else (low, high * 10)
    else:
        half = (high - low) / 2
        low, high = (low - half, high) if edge == "low" else (low, high + half)
    if rule.min is not None:
        low = max(low, rule.min)
    if rule.min_open is not None and low <= rule.min_open:
        low = float(d.low) / 10 if d.log else float(d.low) / 2
    if rule.max_open is not None:
        high = min(high, rule.max_open * 0.99)
    if d.type == "int":
        low, high = float(math.floor(low)), float(math.ceil(high))
    return (low, high)


def _snippet(name: str, d: Distribution, new: tuple[float, float]) -> str:
    fmt = (lambda v: str(int(v))) if d.type == "int" else yaml_float
    extra = ", log: true" if d.log else ""
    return f"{name}: {{type: {d.type}, low: {fmt(new[0])}, high: {fmt(new[1])}{extra}}}"


def yaml_float(v: float) -> str:
    """A float as YAML's safe_load reads back as a float: 1.0e-4, not 1e-04 (a string there)."""
    v = float(v)
    if v == 0:
        return "0.0"
    if 1e-3 <= abs(v) < 1e4:
        text = f"{v:.4g}"
        return text if "." in text else text + ".0"
    mantissa, exponent = f"{v:.3e}".split("e")
    mantissa = mantissa.rstrip("0")
    if mantissa.endswith("."):
        mantissa += "0"
    return f"{mantissa}e{int(exponent):+d}"


def _curve_roles(study, complete, fit_rows) -> dict[int, str]:
    objectives = Objectives.of_study(study)
    model = objectives.best(complete)  # the study's model: "best", then the top on the metric
    ranked = [t for t in objectives.ranked(complete) if t is not model]
    top = ([model] if model else []) + ranked
    roles = {t.number: "best" if i == 0 else f"top {i + 1}" for i, t in enumerate(top[:3])}
    values = {t.number: primary(t) for t in complete}
    for label in (label for label in FIT_LABELS if label != "good"):
        rows = [r for r in fit_rows if r.label == label and r.number not in roles]
        if rows:
            # typical: the median one by value among those with this label
            rows.sort(key=lambda r: values.get(r.number, r.value or 0.0) or 0.0)
            roles[rows[len(rows) // 2].number] = f"typical {label}"
    return roles


def _curves(trials, roles, uri) -> dict[int, dict[str, list[float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    by_number = {t.number: t for t in trials}
    out = {}
    for number in roles:
        run_id = by_number[number].user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        curves = {}
        for key in ("train_loss", "val_loss"):
            try:
                history = client.get_metric_history(run_id, key)
            except Exception:  # noqa: BLE001 - the store moved or the run is gone
                history = []
            curves[key] = [m.value for m in sorted(history, key=lambda m: m.step)]
        if curves["val_loss"]:
            out[number] = curves
    return out
