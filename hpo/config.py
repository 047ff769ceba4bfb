"""The experiment spec: YAML loaded with safe_load, validated into typed models.

Every problem is collected with its YAML path before anything runs; `SpecError` carries them all.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hpo.registry import (
    ACTIVATIONS,
    DATASETS,
    INITS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRUNERS,
    SAMPLERS,
)

# Hyperparameters the platform knows, each with its kind, bounds and the value used when the
# search space leaves it out (the usual textbook default).
_REAL, _INT, _BOOL, _CHOICE = "real", "int", "bool", "choice"
PARAMS: dict[str, dict[str, Any]] = {
    "n_layers": {"kind": _INT, "min": 0, "default": 2},
    "width": {"kind": _INT, "min": 1, "default": 128},
    "activation": {"kind": _CHOICE, "registry": ACTIVATIONS, "default": "relu"},
    "dropout": {"kind": _REAL, "min": 0.0, "max_open": 1.0, "default": 0.0},
    "batchnorm": {"kind": _BOOL, "default": False},
    "init": {"kind": _CHOICE, "registry": INITS, "default": "default"},
    "optimizer": {"kind": _CHOICE, "registry": OPTIMIZERS, "default": "adam"},
    "lr": {"kind": _REAL, "min_open": 0.0, "default": 1e-3},
    "momentum": {"kind": _REAL, "min": 0.0, "max_open": 1.0, "default": 0.0},
    "nesterov": {"kind": _BOOL, "default": False},
    "weight_decay": {"kind": _REAL, "min": 0.0, "default": 0.0},
    "l1": {"kind": _REAL, "min": 0.0, "default": 0.0},
    "batch_size": {"kind": _INT, "min": 1, "default": 128},
    "lr_schedule": {"kind": _CHOICE, "registry": LR_SCHEDULES, "default": "none"},
    "grad_clip": {"kind": _REAL, "min": 0.0, "default": 0.0},  # max gradient norm; 0 = off
}

CLASSIFICATION_METRICS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
REGRESSION_METRICS = ("train_loss", "val_loss", "train_rmse", "val_rmse")


class SpecError(Exception):
    """Every problem found in a spec, one line each, with its YAML path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))


def metric_direction(metric: str) -> Literal["minimize", "maximize"]:
    """'maximize' for accuracies, 'minimize' for losses and errors."""
    return "maximize" if metric.endswith("accuracy") else "minimize"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitSpec(_Strict):
    val: float = 0.1
    test: float = 0.1
    stratify: bool = True
    seed: int = 0


class DatasetSpec(_Strict):
    name: str  # a name in registry.DATASETS
    path: str | None = None
    test_path: str | None = None
    target: str | None = None
    openml: str | int | None = None
    # Keep at most this many samples of the training pool (stratified); null keeps all.
    max_samples: int | None = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    scale: Literal["standard", "minmax", "none"] = "standard"


class Distribution(_Strict):
    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] | None = None
    per_layer: bool = False


class EarlyStoppingSpec(_Strict):
    monitor: str = "val_loss"
    patience: int = 5  # epochs without improvement before stopping
    min_delta: float = 0.0
    restore_best: bool = True


class TrainingSpec(_Strict):
    max_epochs: int = 30
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    device: str = "auto"


class SamplerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # the sampler's own options pass through
    name: str = "tpe"  # a name in registry.SAMPLERS
    seed: int | None = 0

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrunerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "median"  # a name in registry.PRUNERS

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StudySpec(_Strict):
    n_trials: int = 40
    timeout: float | None = None
    metric: str = "val_accuracy"
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=lambda: PrunerSpec(n_warmup_steps=3))
    storage: str | None = None


class TrackingSpec(_Strict):
    uri: str | None = None
    experiment: str | None = None
    log_model: Literal["best", "all", "none"] = "best"


