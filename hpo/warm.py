"""Warm starts: the finished trials of earlier studies added to a new one as completed trials
(Optuna's `add_trial`), so that a spec whose search space changed (a range widened as the
report advised) goes on from what the earlier studies learnt instead of from zero.

A trial is added when its study ran on the same data and split with the same training
settings, objectives and constraints (the spec's fingerprint without its search space), and
its configuration lies in the new search space: replayed through the new space's `suggest_*`
calls (`_Replay`), each sampled value inside the new distribution and each fixed value the
one it trained with. Added trials are marked (`warm_start_from`), counted apart from the
new budget, and learnt from by the sampler; the others are counted by reason."""

from __future__ import annotations

from collections import Counter
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from hpo._private import storage_of
from hpo.config import Spec, SpecError
from hpo.params import TrialConfig
from hpo.space import suggest_params

ATTR = "warm_start_from"  # a trial's user attribute: "STUDY#NUMBER" it was copied from
STUDY_ATTR = "warm_started"  # the study's: {source: {added, skipped: {reason: count}}}
# What an added trial keeps of its first study's record: its configuration, results, fit,
# curve, costs, and its kept weights (its MLflow run's checkpoint), so it can be the model.
KEPT = (
    "config", "seed", "n_params", "epochs_run", "stopped_by", "best_epoch", "stopped_early",
    "metrics", "value_se", "members", "fit", "fit_evidence", "costs", "feasible", "curve",
    "checkpoint", "mlflow_run_id",
)  # fmt: skip


class _Outside(Exception):
    """A value the new search space cannot have produced."""


