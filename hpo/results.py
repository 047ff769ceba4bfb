"""What a study tells whoever runs it: progress after each epoch and trial, and its result.

Plain data built from the study's stored trials; the CLI prints them, the Python API returns
them. Imports neither torch nor mlflow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo.diagnose import FIT_LABELS
from hpo.objectives import Objectives, primary
from hpo.outcomes import (
    BaselineComparison,
    best_or_none,
    compare_with_baselines,
    count_finished,
    state_counts,
)


@dataclass
class Progress:
    """What the CLI shows after each finished trial."""

    done: int
    total: int
    trial: FrozenTrial
    best_value: float | None
    best_number: int | None
    elapsed: float
    eta: float | None
    note: str = ""  # e.g. why an interrupted trial stopped and that it will run again
    study: optuna.Study | None = field(default=None, repr=False)


@dataclass
class EpochProgress:
    """What the CLI shows of a running trial after each of its epochs."""

    number: int
    epoch: int
    max_epochs: int
    value: float  # the study's metric at this epoch
    decision: str | None  # None (goes on), "pruned" or "interrupted"


# A trial's life outside its epochs, step by step, as the driver lives it: what `Bookkeeping`
# times. "worker idle" is not a driver step but its cost: the seconds a worker slot stood free
# between a trial's end and the next trial handed to it.
STEPS = (
    "ask",  # the budget check under the lock, Optuna's ask and the sampler, the trial's attrs
    "run creation",  # the trial's MLflow run
    "epoch decision",  # report the epoch's value, ask the pruner (a worker may wait for it)
    "epoch logging",  # the epoch's metrics to the trial's MLflow run
    "tell",  # the record settled into attrs, Optuna's tell
    "checkpoint",  # the kept weights of a trial that beats or ties the best
    "run end",  # params, final metrics, tags, the run closed
    "progress",  # the progress line or callback
    "storage checks",  # heartbeats and other processes' dead trials
    "worker idle",
)


class Bookkeeping:
    """Seconds spent in each of `STEPS` by one process's driver, and the seconds of training
    its workers reported (their epochs' `epoch_seconds`): the platform's overhead measured from
    the inside, for `make bench` and the curious (`StudyResult.bookkeeping`)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.calls = dict.fromkeys(STEPS, 0)
        self.training = 0.0
        self.loop = 0.0  # seconds from the first trial asked to the last one told

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": dict(self.seconds),
            "calls": dict(self.calls),
            "training_seconds": self.training,
            "loop_seconds": self.loop,
        }


@dataclass
class StudyResult:
    study_name: str
    storage: str
    tracking_uri: str
    metric: str
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    test_metrics: dict[str, float]
    parent_run_id: str | None
    device: str
    interrupted: bool = False
    fit_trials: dict[str, list[int]] = field(default_factory=dict)  # label -> trial numbers
    new_trials: int = 0
    wall_time: float = 0.0
    data_info: dict[str, Any] = field(default_factory=dict)
    test_note: str = ""  # why there is no test evaluation from this process, if there is none
    baselines: BaselineComparison | None = None  # the search's best against the best baseline
    model_uri: str | None = None  # the best trial's logged model, when it is the best's
    # this process's driver: seconds per step of `STEPS`, calls, and its workers' training
    bookkeeping: dict[str, Any] = field(default_factory=dict, repr=False)
    study: optuna.Study | None = field(default=None, repr=False)
    best_se: float | None = None  # the best value's standard error over its members
    # how the test model was made when it is not the best trial's own weights
    test_model: str = ""
    stopped_because: str = ""  # why study.stop_when stopped the study before its budget
    seed_noise: dict[str, Any] | None = None  # measured for a plateau: trial, values, sd
    ensemble: dict[str, Any] | None = None  # tracking.ensemble: members, weights, metrics
    # several objectives, constraints or study.select: the front and the choice
    # (`Objectives.summary`); None for a study of one objective whose best trial is its model
    front: dict[str, Any] | None = None
    champion: str | None = None  # models:/NAME@champion when the model is the registry's champion

    @property
    def fit_counts(self) -> dict[str, int]:
        return {label: len(numbers) for label, numbers in self.fit_trials.items()}


def progress_of(
    study: optuna.Study,
    trial: FrozenTrial,
    total: int,
    durations: list[float],
    slots: int,
    elapsed: float,
    note: str = "",
    objectives: Objectives | None = None,
    seen: Any = None,
) -> Progress:
    """The study after `trial` finished: how many of `total` are done, the best so far, and
    the time left at the mean of this process's trial `durations` over its `slots`; its
    trials read through `seen` (a view of it, `_private.RecentTrials`) when given."""
    done = count_finished(seen or study)
    best = best_or_none(seen or study, objectives)
    mean = sum(durations) / len(durations) if durations else None
    return Progress(
        done=done,
        total=total,
        trial=trial,
        best_value=primary(best) if best else None,
        best_number=best.number if best else None,
        elapsed=elapsed,
        eta=mean * max(total - done, 0) / max(slots, 1) if mean is not None else None,
        note=note,
        study=study,
    )


def result_of(study: optuna.Study, **given: Any) -> StudyResult:
    """The study's result: its counts, best trial, fit labels, baselines and served model read
    from the storage, with what only this process knows (`given`: names, URIs, the test
    metrics, the device, timings)."""
    best = best_or_none(study)
    trials = study.get_trials(deepcopy=False)
    objectives = Objectives.of_study(study)
    return StudyResult(
        counts=state_counts(trials),
        best_number=best.number if best else None,
        best_value=primary(best) if best else None,
        best_se=best.user_attrs.get("value_se") if best else None,
        best_params=best.user_attrs.get("config", best.params) if best else {},
        fit_trials={
            label: [t.number for t in trials if t.user_attrs.get("fit") == label]
            for label in FIT_LABELS
        },
        baselines=compare_with_baselines(study),
        model_uri=(
            study.user_attrs.get("model_uri")
            if best and study.user_attrs.get("model_trial") == best.number
            else None
        ),
        champion=(
            (study.user_attrs.get("champion") or {}).get("uri")
            if best and (study.user_attrs.get("champion") or {}).get("trial") == best.number
            else None
        ),
        seed_noise=study.user_attrs.get("seed_noise"),
        ensemble=study.user_attrs.get("ensemble"),
        front=None if objectives.plain else objectives.summary(trials),
        test_model=(
            study.user_attrs.get("test_model", "")
            if best and study.user_attrs.get("test_trial") == best.number
            else ""
        ),
        study=study,
        **given,
    )