class Spec(_Strict):
    name: str
    dataset: DatasetSpec
    task: Literal["auto", "classification", "regression"] = "auto"
    search_space: dict[str, Any]
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    study: StudySpec = Field(default_factory=StudySpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    # Not YAML keys: where the spec came from, so relative data paths resolve against it.
    source_dir: str = Field(default=".", exclude=True)
    raw_text: str = Field(default="", exclude=True)

    @property
    def space(self) -> dict[str, Any]:
        """search_space with every entry parsed: a fixed value or a `Distribution`."""
        return {k: _parse_entry(v) for k, v in self.search_space.items()}

    def data_path(self, key: Literal["path", "test_path"]) -> Path | None:
        """A dataset file path, resolved against the spec's folder."""
        value = getattr(self.dataset, key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.source_dir) / p

    def to_yaml(self) -> str:
        """The spec as written, or its validated form when it did not come from a file."""
        if self.raw_text:
            return self.raw_text
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """Hash of what makes trials comparable: data, task, search space and training."""
        keep = self.model_dump(include={"dataset", "task", "search_space", "training"})
        keep["training"].pop("device", None)
        keep["metric"] = self.study.metric
        blob = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _parse_entry(value: Any) -> Any:
    return Distribution(**value) if isinstance(value, dict) else value


# ---------------------------------------------------------------- loading


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raise `SpecError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such spec file"])
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"{path}: invalid YAML at {where}: {problem}"]) from None
    return parse_spec(raw, source_dir=path.parent, raw_text=text)


def parse_spec(raw: Any, source_dir: str | Path = ".", raw_text: str = "") -> Spec:
    """Validate an already-parsed YAML document into a `Spec`."""
    if not isinstance(raw, dict):
        raise SpecError([f"(top level): must be a mapping of keys (got {_show(raw)})"])
    problems: list[str] = []
    spec = None
    try:
        spec = Spec(**raw, source_dir=str(source_dir), raw_text=raw_text)
    except ValidationError as e:
        problems += [_format_pydantic(err) for err in e.errors()]
        # Drop the offending keys and try again, so the cross-field rules still get to report
        # their problems in the same pass.
        pruned = _without(raw, [tuple(err["loc"]) for err in e.errors()])
        try:
            partial = Spec(**pruned, source_dir=str(source_dir), raw_text=raw_text)
        except (ValidationError, TypeError):
            partial = None
        if partial is not None:
            problems += _check_semantics(partial)
    except TypeError as e:  # non-string keys at the top level
        problems.append(f"(top level): {e}")
    space = raw.get("search_space")
    if isinstance(space, dict):
        problems += _check_search_space(space)
    if spec is not None:
        problems += _check_semantics(spec)
    if problems:
        raise SpecError(problems)
    assert spec is not None
    return spec


def _without(raw: dict[str, Any], locs: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of `raw` with the value at each location removed."""
    out = copy.deepcopy(raw)
    for loc in locs:
        node: Any = out
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


# ---------------------------------------------------------------- messages


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}allowed: {', '.join(known)}"


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MODELS: dict[str, type[BaseModel]] = {
    "": Spec,
    "dataset": DatasetSpec,
    "dataset.split": SplitSpec,
    "training": TrainingSpec,
    "training.early_stopping": EarlyStoppingSpec,
    "study": StudySpec,
    "tracking": TrackingSpec,
}
_HIDDEN_FIELDS = {"source_dir", "raw_text"}


def _format_pydantic(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    got = err.get("input")
    where = _dotted(loc) or "(top level)"
    if kind == "extra_forbidden":
        parent = _dotted(loc[:-1])
        model = _MODELS.get(parent)
        known = [f for f in model.model_fields if f not in _HIDDEN_FIELDS] if model else []
        return f"{where}: unknown key; {_did_you_mean(str(loc[-1]), known)}"
    if kind == "missing":
        return f"{where}: is required"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        allowed = ", ".join(re.findall(r"'([^']*)'", expected)) or expected
        close = difflib.get_close_matches(str(got), allowed.split(", "), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{where}: must be one of {allowed} (got {_show(got)}){hint}"
    msg = err["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    msg = msg.replace("input should be", "must be")
    return f"{where}: {msg} (got {_show(got)})"


# ---------------------------------------------------------------- search space

_DIST_KEYS = list(Distribution.model_fields)


def _check_value(path: str, name: str, value: Any) -> list[str]:
    """A fixed value, or a choice, against the hyperparameter's kind and bounds."""
    rule = PARAMS[name]
    kind = rule["kind"]
    if kind == _BOOL:
        ok = isinstance(value, bool)
        return [] if ok else [f"{path}: must be true or false (got {_show(value)})"]
    if kind == _CHOICE:
        problem = rule["registry"].problem(path, value)
        return [problem] if problem else []
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "an integer" if kind == _INT else "a number"
        return [f"{path}: must be {what} (got {_show(value)})"]
    if kind == _INT and not float(value).is_integer():
        return [f"{path}: must be an integer (got {value})"]
    return _check_bounds(path, rule, value)


def _check_bounds(path: str, rule: dict[str, Any], value: float) -> list[str]:
    if "min" in rule and value < rule["min"]:
        return [f"{path}: must be >= {rule['min']} (got {value})"]
    if "min_open" in rule and value <= rule["min_open"]:
        return [f"{path}: must be > {rule['min_open']} (got {value})"]
    if "max_open" in rule and value >= rule["max_open"]:
        return [f"{path}: must be < {rule['max_open']} (got {value})"]
    if not math.isfinite(value):
        return [f"{path}: must be finite (got {value})"]
    return []


def _check_search_space(space: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    known = list(PARAMS)
    for name, entry in space.items():
        path = f"search_space.{name}"
        if name not in PARAMS:
            problems.append(f"{path}: unknown hyperparameter; {_did_you_mean(str(name), known)}")
            continue
        if not isinstance(entry, dict):
            problems += _check_value(path, name, entry)
            continue
        try:
            dist = Distribution(**entry)
        except ValidationError as e:
            for err in e.errors():
                err = dict(err, loc=("search_space", name, *err["loc"]))
                if err["type"] == "extra_forbidden":
                    key = str(err["loc"][-1])
                    problems.append(
                        f"{_dotted(err['loc'])}: unknown key; {_did_you_mean(key, _DIST_KEYS)}"
                    )
                else:
                    problems.append(_format_pydantic(err))
            continue
        problems += _check_distribution(path, name, dist, space)
    return problems


def _check_distribution(path: str, name: str, d: Distribution, space: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    rule = PARAMS[name]
    if d.type == "categorical":
        for key in ("low", "high", "step"):
            if getattr(d, key) is not None:
                problems.append(f"{path}.{key}: not used with type: categorical (use choices)")
        if d.log:
            problems.append(f"{path}.log: not used with type: categorical")
        if d.choices is None:
            problems.append(f"{path}.choices: is required for type: categorical")
        elif not d.choices:
            problems.append(f"{path}.choices: must not be empty")
        else:
            for i, c in enumerate(d.choices):
                problems += _check_value(f"{path}.choices[{i}]", name, c)
    else:
        if rule["kind"] in (_BOOL, _CHOICE):
            problems.append(
                f"{path}.type: {name} takes type: categorical or a fixed value (got {d.type})"
            )
            return problems
        if rule["kind"] == _INT and d.type == "float":
            problems.append(f"{path}.type: {name} is an integer; use type: int (got float)")
        if d.choices is not None:
            problems.append(f"{path}.choices: only used with type: categorical")
        for key in ("low", "high"):
            if getattr(d, key) is None:
                problems.append(f"{path}.{key}: is required for type: {d.type}")
        if d.low is not None and d.high is not None:
            if d.low > d.high:
                problems.append(f"{path}: low must be <= high (got low={d.low}, high={d.high})")
            log_low = d.log and d.low <= 0
            if log_low:
                problems.append(f"{path}.low: must be > 0 when log: true (got {d.low})")
            for key in ("low", "high"):
                v = getattr(d, key)
                if key == "low" and log_low:
                    continue  # already reported, more specifically
                if d.type == "int" and not float(v).is_integer():
                    problems.append(f"{path}.{key}: must be an integer for type: int (got {v})")
                else:
                    problems += _check_bounds(f"{path}.{key}", rule, v)
        if d.step is not None:
            if d.log:
                problems.append(f"{path}.step: cannot be combined with log: true")
            if d.step <= 0:
                problems.append(f"{path}.step: must be > 0 (got {d.step})")
    if d.per_layer and name != "width":
        problems.append(f"{path}.per_layer: only width can be per layer (got it on {name})")
    if d.when is not None:
        for cond, allowed in d.when.items():
            if cond not in space or cond == name:
                others = [k for k in space if k != name]
                problems.append(
                    f"{path}.when.{cond}: must name another entry of search_space; "
                    f"{_did_you_mean(str(cond), others)}"
                )
                continue
            values = allowed if isinstance(allowed, list) else [allowed]
            for v in values:
                if cond in PARAMS:
                    problems += _check_value(f"{path}.when.{cond}", cond, v)
    return problems


# ---------------------------------------------------------------- cross-field rules


def _check_semantics(spec: Spec) -> list[str]:
    problems: list[str] = []
    ds = spec.dataset
    sp = ds.split
    for key in ("val", "test"):
        v = getattr(sp, key)
        if not 0.0 < v < 1.0:
            problems.append(f"dataset.split.{key}: must be between 0 and 1, exclusive (got {v})")
    if 0 < sp.val < 1 and 0 < sp.test < 1 and sp.val + sp.test >= 1:
        problems.append(
            f"dataset.split: val + test must leave data to train on (got {sp.val} + {sp.test})"
        )
    if ds.max_samples is not None and ds.max_samples < 10:
        problems.append(f"dataset.max_samples: must be >= 10 or null (got {ds.max_samples})")

    task = spec.task
    names = (
        (DATASETS, ds.name),
        (SAMPLERS, spec.study.sampler.name),
        (PRUNERS, spec.study.pruner.name),
    )
    problems += [p for reg, name in names if (p := reg.problem(reg.key, name))]
    entry = DATASETS.get(ds.name)
    if entry is not None:
        for key in ("path", "test_path", "target", "openml"):
            given = getattr(ds, key) is not None
            if key in entry.requires and not given:
                what = " (a name or an id)" if key == "openml" else ""
                problems.append(f"dataset.{key}: is required for dataset {ds.name}{what}")
            elif given and key not in entry.requires + entry.accepts:
                problems.append(f"dataset.{key}: not used with dataset {ds.name}")
        if entry.task is None and "path" in entry.requires:  # a table: its target says
            detected, table_problems = _check_table(spec)
            problems += table_problems
            if task == "auto":
                task = detected or "auto"
        elif entry.task is not None:
            if task not in ("auto", entry.task):
                problems.append(f"task: {ds.name} is a {entry.task} dataset (got {task})")
            task = entry.task

    allowed = {
        "classification": CLASSIFICATION_METRICS,
        "regression": REGRESSION_METRICS,
        "auto": tuple(dict.fromkeys(CLASSIFICATION_METRICS + REGRESSION_METRICS)),
    }[task]
    for where, metric in (
        ("study.metric", spec.study.metric),
        ("training.early_stopping.monitor", spec.training.early_stopping.monitor),
    ):
        if metric not in allowed:
            what = f"a {task} task" if task != "auto" else "any task"
            problems.append(
                f"{where}: {metric!r} does not fit {what}; {_did_you_mean(metric, allowed)}"
            )

    t = spec.training
    if t.max_epochs < 1:
        problems.append(f"training.max_epochs: must be >= 1 (got {t.max_epochs})")
    if t.early_stopping.patience < 1:
        problems.append(
            f"training.early_stopping.patience: must be >= 1 (got {t.early_stopping.patience})"
        )
    if t.early_stopping.min_delta < 0:
        problems.append(
            f"training.early_stopping.min_delta: must be >= 0 (got {t.early_stopping.min_delta})"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device):
        problems.append(
            f"training.device: must be auto, cpu, cuda, cuda:N or mps (got {t.device!r})"
        )

    st = spec.study
    if st.n_trials < 1:
        problems.append(f"study.n_trials: must be >= 1 (got {st.n_trials})")
    if st.timeout is not None and st.timeout <= 0:
        problems.append(f"study.timeout: must be > 0 seconds or null (got {st.timeout})")
    if not spec.name.strip():
        problems.append("name: must not be empty")
    return problems


def _check_table(spec: Spec) -> tuple[str | None, list[str]]:
    """Check csv/parquet files and the target column; return the task the target implies."""
    import pandas as pd  # only csv/parquet specs pay for it

    problems: list[str] = []
    ds = spec.dataset
    detected = None
    for key in ("path", "test_path"):
        path = spec.data_path(key)  # type: ignore[arg-type]
        if path is None:
            continue
        if not path.is_file():
            problems.append(f"dataset.{key}: file not found: {path}")
            continue
        if ds.target is None:
            continue
        try:
            if ds.name == "csv":
                frame = pd.read_csv(path)
            else:
                frame = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            problems.append(f"dataset.{key}: cannot read {path} as {ds.name}: {e}")
            continue
        if ds.target not in frame.columns:
            cols = [str(c) for c in frame.columns]
            problems.append(
                f"dataset.target: no column {ds.target!r} in {path.name}; "
                f"{_did_you_mean(ds.target, cols)}"
            )
            continue
        y = frame[ds.target].dropna()
        if key == "path":
            if y.nunique() < 2:
                problems.append(
                    f"dataset.target: column {ds.target!r} in {path.name} is constant "
                    f"(got {y.nunique()} distinct value); it must vary"
                )
            detected = infer_task(y)
    return detected, problems


def infer_task(y: Any) -> Literal["classification", "regression"]:
    """Regression for floats with fractional values or many levels, else classification."""
    import pandas as pd

    y = pd.Series(y).dropna()
    if pd.api.types.is_float_dtype(y):
        fractional = bool((y != y.round()).any())
        if fractional or y.nunique() > 20:
            return "regression"
        return "classification"
    if pd.api.types.is_integer_dtype(y) and y.nunique() > 20:
        return "regression"
    return "classification"
