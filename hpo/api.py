"""hpo from Python: run a study from a spec, read a finished one back.

```python
import hpo

result = hpo.run("search_spaces/digits.yaml", n_trials=20, training={"max_epochs": 10})
result.best_trial, result.test_metrics, result.study      # an optuna.Study
model = result.best_model()                               # raw rows in, labels out
hpo.load("digits-mlp", storage="sqlite:///optuna.db")     # a finished study's result
```

The CLI's `hpo run` is this `run` with a terminal display. Process workers (`workers=2`)
start fresh Python processes: in a script, call `run` under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo.config import Spec, SpecError, load_spec, parse_spec, spec_from_text
from hpo.outage import RETRY_S, stop_signals_between_calls
from hpo.outcomes import best_or_none
from hpo.results import EpochProgress, Progress, StudyResult

SpecLike = Spec | Mapping[str, Any] | str | os.PathLike[str]
Callback = Callable[[optuna.Study, FrozenTrial], None]  # Optuna's `optimize` callbacks


@dataclass
class Result:
    """A study's outcome: the `optuna.Study` itself, its best trial, the test metrics of the
    best model (evaluated once), and that model."""

    study: optuna.Study
    tracking_uri: str | None
    summary: StudyResult | None = None  # what this run did; None for a loaded study

    @property
    def best_trial(self) -> FrozenTrial | None:
        """The best finished trial (ties go to the lower number); None if none completed."""
        return best_or_none(self.study)

    @property
    def test_metrics(self) -> dict[str, float]:
        """The best model's test_* metrics, once it has been evaluated."""
        attrs = self.study.user_attrs
        best = self.best_trial
        if best is None or attrs.get("test_trial") != best.number:
            return {}
        return dict(attrs.get("test_metrics") or {})

    @classmethod
    def of(cls, study: optuna.Study, tracking_uri: str | None = None) -> Result:
        """A stored study's result; its model read from `tracking_uri`, else from the tracking
        store the study recorded (unless its URL had a password, which is never stored)."""
        from hpo.redact import recorded_uri

        return cls(study, tracking_uri or recorded_uri(study.user_attrs.get("tracking_uri")))

    def best_model(self) -> Any:
        """The study's logged model, its best trial's (`hpo.serving.Predictor`), through the
        registry (`models:/NAME@champion`) when it is the champion: `predict(rows)` takes raw
        rows (a DataFrame of the data file's columns, or raw pixels) and gives labels.
        LookupError when there is none."""
        from hpo.tracking import load_predictor

        attrs = self.study.user_attrs
        uri = attrs.get("model_uri")
        champion = attrs.get("champion") or {}
        if uri and champion.get("model_uri") == uri:  # the registry's name for it
            uri = champion["uri"]
        if not uri:
            raise LookupError(
                f"study {self.study.study_name!r} has no logged model (tracking.log_model: "
                "none, or the search has not finished a trial yet)"
            )
        return load_predictor(uri, self.tracking_uri)


def spec_of(spec: SpecLike, values: Mapping[str, Any] | None = None) -> Spec:
    """A validated spec from a path, YAML text or a mapping, with `values` set (dotted paths,
    `{"training.max_epochs": 5}`, or sections, `{"training": {"max_epochs": 5}}`)."""
    if isinstance(spec, Spec):
        parsed = spec
    elif isinstance(spec, Mapping):
        parsed = parse_spec(dict(spec))
    elif isinstance(spec, os.PathLike) or _names_a_file(spec):
        parsed = load_spec(spec)
    else:
        parsed = spec_from_text(spec, ".", "spec")
    dotted = _dotted(values or {})
    return parsed.with_values(dotted) if dotted else parsed


def _names_a_file(text: str) -> bool:
    """A one-line string is a path (YAML text of a spec has several lines)."""
    return "\n" not in text.strip()