class _Replay:
    """Answers a search space's `suggest_*` calls with one trained configuration's values,
    and records them with their distributions (for `optuna.trial.create_trial`)."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def _value(self, name: str) -> Any:
        head, _, index = name.rpartition("_")
        if head == "width" and index.isdigit():  # a per-layer width
            widths = self.config.get("widths") or []
            if int(index) >= len(widths):
                raise _Outside(f"{name}: fewer layers")
            return widths[int(index)]
        if name == "width":
            widths = self.config.get("widths") or []
            if len(set(widths)) > 1:
                raise _Outside("width: layers of different widths")
            return widths[0] if widths else self.config.get("width")
        return self.config.get(name)

    def _take(self, name: str, dist: BaseDistribution, inside: bool, value: Any) -> Any:
        if not inside:  # said per parameter, so that trials are counted together
            if isinstance(dist, CategoricalDistribution):
                raise _Outside(f"{name} not among {list(dist.choices)}")
            assert isinstance(dist, (IntDistribution, FloatDistribution))
            raise _Outside(f"{name} outside {dist.low:g} to {dist.high:g}")
        self.params[name], self.distributions[name] = value, dist
        return value

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        value = self._value(name)
        return self._take(name, CategoricalDistribution(choices), value in choices, value)

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        value = self._value(name)
        ok = isinstance(value, int) and low <= value <= high and (value - low) % step == 0
        return self._take(name, IntDistribution(low, high, log=log, step=step), ok, value)

    def suggest_float(
        self, name: str, low: float, high: float, step: float | None = None, log: bool = False
    ) -> float:
        value = self._value(name)
        ok = isinstance(value, (int, float)) and low <= value <= high
        if ok and step is not None:
            ok = abs(round((value - low) / step) * step - (value - low)) < 1e-9
        return self._take(name, FloatDistribution(low, high, log=log, step=step), ok, value)


def check_sources(storage: Any, name: str, sources: list[str]) -> None:
    """Every study named to warm start from exists and is not the study itself; raises
    `SpecError` before anything is written."""
    have = set(optuna.get_all_study_names(storage))
    problems = []
    for source in sources:
        if source == name:
            problems.append(f"--warm-start {source}: the study cannot warm start from itself")
        elif source not in have:
            known = ", ".join(sorted(have)) or "none"
            problems.append(
                f"--warm-start {source}: no study of that name in this storage (it has: {known})"
            )
    if problems:
        raise SpecError(problems)


def _settings(spec: Spec) -> str:
    """What trials must share to be compared: the fingerprint less the search space."""
    return spec.fingerprint(search_space={})


def warm_start(
    study: optuna.Study, spec: Spec, data_info: dict[str, Any], sources: list[str],
    spec_of: Any,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Add the compatible finished trials of the studies named in `sources` (same storage)
    to `study`, once per source (a rerun adds nothing again); returns, per source added
    now, how many trials were added and how many were skipped for which reason. `spec_of`:
    a stored study's spec (`hpo.study.spec_of`). Call it under the study's lock."""
    done: dict[str, Any] = dict(study.user_attrs.get(STUDY_ATTR, {}))
    report: dict[str, dict[str, Any]] = {}
    for source in sources:
        if source in done:
            continue
        old = optuna.load_study(study_name=source, storage=storage_of(study))
        skipped: Counter[str] = Counter()
        added = 0
        finished = [t for t in old.get_trials(deepcopy=False) if t.state.is_finished()]
        why_not = _study_mismatch(old, spec, data_info, spec_of)
        for t in finished:
            reason = why_not or _trial_mismatch(t, spec)
            if reason is not None:
                skipped[reason] += 1
                continue
            replay = _Replay(t.user_attrs["config"])
            try:
                config = suggest_params(replay, spec.space)  # type: ignore[arg-type]
            except _Outside as e:
                skipped[f"outside the new search space ({e})"] += 1
                continue
            if config.as_dict() != TrialConfig.of(t.user_attrs["config"]).as_dict():
                diff = _first_difference(config.as_dict(), t.user_attrs["config"])
                skipped[f"a fixed value differs ({diff})"] += 1
                continue
            attrs = {k: t.user_attrs[k] for k in KEPT if k in t.user_attrs}
            attrs[ATTR] = f"{source}#{t.number}"
            study.add_trial(
                optuna.trial.create_trial(
                    params=replay.params,
                    distributions=replay.distributions,
                    values=t.values,
                    intermediate_values=t.intermediate_values,
                    user_attrs=attrs,
                    system_attrs={
                        k: v for k, v in t.system_attrs.items() if k.startswith("constraints")
                    },  # fmt: skip
                    state=TrialState.COMPLETE,
                )
            )
            added += 1
        entry = {"added": added, "skipped": dict(skipped)}
        done[source] = report[source] = entry
        study.set_user_attr(STUDY_ATTR, done)
    return report


def _study_mismatch(
    old: optuna.Study, spec: Spec, data_info: dict[str, Any], spec_of: Any
) -> str | None:
    """Why none of an earlier study's trials can be added, or None."""
    info = old.user_attrs.get("data", {})
    if info.get("split_hash") != data_info.get("split_hash"):
        return "another dataset or split"
    try:
        old_spec = spec_of(old)
    except SpecError:
        return "no stored spec"
    if _settings(old_spec) != _settings(spec):
        return "other training settings, objectives or constraints"
    return None


def _trial_mismatch(t: FrozenTrial, spec: Spec) -> str | None:
    """Why one finished trial cannot be added, or None."""
    if t.state != TrialState.COMPLETE:
        return f"{t.state.name.lower()}, not complete"
    if "baseline" in t.user_attrs:
        return "a baseline"
    if ATTR in t.user_attrs:
        return "itself warm-started from another study"
    if "config" not in t.user_attrs:
        return "no configuration stored"
    if len(t.values or []) != len(spec.study.objectives()):
        return "other objectives"
    return None


def _first_difference(new: dict[str, Any], old: dict[str, Any]) -> str:
    for key, value in new.items():
        if old.get(key) != value:
            return f"{key}: {old.get(key)!r} trained, the new spec gives {value!r}"
    return "?"
