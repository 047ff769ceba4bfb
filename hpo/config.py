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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hpo.params import PARAMS, Param, TrialConfig, default_config
from hpo.redact import url_problem
from hpo.registry import (
    DATASETS,
    PRECISIONS,
    PRUNERS,
    SAMPLERS,
    did_you_mean,
)

MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; this is far beyond any real one
MAX_SPEC_VALUES = 100_000  # values in the loaded document, aliases expanded
MAX_GRID_POINTS = 100_000  # configurations a grid may have (Optuna builds the grid in memory)
MAX_NAME = 100  # characters in a study name
MAX_ONE_HOT = 1_000  # features a table's text columns may one-hot encode into
GRID_FLOAT_POINTS = 4  # points per float range the grid sampler gets when no step is given
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

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
    # Rows with no target value: an error unless this drops them (tables only).
    drop_missing_target: bool = False
    # Test-file rows whose label the training file lacks: an error, or dropped and counted.
    test_unseen_labels: Literal["error", "drop"] = "error"
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
    precision: str = "auto"  # auto | fp32 | tf32 | bf16: how matrix products are computed
    # Opt-ins to search a space whose largest models do not fit: configurations past either
    # limit fail as trials, with the reason, instead of the spec being refused (see resources).
    max_params: int | None = None
    memory_limit: int | float | str | None = None  # bytes, or "8GB", "512MiB"
    # A worker process silent for 10x its trial's median epoch, and at least this many
    # seconds, has stalled: killed, replaced, its trial run again once. null: never.
    stall_timeout: float | None = 300.0


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
    # Trials trained together as one stacked model on one device (see hpo/steppers.py).
    fused_trials: int = 1


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
    # Named fixed configurations run once per study before the search (see `baseline_config`).
    baselines: list[Any] = Field(default_factory=list)
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

    def baseline_config(self, name: str, n_train: int | None = None) -> TrialConfig:
        """A baseline's full configuration: the defaults, the search space's fixed values, then
        the baseline's own; `width` may list one width per layer. With `n_train`, its batch
        size is at most the training rows (the default 128 on 113 rows said 128 and was 113)."""
        [entry] = [b for b in self.baselines if b.get("name") == name]
        config = default_config()
        config.update({k: v for k, v in self.space.items() if not isinstance(v, Distribution)})
        config.update({k: v for k, v in entry.items() if k != "name"})
        if n_train is not None and int(config["batch_size"]) > n_train:
            config["batch_size"] = n_train
        return TrialConfig.of(config)

    def to_yaml(self) -> str:
        """The spec as written, or its validated form when it did not come from a file."""
        if self.raw_text:
            return self.raw_text
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self, search_space: dict[str, Any] | None = None) -> str:
        """Hash of what makes trials comparable: data, task, search space and training."""
        keep = self.model_dump(include={"dataset", "task", "search_space", "training"})
        if search_space is not None:
            keep["search_space"] = search_space
        keep["training"].pop("device", None)
        # neither changes what a trial trains on or how: studies from before them resume
        keep["training"].pop("stall_timeout", None)
        keep["dataset"].pop("test_unseen_labels", None)
        if keep["training"].get("precision") == "auto":  # studies from before the key
            keep["training"].pop("precision")
        keep["metric"] = self.study.metric
        blob = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def fingerprints(self) -> tuple[str, ...]:
        """The hash, then the one the spec had when hpo read YAML as 1.1 does (`1e-5` a
        string, kept so in the search space): a study stored then matches either."""
        try:
            then = yaml.safe_load(self.raw_text) if self.raw_text else None
        except yaml.YAMLError:
            then = None
        if isinstance(then, dict) and isinstance(then.get("search_space"), dict):
            return self.fingerprint(), self.fingerprint(then["search_space"])
        return (self.fingerprint(),)


def read_yaml(text: str) -> Any:
    """A spec's YAML as hpo reads it (numbers as in YAML 1.2); raises yaml.YAMLError."""
    loader = _SpecLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _parse_entry(value: Any) -> Any:
    return Distribution(**value) if isinstance(value, dict) else value


