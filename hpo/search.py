"""Samplers and pruners from the spec: Optuna's, built with the spec's options (each option
checked against the class's own signature, one line per problem), and the baselines queued
before the search so that they run first and once per study."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo._private import TrialsSeenBy, trial_id
from hpo.config import Spec, SpecError
from hpo.registry import PRUNERS, SAMPLERS
from hpo.space import grid_space

# Options counted in trials or epochs, and the least each may be ("auto" is also allowed).
_AT_LEAST = {
    "n_startup_trials": 0,
    "n_warmup_steps": 0,
    "interval_steps": 1,
    "n_min_trials": 1,
    "min_resource": 1,
    "max_resource": 1,
    "reduction_factor": 2,
    "min_early_stopping_rate": 0,
    "patience": 0,
}


def _check_options(where: str, what: str, cls: type, opts: dict, skip: tuple = ()) -> None:
    """Every option is one the class takes, of the type of its default, within its range."""
    params = {p: v for p, v in inspect.signature(cls).parameters.items() if p not in skip}
    allowed = list(params) or ["no options"]
    problems = []
    for k, v in opts.items():
        if k not in params:
            problems.append(
                f"{where}.{k}: not an option of the {what}; allowed: {', '.join(allowed)}"
            )
            continue
        default = params[k].default
        if isinstance(default, bool) and not isinstance(v, bool):
            problems.append(f"{where}.{k}: must be true or false (got {v!r})")
        elif type(default) in (int, float) and not isinstance(default, bool):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) or v == "auto"
            if type(default) is int and isinstance(v, float) and not v.is_integer():
                ok = False
            if not ok:
                kind = "an integer" if type(default) is int else "a number"
                problems.append(f"{where}.{k}: must be {kind} (got {v!r})")
                continue
        if k in _AT_LEAST and v != "auto" and isinstance(v, (int, float)) and v < _AT_LEAST[k]:
            problems.append(f"{where}.{k}: must be >= {_AT_LEAST[k]} (got {v})")
    if problems:
        raise SpecError(problems)


def make_sampler(spec: Spec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler a spec names, with its options; bad options raise `SpecError`."""
    s = spec.study.sampler
    seed = s.seed if seed is None else seed
    cls = SAMPLERS.load(s.name)
    skip = ("seed", "search_space", "constraints_func")  # constraints: `Trial.set_constraint`
    _check_options("study.sampler", f"{s.name} sampler", cls, s.options, skip)
    try:
        if "search_space" in inspect.signature(cls).parameters:  # grid: the points to walk
            sampler = cls(grid_space(spec.space), seed=seed, **s.options)
        else:
            sampler = cls(seed=seed, **s.options)
    except (TypeError, ValueError) as e:
        raise SpecError([f"study.sampler: {e}"]) from None
    return BaselineBlind(sampler) if spec.baselines else sampler


class FirstObjective(TrialsSeenBy):
    """A study of several objectives as Optuna's pruners read one: the first objective's
    direction (the metric's), and as the trials to compare with, those with at most
    `n_params` parameters, each with its curve of the metric (`curve_of`; Optuna keeps no
    intermediate values with several objectives). A trial is pruned only for doing worse at
    the same epoch than nets no larger than itself: big nets' curves would otherwise prune
    away the small end of the front, the trials a cost objective is there to find."""

    def __init__(self, study: Any, n_params: int):  # an optuna.Study or a view of one
        super().__init__(
            study,
            lambda t: t.user_attrs.get("n_params", 0) <= n_params,
            lambda t: curve_of(t, t.user_attrs.get("curve", [])),
        )

    @property
    def direction(self) -> optuna.study.StudyDirection:
        return self._study.directions[0]


def curve_of(trial: FrozenTrial, curve: list[float | None]) -> FrozenTrial:
    """A trial with `curve` (the metric at epochs 1, 2, ...) as its intermediate values."""
    return FrozenTrial(
        number=trial.number, state=trial.state, value=None, values=trial.values,
        datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
        params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
        system_attrs=trial.system_attrs,
        intermediate_values={i: v for i, v in enumerate(curve, 1) if v is not None},
        trial_id=trial_id(trial),
    )  # fmt: skip


def _without_baselines(study: optuna.Study) -> Any:
    """A study as a sampler should see it: its trials less the baselines."""
    return TrialsSeenBy(study, lambda t: "baseline" not in t.user_attrs)