def _dotted(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Sections as dotted paths; a search-space entry (a distribution) stays whole."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        whole = path.startswith("search_space.") or path == "baselines"
        if isinstance(value, Mapping) and value and not whole:
            out |= _dotted(value, f"{path}.")
        else:
            out[path] = value
    return out


# The options of `hpo run` (and keywords of `hpo.run`) that are shorthands for a spec key.
SHORTHANDS = {
    "n_trials": "study.n_trials",
    "timeout": "study.timeout",
    "fused_trials": "study.fused_trials",
    "device": "training.device",
    "max_epochs": "training.max_epochs",
    "max_samples": "dataset.max_samples",
}


# What a worker process says when the script it imports calls hpo.run at its top level.
WORKER_IMPORTED_SCRIPT = (
    "hpo.run was called while a worker process imported the script that calls it: the "
    "trials train in worker processes, which import that script; call hpo.run under `if "
    '__name__ == "__main__":`'
)


def run(
    spec: SpecLike,
    *,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    max_epochs: int | None = None,
    max_samples: int | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    seed: int | None = None,
    workers: int | None = None,
    workers_per_gpu: int | None = None,
    fused_trials: int | None = None,
    ray: str | None = None,
    gpus_per_worker: float | None = None,
    warm_start: Iterable[str] = (),
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    retry_for: float = RETRY_S,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_trial_end: Callable[[Progress], None] | None = None,
    on_epoch: Callable[[EpochProgress], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    **values: Any,
) -> Result:
    """Run (or continue, or join) the study `spec` describes and evaluate its best model once
    on the test split. Keyword sections override the spec's (`training={"max_epochs": 10}`)
    and are validated as the file is; `storage` and `tracking_uri` beat $HPO_STORAGE and
    $MLFLOW_TRACKING_URI, which beat the spec. `callbacks` are called as Optuna's are, with
    the study and each finished trial. `progress` prints a line per trial (with a live panel
    on a terminal) unless `on_start`, `on_trial_end` or `on_epoch` take over. KeyboardInterrupt
    stops cleanly: running trials are interrupted and run again when the same call is made
    again. `warm_start`: earlier studies in the same storage whose compatible finished trials
    start this one (added to `study.warm_start`)."""
    import multiprocessing

    from hpo.executors.local import local_executor
    from hpo.study import run_study
    from hpo.tracking import tracker_for

    if multiprocessing.current_process().name.startswith("hpo-worker"):
        raise RuntimeError(WORKER_IMPORTED_SCRIPT)

    given = {"n_trials": n_trials, "timeout": timeout, "fused_trials": fused_trials,
             "device": device, "max_epochs": max_epochs, "max_samples": max_samples}  # fmt: skip
    values |= {SHORTHANDS[k]: v for k, v in given.items() if v is not None}
    loaded = spec_of(spec, values)
    if warm := [w for w in warm_start if w not in loaded.study.warm_start]:
        loaded = loaded.with_values({"study.warm_start": [*loaded.study.warm_start, *warm]})
    try:
        if ray is not None:
            from hpo.executors.ray import ray_executor

            executor = ray_executor(loaded, ray, workers, gpus_per_worker)
        else:
            if gpus_per_worker is not None:
                raise SpecError(["--gpus-per-worker: only used with --ray"])
            executor = local_executor(loaded, workers, workers_per_gpu)
    except SpecError as e:
        raise SpecError(e.problems, source="command line") from None
    tracker = tracker_for(loaded, tracking_uri, study_name)
    hooks = list(callbacks)
    display: Any = contextlib.nullcontext()
    if progress and on_start is None and on_trial_end is None and on_epoch is None:
        from hpo.progress import StudyDisplay

        display = StudyDisplay(loaded.study.metric, spec=loaded)
        on_start, on_trial_end, on_epoch = display.on_start, display.on_trial_end, display.on_epoch

    def trial_end(p: Progress) -> None:
        if on_trial_end is not None:
            on_trial_end(p)
        for hook in hooks:
            hook(p.study, p.trial)

    # Ctrl-C (a notebook's interrupt) and SIGTERM stop the study as in the CLI, never inside a
    # write to the storage or the tracking store; signals can only be caught on the main thread.
    main = threading.current_thread() is threading.main_thread()
    with stop_signals_between_calls() if main else contextlib.nullcontext(), display:
        summary = run_study(
            loaded,
            tracker,
            executor,
            study_name=study_name,
            storage=storage,
            seed=seed,
            on_trial_end=trial_end,
            on_start=on_start,
            on_epoch=on_epoch,
            retry_s=retry_for,
            on_notice=on_notice,
        )
    assert summary.study is not None
    return Result(summary.study, tracker.uri, summary)


def load(study_name: str, storage: str | None = None, tracking_uri: str | None = None) -> Result:
    """A study's result, read from its storage (default: $HPO_STORAGE, else
    sqlite:///optuna.db in the working folder); see `Result.of` for its model."""
    from hpo.preflight import resolve_storage
    from hpo.storage import open_storage

    url = resolve_storage(None, storage)
    return Result.of(
        optuna.load_study(study_name=study_name, storage=open_storage(url)), tracking_uri
    )


@dataclass
class Written:
    """What `report` and `compare` wrote: the folder (index.html, report.md, figures) and the
    same content as values."""

    folder: Path
    data: Any  # the report's data (report.json's, as a dict); a comparison's `CompareData`


def report(
    study_name: str,
    storage: str | None = None,
    tracking_uri: str | None = None,
    out: str | os.PathLike[str] | None = None,
) -> Written:
    """`hpo report`: the study's report written to `out` (default reports/STUDY)."""
    import json

    from hpo.reports import write_report

    loaded = load(study_name, storage, tracking_uri)
    folder = write_report(loaded.study, out, loaded.tracking_uri)
    return Written(folder, json.loads((folder / "report.json").read_text()))


def compare(
    study_names: list[str],
    storage: str | None = None,
    out: str | os.PathLike[str] | None = None,
    reseed: int = 0,
) -> Written:
    """`hpo compare`: the studies side by side (with `reseed` K, each best configuration
    trained K more times to weigh the difference against seed noise)."""
    from hpo.config import folder_name
    from hpo.reports.compare import compare_data, write_compare

    studies = [load(name, storage).study for name in study_names]
    folder = Path(out or Path("reports") / folder_name("compare-" + "-".join(study_names)))
    data = compare_data(studies, reseed)
    return Written(write_compare(studies, folder, reseed, data), data)