# ---------------------------------------------------------------- loading


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; raise `SpecError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a spec file" if path.is_dir() else "no such spec file"
        raise SpecError([f"{path}: {what}"])
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(
            [f"{path}: {path.stat().st_size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,}"]
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            [
                f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                "save it as UTF-8"
            ]
        ) from None
    loader = _SpecLoader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"{path}: invalid YAML at {where}: {problem}"]) from None
    finally:
        loader.dispose()
    if loader.problems:
        raise SpecError([f"{path}: {p}" for p in loader.problems])
    if _count_values(raw, MAX_SPEC_VALUES) > MAX_SPEC_VALUES:
        raise SpecError(
            [
                f"{path}: the YAML expands to more than {MAX_SPEC_VALUES:,} values (an alias, "
                "*name, repeats all it points to); write the values out instead"
            ]
        )
    return parse_spec(raw, source_dir=path.parent, raw_text=text)


class _SpecLoader(yaml.SafeLoader):
    """safe_load that notes duplicate keys (YAML keeps the last one without a word)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.problems: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if first != line:
                self.problems.append(
                    f"line {line}: duplicate key {key!r} (first on line {first}); keep one"
                )
        return super().construct_mapping(node, deep=deep)


# `lr: 1e-3` is a number, as in YAML 1.2 and every other config format (YAML 1.1, which PyYAML
# follows, wants `1.0e-3` and reads `1e-3` as a string)
_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _count_values(value: Any, limit: int) -> int:
    """How many values a loaded document holds once its aliases are expanded, counting no
    further than just past `limit` (an alias bomb is never walked in full)."""
    count, stack = 0, [value]
    while stack and count <= limit:
        v = stack.pop()
        count += 1
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return count


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
    if isinstance(raw.get("baselines"), list):
        problems += _check_baselines(raw["baselines"], raw.get("search_space"))
    if spec is not None:
        problems += _check_semantics(spec)
    if problems:
        raise SpecError(problems)
    assert spec is not None
    return spec


def _check_baselines(baselines: list[Any], space: Any) -> list[str]:
    """Each baseline: a unique name and known hyperparameters with allowed fixed values."""
    problems: list[str] = []
    seen: set[str] = set()
    fixed = (
        {k: v for k, v in space.items() if not isinstance(v, dict)}
        if isinstance(space, dict)
        else {}
    )
    for i, entry in enumerate(baselines):
        path = f"baselines[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{path}: must be a mapping with a name and hyperparameters")
            continue
        name = entry.get("name")
        if not isinstance(name, str):
            problems.append(f"{path}.name: required, a name for the baseline")
        else:
            problem = name_problem(name, f"{path}.name")
            if problem:
                problems.append(problem)
            if name in seen:
                problems.append(f"{path}.name: {name!r} is used by an earlier baseline")
            seen.add(name)
        for key, value in entry.items():
            where = f"{path}.{key}"
            if key == "name":
                continue
            if key not in PARAMS:
                hint = did_you_mean(key, list(PARAMS))
                problems.append(f"{where}: unknown hyperparameter; {hint}")
            elif key == "width" and isinstance(value, list):
                for j, w in enumerate(value):
                    problems += _check_value(f"{where}[{j}]", "width", w)
                n = entry.get("n_layers", fixed.get("n_layers", PARAMS["n_layers"].default))
                if isinstance(n, int) and len(value) != n:
                    problems.append(
                        f"{where}: {len(value)} widths for n_layers {n}; give one per layer"
                    )
            elif isinstance(value, dict):
                problems.append(f"{where}: a baseline takes fixed values (got a distribution)")
            else:
                problems += _check_value(where, key, value)
    return problems


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
        return f"{where}: unknown key; {did_you_mean(str(loc[-1]), known)}"
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
    kind = rule.kind
    if kind == "bool":
        ok = isinstance(value, bool)
        return [] if ok else [f"{path}: must be true or false (got {_show(value)})"]
    if kind == "choice":
        assert rule.registry is not None
        problem = rule.registry.problem(path, value)
        return [problem] if problem else []
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "an integer" if kind == "int" else "a number"
        return [f"{path}: must be {what} (got {_show(value)})"]
    if kind == "int" and not float(value).is_integer():
        return [f"{path}: must be an integer (got {value})"]
    return _check_bounds(path, rule, value)


def _check_bounds(path: str, rule: Param, value: float) -> list[str]:
    problem = rule.bound_problem(value)
    return [f"{path}: {problem} (got {value})"] if problem else []


def _check_search_space(space: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    known = list(PARAMS)
    for name, entry in space.items():
        path = f"search_space.{name}"
        if name not in PARAMS:
            problems.append(f"{path}: unknown hyperparameter; {did_you_mean(str(name), known)}")
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
                        f"{_dotted(err['loc'])}: unknown key; {did_you_mean(key, _DIST_KEYS)}"
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
        if rule.kind in ("bool", "choice"):
            problems.append(
                f"{path}.type: {name} takes type: categorical or a fixed value (got {d.type})"
            )
            return problems
        if rule.kind == "int" and d.type == "float":
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
            elif d.type == "int" and not float(d.step).is_integer():
                problems.append(f"{path}.step: must be an integer for type: int (got {d.step})")
    if d.per_layer and name != "width":
        problems.append(f"{path}.per_layer: only width can be per layer (got it on {name})")
    if d.when is not None:
        for cond, allowed in d.when.items():
            if cond not in space or cond == name:
                others = [k for k in space if k != name]
                problems.append(
                    f"{path}.when.{cond}: must name another entry of search_space; "
                    f"{did_you_mean(str(cond), others)}"
                )
                continue
            values = allowed if isinstance(allowed, list) else [allowed]
            for v in values:
                if cond in PARAMS:
                    problems += _check_value(f"{path}.when.{cond}", cond, v)
    return problems


# ---------------------------------------------------------------- cross-field rules


def metric_problems(spec: Spec, task: str) -> list[str]:
    """The study's metric and early stopping's monitor against the task ("auto": either)."""
    allowed = {
        "classification": CLASSIFICATION_METRICS,
        "regression": REGRESSION_METRICS,
        "auto": tuple(dict.fromkeys(CLASSIFICATION_METRICS + REGRESSION_METRICS)),
    }[task]
    problems = []
    for where, metric in (
        ("study.metric", spec.study.metric),
        ("training.early_stopping.monitor", spec.training.early_stopping.monitor),
    ):
        if metric not in allowed:
            what = f"a {task} task" if task != "auto" else "any task"
            problems.append(
                f"{where}: {metric!r} does not fit {what}; {did_you_mean(metric, allowed)}"
            )
    return problems


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
    if not 0 <= sp.seed < 2**32:
        problems.append(f"dataset.split.seed: must be between 0 and 2**32 - 1 (got {sp.seed})")
    if ds.test_unseen_labels != "error" and not ds.test_path:
        problems.append("dataset.test_unseen_labels: only used with dataset.test_path")
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
        for key in ("path", "test_path", "target", "openml", "drop_missing_target"):
            given = getattr(ds, key) not in (None, False)
            if key in entry.requires and not given:
                what = " (a name or an id)" if key == "openml" else ""
                problems.append(f"dataset.{key}: is required for dataset {ds.name}{what}")
            elif given and key not in entry.requires + entry.accepts:
                problems.append(f"dataset.{key}: not used with dataset {ds.name}")
        if entry.task is not None:  # a table's target says which (`hpo.tables`)
            if task not in ("auto", entry.task):
                problems.append(f"task: {ds.name} is a {entry.task} dataset (got {task})")
            task = entry.task

    problems += metric_problems(spec, task)

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
    if t.stall_timeout is not None and not t.stall_timeout > 0:
        problems.append(
            f"training.stall_timeout: must be > 0 seconds or null (got {t.stall_timeout})"
        )
    if t.max_params is not None and t.max_params < 1:
        problems.append(f"training.max_params: must be >= 1 (got {t.max_params})")
    if t.memory_limit is not None and parse_bytes(t.memory_limit) is None:
        problems.append(
            f"training.memory_limit: must be a size such as 8GB, 512MiB or a number of bytes "
            f"(got {str(t.memory_limit)[:40]!r})"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device):
        problems.append(
            f"training.device: must be auto, cpu, cuda, cuda:N or mps (got {t.device!r})"
        )
    if t.precision not in PRECISIONS:
        problems.append(
            f"training.precision: must be one of {', '.join(PRECISIONS)} (got {t.precision!r})"
        )

    st = spec.study
    if st.n_trials < 1:
        problems.append(f"study.n_trials: must be >= 1 (got {st.n_trials})")
    if st.fused_trials < 1:
        problems.append(f"study.fused_trials: must be >= 1 (got {st.fused_trials})")
    for where, url in (("study.storage", st.storage), ("tracking.uri", spec.tracking.uri)):
        if problem := url_problem(url, where):
            problems.append(problem)
    if st.timeout is not None and st.timeout <= 0:
        problems.append(f"study.timeout: must be > 0 seconds or null (got {st.timeout})")
    problem = name_problem(spec.name, "name")
    if problem:
        problems.append(problem)
    if st.sampler.name == "grid":
        problems += _check_grid(spec)
    return problems


_SIZE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SIZE_UNITS.update({"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40})


def parse_bytes(value: Any) -> int | None:
    """A memory size: a number of bytes, or '8GB', '512 MiB', '2g'. None when not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value) if 0 < value < 1e18 else None
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?)?b?\s*", str(value).lower())
    if not m:
        return None
    n = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
    return int(n) if 0 < n < 1e18 else None


def name_problem(name: str, where: str) -> str | None:
    """None for a usable study name, else why not: it names files and folders (reports)."""
    if len(name) <= MAX_NAME and _NAME.fullmatch(name):
        return None
    shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name):,} characters)"
    return (
        f"{where}: must be 1 to {MAX_NAME} letters, digits, '-', '_' or '.', starting with a "
        f"letter or digit (got {shown})"
    )


def folder_name(name: str) -> str:
    """A study name made safe as one folder name (names stored by other tools may be anything)."""
    if name_problem(name, "") is None:
        return name
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:MAX_NAME].lstrip(".")
    return safe or "study"


def grid_values(d: Distribution) -> Sequence[Any]:
    """The values the grid sampler walks for one distribution: every choice; every value (every
    `step`) of an int range; every `step` of a float range from `low`, `high` included when a
    step lands on it; `GRID_FLOAT_POINTS` points of a float range without `step` and of a log
    int range (log-spaced with `log: true`, rounded and unique for ints). A range of ints
    stays a `range`, so its size is known without listing it."""
    if d.type == "categorical":
        return list(d.choices or [])
    low, high = float(d.low or 0), float(d.high or 0)
    if d.type == "int" and not d.log:
        return range(int(low), int(high) + 1, int(d.step or 1))
    if d.type == "int":
        points = np.unique(np.round(np.geomspace(low, high, GRID_FLOAT_POINTS)).astype(int))
        return [int(v) for v in points]
    if d.step:
        # numpy's values as they are (the last may be a rounding error above high): Optuna's
        # grid sampler compares a resumed study's grid with the stored one value for value
        return [float(v) for v in np.arange(low, high + d.step / 2, d.step)]
    spaced = np.geomspace if d.log else np.linspace
    return [float(v) for v in spaced(low, high, GRID_FLOAT_POINTS)]


def grid_points(d: Distribution) -> int:
    """How many values the grid sampler walks for one distribution."""
    if d.type == "float" and d.step:  # numpy.arange's length, without making the array
        return max(math.ceil((float(d.high) + d.step / 2 - float(d.low)) / d.step), 0)
    return len(grid_values(d))


def _check_grid(spec: Spec) -> list[str]:
    space = {k: v for k, v in spec.space.items() if isinstance(v, Distribution)}
    if any(d.low is None or d.high is None for d in space.values() if d.type != "categorical"):
        return []  # reported already
    n_layers = spec.space.get("n_layers", PARAMS["n_layers"].default)
    layers = int(n_layers.high) if isinstance(n_layers, Distribution) else int(n_layers)
    total, biggest = 1, ("", 0)
    for name, d in space.items():
        n = grid_points(d)
        if n > biggest[1]:
            biggest = (name, n)
        for _ in range(layers if d.per_layer and n > 1 else 1):  # one value per layer
            total *= n
            if total > MAX_GRID_POINTS:
                break
        if total > MAX_GRID_POINTS:
            return [
                f"study.sampler: the grid has more than {MAX_GRID_POINTS:,} points "
                f"(search_space.{biggest[0]} alone has {biggest[1]:,} values); at most "
                f"{MAX_GRID_POINTS:,}: add step:, narrow the ranges, or use sampler random or tpe"
            ]
    return []