class BaselineBlind(optuna.samplers.BaseSampler):
    """A sampler that does not learn from baseline trials.

    A baseline is a fixed configuration that need not lie inside the search space (a linear
    model when n_layers starts at 1, weight_decay 0 under a log range), so its trial has no
    sampled parameters; seen by a multivariate sampler, such a trial would empty the
    intersection of the parameters it models jointly.
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler):
        self.inner = sampler

    def __getattr__(self, name: str) -> Any:  # the grid sampler's own attributes, for one
        return getattr(self.__dict__["inner"], name)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        return self.inner.infer_relative_search_space(_without_baselines(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, space: Any) -> Any:
        return self.inner.sample_relative(_without_baselines(study), trial, space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, distribution: Any
    ) -> Any:
        return self.inner.sample_independent(_without_baselines(study), trial, name, distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: Any, values: Any
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    """The pruner a spec names, fed by per-epoch values; bad options raise `SpecError`."""
    name, opts = spec.study.pruner.name, spec.study.pruner.options
    try:
        if name != "patient":
            return _pruner(spec, name, opts)
        # patient: {patience: 2, min_delta: 0.0, wrapped: median, ...options of the wrapped one}
        own = {k: opts.pop(k) for k in ("patience", "min_delta") if k in opts}
        wrapped = opts.pop("wrapped", "median")
        if wrapped not in PRUNERS or wrapped == "patient":
            allowed = ", ".join(p for p in PRUNERS if p != "patient")
            raise SpecError([f"study.pruner.wrapped: must be one of {allowed} (got {wrapped!r})"])
        inner = _pruner(spec, wrapped, opts)
        return PRUNERS.load("patient")(inner, **{"patience": 2, **own})
    except (TypeError, ValueError) as e:
        raise SpecError([f"study.pruner: {e}"]) from None


@dataclass(frozen=True)
class PruneWindow:
    """The epochs at which a median or percentile pruner can say "prune" at all, read from its
    options as Optuna reads them: none before `startup` trials have completed, before epoch
    `warmup`, or between its `interval` epochs. Elsewhere its answer is known to be no, so
    the driver does not ask (`may_prune`); where it asks, it asks about the trials as last
    read (`RecentTrials`), not the storage's at every epoch (6 ms an epoch on SQLite: a
    digits epoch trains in 15). Its count of completed trials is
    the one it saw last, so with several processes the first prune after the start-up
    trials may come an epoch or two later than Optuna's."""

    startup: int = 0
    warmup: int = 0
    interval: int = 1

    def may_prune(self, epoch: int, completed: int) -> bool:
        # Epochs are reported one after the other from 1, so Optuna's "first step in its
        # interval" is an epoch `warmup + k * interval`.
        return (
            completed >= max(1, self.startup)
            and epoch >= self.warmup
            and (epoch - self.warmup) % self.interval == 0
        )


def prune_window(spec: Spec) -> PruneWindow | None:
    """When the spec's pruner can prune (see `PruneWindow`); None for the pruners whose rule
    has no such window, asked at every epoch. A patient pruner prunes only when the pruner it
    wraps does."""
    name, opts = spec.study.pruner.name, spec.study.pruner.options
    if name == "patient":
        name = opts.get("wrapped", "median")
    cls = PRUNERS.load(name) if name in PRUNERS else None
    if cls is None or not issubclass(cls, optuna.pruners.PercentilePruner):
        return None
    given = {
        p.name: opts.get(p.name, p.default) for p in inspect.signature(cls).parameters.values()
    }
    return PruneWindow(
        int(given["n_startup_trials"]), int(given["n_warmup_steps"]), int(given["interval_steps"])
    )


def _pruner(spec: Spec, name: str, opts: dict[str, Any]) -> optuna.pruners.BasePruner:
    cls = PRUNERS.load(name)
    _check_options("study.pruner", f"{name} pruner", cls, opts)
    defaults: dict[str, Any] = {
        "percentile": {"percentile": 25.0},
        "hyperband": {"min_resource": 1, "max_resource": spec.training.max_epochs},
    }.get(name, {})
    return cls(**{**defaults, **opts})


def check_spec(spec: Spec) -> None:
    """The checks that need Optuna: sampler and pruner options."""
    problems: list[str] = []
    for build in (lambda: make_sampler(spec), lambda: make_pruner(spec)):
        try:
            build()
        except SpecError as e:
            problems += e.problems
    if problems:
        raise SpecError(problems)


def enqueue_baselines(study: optuna.Study, spec: Spec) -> list[str]:
    """Queue each of the spec's baselines that the study has not run or queued yet, so that
    they run first and once per study, however many processes start (call it under the
    study's lock). Returns the names queued now."""
    had = {t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)}
    queued = []
    for entry in spec.baselines:
        if entry.name not in had:
            study.enqueue_trial({}, user_attrs={"baseline": entry.name})
            queued.append(entry.name)
    return queued
