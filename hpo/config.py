"""The experiment spec: YAML loaded with safe_load, validated into typed models.

Every problem is collected with its YAML path before anything runs; `SpecError` carries them all.
Fields and their bounds are the models' (search_space and baselines in `hpo.distributions`,
built from the hyperparameter table); the rules that read two settings at once are here.
Parsing reads no file: data files are checked when the data is loaded (`hpo.tables`).
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from hpo.distributions import (
    MAX_NAME,
    TAGS,
    Baseline,
    Categorical,
    Distribution,
    FloatRange,
    IntRange,
    Name,
    SearchSpace,
    Strict,
    grid_points,
    largest,
    name_problem,
    problem,
    registry_name,
    show,
    value_type,
)
from hpo.params import PARAMS, TrialConfig, default_config
from hpo.redact import url_problem
from hpo.registry import DATASETS, PRECISIONS, PRUNERS, SAMPLERS, did_you_mean

MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; this is far beyond any real one
MAX_SPEC_VALUES = 100_000  # values in the loaded document, aliases expanded
MAX_GRID_POINTS = 100_000  # configurations a grid may have (Optuna builds the grid in memory)
MAX_ONE_HOT = 1_000  # features a table's text columns may one-hot encode into

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


class SplitSpec(Strict):
    val: Annotated[float, Field(gt=0, lt=1)] = 0.1
    test: Annotated[float, Field(gt=0, lt=1)] = 0.1
    stratify: bool = True
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    # K-fold cross-validation over the training pool (everything but the test split) in place
    # of one validation split: each trial trains K members, fold k validated on the k-th
    # K-th of the pool and trained on the rest, as one fused cohort; null: one split (`val`).
    folds: Annotated[int, Field(ge=2, le=20)] | None = None
    # The chosen trial's model (tested once, logged, served). `refit`: its configuration
    # trained again on the whole pool (train + validation) for its kept epoch (with members,
    # their median); `fold_ensemble` (folds only): the mean of its fold models' probabilities
    # (or values); null: `refit` with folds, otherwise the trial's own kept weights.
    final_model: Literal["refit", "fold_ensemble"] | None = None


class DatasetSpec(Strict):
    name: registry_name(DATASETS)  # type: ignore[valid-type]
    path: str | None = None
    test_path: str | None = None
    target: str | None = None
    openml: str | int | None = None
    # Rows with no target value: an error unless this drops them (tables only).
    drop_missing_target: bool = False
    # Test-file rows whose label the training file lacks: an error, or dropped and counted.
    test_unseen_labels: Literal["error", "drop"] = "error"
    # Keep at most this many samples of the training pool (stratified); null keeps all.
    max_samples: Annotated[int, Field(ge=10)] | None = None
    split: SplitSpec = Field(default_factory=SplitSpec)
    scale: Literal["standard", "minmax", "none"] = "standard"


class EarlyStoppingSpec(Strict):
    monitor: str = "val_loss"
    patience: Annotated[int, Field(ge=1)] = 5  # epochs without improvement before stopping
    min_delta: Annotated[float, Field(ge=0)] = 0.0
    restore_best: bool = True


def _device(value: str) -> str:
    if not re.fullmatch(_DEVICE, value):
        raise problem(f"must be auto, cpu, cuda, cuda:N or mps (got {value!r})")
    return value


_DEVICE = r"auto|cpu|cuda(:\d+)?|mps"


class TrainingSpec(Strict):
    max_epochs: Annotated[int, Field(ge=1)] = 30
    # Each trial trains its configuration this many times, each copy with its own seed
    # (initialisation, dropout, batch order), as one fused cohort; the trial's value is their
    # mean, stored with its standard error. With folds: R seeds of each fold.
    repeats: Annotated[int, Field(ge=1, le=20)] = 1
    early_stopping: EarlyStoppingSpec = Field(default_factory=EarlyStoppingSpec)
    device: Annotated[
        str, AfterValidator(_device), Field(json_schema_extra={"pattern": f"^({_DEVICE})$"})
    ] = "auto"
    # how matrix products are computed
    precision: Literal[PRECISIONS] = "auto"  # type: ignore[valid-type]
    # Opt-ins to search a space whose largest models do not fit: configurations past either
    # limit fail as trials, with the reason, instead of the spec being refused (see resources).
    max_params: Annotated[int, Field(ge=1)] | None = None
    memory_limit: Annotated[ByteSize, Field(gt=0)] | None = None  # bytes, or "8GB", "512MiB"
    # A worker process silent for 10x its trial's median epoch, and at least this many
    # seconds, has stalled: killed, replaced, its trial run again once. null: never.
    stall_timeout: Annotated[float, Field(gt=0)] | None = 300.0


class SamplerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")  # the sampler's own options pass through
    name: registry_name(SAMPLERS) = "tpe"  # type: ignore[valid-type]
    seed: int | None = 0

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PrunerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: registry_name(PRUNERS) = "median"  # type: ignore[valid-type]

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PlateauSpec(Strict):
    # Stop once this many finished trials in a row (baselines aside) did not improve the best
    # by more than its noise: the best's standard error over its members (repeats, folds),
    # else the seed noise measured once by retraining the best (see docs/spec.md).
    trials: Annotated[int, Field(ge=1)]


class StopWhenSpec(Strict):
    # Stop as soon as a complete trial reaches this value of study.metric (at or above it for
    # an accuracy, at or below it for a loss or an error).
    target: float | None = None
    plateau: PlateauSpec | None = None

    @model_validator(mode="after")
    def _something(self) -> StopWhenSpec:
        if self.target is None and self.plateau is None:
            raise problem("give target, plateau or both (or leave stop_when out)")
        return self


# What a trial costs, known without a validation curve: each may be an objective or a constraint.
# name -> (natural direction, when it is known, what it is)
COSTS: dict[str, tuple[Literal["minimize", "maximize"], str, str]] = {
    "n_params": ("minimize", "before training", "the network's trainable parameters"),
    "inference_ms": (
        "minimize", "after training",
        "milliseconds to predict a batch of 1,000 rows on the training device (measured once "
        "per complete trial, the median of 10 timed batches after 3 warm-up ones)",
    ),
    "train_seconds": (
        "minimize", "after training",
        "the trial's training wall time, its epochs summed (fused trials: their cohort's epochs)",
    ),
}  # fmt: skip


# Optuna's samplers that search a Pareto front, and the pruners hpo can ask with several
# objectives (on the first one: `hpo.search.FirstObjective`).
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "gp", "random", "qmc", "grid")
MULTI_OBJECTIVE_PRUNERS = ("median", "percentile", "patient", "none")


def named_costs(*names: str | None) -> list[str]:
    """The costs among `names`, in `COSTS` order: those a trial must measure."""
    return [n for n in COSTS if n in names]


def objective_direction(name: str) -> Literal["minimize", "maximize"]:
    """The natural direction of a study objective: a metric's, or a cost's."""
    return COSTS[name][0] if name in COSTS else metric_direction(name)


class ObjectiveSpec(Strict):
    name: str
    direction: Literal["minimize", "maximize"] | None = None  # null: the natural one


class BoundSpec(Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _something(self) -> BoundSpec:
        if self.min is None and self.max is None:
            raise problem("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise problem(f"min {self.min:g} is above max {self.max:g}")
        return self


class SelectSpec(Strict):
    # The study's one model among the feasible complete trials: those within `within` of the
    # best on `metric` (null: the first objective), then the best on `then` (null: `metric`).
    metric: str | None = None
    within: Annotated[float, Field(ge=0)] = 0.0
    then: str | None = None

    @model_validator(mode="after")
    def _within_needs_then(self) -> SelectSpec:
        if self.within and self.then is None:
            raise problem("within needs then: the quantity to prefer among the trials within it")
        return self


class StudySpec(Strict):
    n_trials: Annotated[int, Field(ge=1)] = 40
    timeout: Annotated[float, Field(gt=0)] | None = None  # seconds
    metric: str = "val_accuracy"
    # Several objectives (a Pareto front): a validation metric first, then metrics or costs
    # (`COSTS`), each a name or {name, direction}. `metric` is then the first one's name.
    metrics: list[str | ObjectiveSpec] | None = None
    # Bounds on costs or validation metrics; a trial outside them is infeasible.
    constraints: dict[str, BoundSpec] = Field(default_factory=dict)
    # How the one model is chosen (the test evaluation, the logged model, `hpo predict`).
    select: SelectSpec | None = None
    # Earlier studies (same storage) whose compatible finished trials start this one.
    warm_start: list[Name] = Field(default_factory=list)  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _first_objective_is_the_metric(self) -> StudySpec:
        if self.metrics is None:
            return self
        names = [o if isinstance(o, str) else o.name for o in self.metrics]
        if not names:
            raise problem("metrics is empty: give at least one objective, or leave it out")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise problem(f"metrics names {', '.join(twice)} more than once")
        if "metric" in self.model_fields_set and self.metric != names[0]:
            raise problem(
                f"metric {self.metric!r} is not the first of metrics ({names[0]!r}); "
                "give one or the other"
            )
        self.metric = names[0]
        return self

    def named_costs(self) -> list[str]:
        """The costs the objectives, constraints or the choice of the model name."""
        sel = self.select
        return named_costs(
            *(n for n, _ in self.objectives()), *self.constraints,
            sel.metric if sel else None, sel.then if sel else None,
        )  # fmt: skip

    def objectives(self) -> list[tuple[str, Literal["minimize", "maximize"]]]:
        """The study's objectives in order, each with its direction; one without `metrics`."""
        if self.metrics is None:
            return [(self.metric, metric_direction(self.metric))]
        return [
            (o, objective_direction(o)) if isinstance(o, str)
            else (o.name, o.direction or objective_direction(o.name))
            for o in self.metrics
        ]  # fmt: skip

    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=lambda: PrunerSpec(n_warmup_steps=3))
    storage: str | None = None
    # Trials trained together as one stacked model on one device (see hpo/steppers.py).
    fused_trials: Annotated[int, Field(ge=1)] = 1
    # Stop before the budget is spent: at a target value, or once the search has converged.
    stop_when: StopWhenSpec | None = None


class EnsembleSpec(Strict):
    # Rounds of greedy selection with replacement (Caruana et al. 2004): a trial chosen k
    # times weighs k / size in the ensemble.
    size: Annotated[int, Field(ge=2, le=100)]
    # The best trials the ensemble is chosen from; their weights are kept as they finish.
    candidates: Annotated[int, Field(ge=2, le=100)] = 10


class TrackingSpec(Strict):
    uri: str | None = None
    experiment: str | None = None
    log_model: Literal["best", "all", "none"] = "best"
    # After the search: an ensemble of the best trials, logged as one model beside the best's.
    ensemble: EnsembleSpec | None = None


YAML_KEYS = (
    "name",
    "dataset",
    "task",
    "search_space",
    "training",
    "study",
    "tracking",
    "baselines",
)


class Spec(Strict):
    name: Name
    dataset: DatasetSpec
    task: Literal["auto", "classification", "regression"] = "auto"
    search_space: SearchSpace  # type: ignore[valid-type]
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    study: StudySpec = Field(default_factory=StudySpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    # Named fixed configurations run once per study before the search (see `baseline_config`).
    baselines: list[Baseline] = Field(default_factory=list)  # type: ignore[valid-type]
    # Not YAML keys: where the spec came from, so relative data paths resolve against it.
    source_dir: SkipJsonSchema[str] = Field(default=".", exclude=True)
    raw_text: SkipJsonSchema[str] = Field(default="", exclude=True)

    _document: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_document(cls, data: Any, handler: Any) -> Any:
        spec = handler(data)
        if isinstance(data, dict):
            spec._document = copy.deepcopy({k: v for k, v in data.items() if k in YAML_KEYS})
        return spec

    @property
    def space(self) -> dict[str, Any]:
        """search_space's entries as written: a fixed value or a `Distribution` each."""
        return self.search_space.as_dict()

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
        [entry] = [b for b in self.baselines if b.name == name]
        config = default_config()
        config.update({k: v for k, v in self.space.items() if not isinstance(v, Distribution)})
        config.update(entry.values())
        if n_train is not None and int(config["batch_size"]) > n_train:
            config["batch_size"] = n_train
        return TrialConfig.of(config)

    def to_yaml(self) -> str:
        """The spec as written: its file, or the document it was parsed from."""
        if self.raw_text:
            return self.raw_text
        return yaml.safe_dump(self._document, sort_keys=False)

    def with_values(self, values: dict[str, Any]) -> Spec:
        """This spec with some keys set (dotted YAML paths: `study.n_trials`), validated as a
        file is. It keeps its file's text, as the study logs it, unless what trains changed."""
        document = copy.deepcopy(self._document)
        problems = []
        for path, value in values.items():
            *parents, key = path.split(".")
            node = document
            for i, part in enumerate(parents):
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    where = ".".join(parents[: i + 1])
                    problems.append(f"{path}: {where} is a value ({node!r}), not a section")
                    break
            else:
                node[key] = value
        if problems:
            raise SpecError(problems)
        new = parse_spec(document, source_dir=self.source_dir, raw_text=self.raw_text)
        if new.fingerprint() != self.fingerprint():
            new.raw_text = ""
        return new

    def fingerprint(self, search_space: dict[str, Any] | None = None) -> str:
        """Hash of what makes trials comparable: data, task, search space and training."""
        keep = self.model_dump(include={"dataset", "task", "training"})
        # as written (typed, `1` would hash as `1.0` and "8GB" as 8000000000)
        keep["search_space"] = self._document.get("search_space", {})
        if search_space is not None:
            keep["search_space"] = search_space
        if self.training.memory_limit is not None:
            keep["training"]["memory_limit"] = self._document["training"]["memory_limit"]
        keep["training"].pop("device", None)
        # neither changes what a trial trains on or how: studies from before them resume
        keep["training"].pop("stall_timeout", None)
        keep["dataset"].pop("test_unseen_labels", None)
        if keep["training"].get("precision") == "auto":  # studies from before the key
            keep["training"].pop("precision")
        # keys with their defaults hash as before the keys were: older studies resume
        if keep["training"].get("repeats") == 1:
            keep["training"].pop("repeats")
        if keep["dataset"]["split"].get("folds") is None:
            keep["dataset"]["split"].pop("folds")
        split = keep["dataset"]["split"]
        if split.get("final_model") != "fold_ensemble":  # a refit changes no trial
            split.pop("final_model")
        keep["metric"] = self.study.metric
        if self.study.metrics is not None:  # several objectives: another study
            keep["objectives"] = self.study.objectives()
        if self.study.constraints:
            keep["constraints"] = {
                k: v.model_dump() for k, v in sorted(self.study.constraints.items())
            }
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


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema: every key, its type, bounds, allowed names and doc (for editors:
    the YAML language server checks a spec as it is typed)."""
    schema = Spec.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hpo spec",
        "description": "A study of PyTorch MLP hyperparameters: hpo run SPEC.yaml",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


def read_yaml(text: str) -> Any:
    """A spec's YAML as hpo reads it (numbers as in YAML 1.2); raises yaml.YAMLError."""
    loader = _SpecLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
    return spec_from_text(text, path.parent, str(path))


def spec_from_text(text: str, source_dir: str | Path, where: str) -> Spec:
    """Validate a spec's YAML text (`where` names it in errors: its file, say)."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError([f"{where}: {len(text.encode()):,} bytes; a spec is at most "
                         f"{MAX_SPEC_BYTES:,}"])  # fmt: skip
    loader = _SpecLoader(text)
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([f"{where}: invalid YAML at {at}: {problem}"]) from None
    finally:
        loader.dispose()
    if loader.problems:
        raise SpecError([f"{where}: {p}" for p in loader.problems])
    if _count_values(raw, MAX_SPEC_VALUES) > MAX_SPEC_VALUES:
        raise SpecError(
            [
                f"{where}: the YAML expands to more than {MAX_SPEC_VALUES:,} values (an alias, "
                "*name, repeats all it points to); write the values out instead"
            ]
        )
    return parse_spec(raw, source_dir=source_dir, raw_text=text)


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
        raise SpecError([f"(top level): must be a mapping of keys (got {show(raw)})"])
    problems: list[str] = []
    spec = partial = None
    try:
        spec = partial = Spec(**raw, source_dir=str(source_dir), raw_text=raw_text)
    except ValidationError as e:
        problems += [_format_pydantic(err) for err in e.errors()]
        # Drop the offending values and try again, so the cross-field rules still get to
        # report their problems in the same pass.
        pruned = _without(raw, [tuple(err["loc"]) for err in e.errors()])
        try:
            partial = Spec(**pruned, source_dir=str(source_dir), raw_text=raw_text)
        except (ValidationError, TypeError):
            partial = None
    except TypeError as e:  # non-string keys at the top level
        problems.append(f"(top level): {e}")
    if partial is not None:
        space = raw.get("search_space")
        written = list(space) if isinstance(space, dict) else []
        named = spec is not None or partial.dataset.name == raw["dataset"].get("name")
        problems += _check_semantics(partial, written, dataset_named=named)
    if problems:
        raise SpecError(problems)
    assert spec is not None
    return spec


_STAND_INS: dict[tuple[str, ...], Any] = {
    ("name",): "unchecked",
    ("search_space",): {},
    ("dataset", "name"): "digits",  # the dataset's own rules are then not checked
}


def _without(raw: dict[str, Any], locs: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of `raw` with the value at each location removed (a search-space entry whole,
    the baselines all)."""
    out = copy.deepcopy(raw)
    for loc in locs:
        if loc in _STAND_INS:  # required: a valid value stands in (its problem is reported)
            node = out.get(loc[0]) if len(loc) == 2 else out
            if isinstance(node, dict):
                node[loc[-1]] = _STAND_INS[loc]
            continue
        if loc[:1] == ("search_space",):
            loc = loc[:2]
        elif loc[:1] == ("baselines",) and len(loc) >= 2 and isinstance(loc[1], int):
            i, entry = loc[1], out["baselines"][loc[1]]
            if len(loc) == 2 or loc[2] == "name" or not isinstance(entry, dict):
                # a name that stands in for the baseline's (its problem is reported already)
                entry = out["baselines"][i] = (
                    dict(entry, name=f"unchecked-{i}")
                    if isinstance(entry, dict)
                    else {"name": f"unchecked-{i}"}
                )
            else:
                entry.pop(loc[2], None)
            continue
        node: Any = out
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


# ---------------------------------------------------------------- messages


def _plain(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error's location as the YAML path: without the union tags pydantic adds inside
    search-space entries and baselines."""
    if loc[:1] not in (("search_space",), ("baselines",)):
        return loc
    return loc[:2] + tuple(p for p in loc[2:] if p not in TAGS)


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
_KINDS: dict[str, type[Distribution]] = {
    "int": IntRange,
    "float": FloatRange,
    "categorical": Categorical,
}
# what each kind of pydantic error says, in the spec's words ("got" follows)
_SAYS = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be finite",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "byte_size": "must be a size such as 8GB, 512MiB or a number of bytes",
    "byte_size_unit": "must be a size such as 8GB, 512MiB or a number of bytes",
}


def _format_pydantic(err: Any) -> str:
    """One pydantic error as the spec's one line: where, what is allowed, what was given."""
    raw_loc = tuple(err["loc"])
    loc = _plain(raw_loc)
    kind, got, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    where = _dotted(loc) or "(top level)"
    if kind == "spec":
        return f"{where}: {err['msg']}"
    if kind == "extra_forbidden":
        return f"{where}: {_unknown(raw_loc, loc)}"
    if kind == "missing":
        return f"{where}: is required"
    if kind == "too_short":
        return f"{where}: must not be empty"
    if kind == "union_tag_not_found":
        return f"{where}.type: is required: int, float or categorical"
    if kind == "union_tag_invalid":
        tags = " or ".join(re.findall(r"'([^']*)'", ctx.get("expected_tags", "")))
        return f"{where}.type: {loc[-1]} takes type: {tags}, or a fixed value (got {got['type']})"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        close = difflib.get_close_matches(str(got), allowed, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{where}: must be one of {', '.join(allowed)} (got {show(got)}){hint}"
    if kind in _SAYS:
        msg = _SAYS[kind].format(**ctx)
    else:
        msg = err["msg"][:1].lower() + err["msg"][1:]
        msg = msg.replace("input should be", "must be")
    return f"{where}: {msg} (got {show(got)})"


def _unknown(raw_loc: tuple[Any, ...], loc: tuple[Any, ...]) -> str:
    """Why a key is not allowed where it is, with the names that are."""
    key, parent = str(loc[-1]), loc[:-1]
    if parent == ("search_space",) or (parent[:1] == ("baselines",) and len(parent) == 2):
        return f"unknown hyperparameter; {did_you_mean(key, list(PARAMS))}"
    if parent[:1] == ("search_space",):  # a distribution's key; its kind is the tag before
        kind = str(raw_loc[-2])
        if key != "type" and any(key in d.model_fields for d in _KINDS.values()):
            hint = " (use choices)" if kind == "categorical" else ""
            return f"not used with type: {kind}{hint}"
        return f"unknown key; {did_you_mean(key, list(_KINDS[kind].model_fields))}"
    model = _MODELS.get(_dotted(parent))
    known = [f for f in model.model_fields if f not in _HIDDEN_FIELDS] if model else []
    return f"unknown key; {did_you_mean(key, known)}"


# ---------------------------------------------------------------- cross-field rules


def metric_problems(spec: Spec, task: str) -> list[str]:
    """The study's metric and early stopping's monitor against the task ("auto": either)."""
    allowed = {
        "classification": CLASSIFICATION_METRICS,
        "regression": REGRESSION_METRICS,
        "auto": tuple(dict.fromkeys(CLASSIFICATION_METRICS + REGRESSION_METRICS)),
    }[task]
    problems = []
    what = f"a {task} task" if task != "auto" else "any task"
    for where, metric in (
        ("study.metric", spec.study.metric),
        ("training.early_stopping.monitor", spec.training.early_stopping.monitor),
    ):
        if metric not in allowed:
            problems.append(
                f"{where}: {metric!r} does not fit {what}; {did_you_mean(metric, allowed)}"
            )
    return problems + _objective_problems(spec, [m for m in allowed if m.startswith("val_")])


def _objective_problems(spec: Spec, val: list[str]) -> list[str]:
    """Several objectives, constraints and the choice of the model: names that fit the task,
    a validation metric first, and a sampler and pruner that take several objectives."""
    st = spec.study
    problems = []
    names = [n for n, _ in st.objectives()]
    costs = list(COSTS)
    for i, name in enumerate(names[1:] if st.metrics else [], 1):
        if name not in val + costs:
            problems.append(
                f"study.metrics[{i}]: {name!r} is neither a validation metric nor a cost; "
                f"{did_you_mean(name, val + costs)}"
            )
    if st.metrics and names[0] not in val:
        problems.append(
            f"study.metrics[0]: {names[0]!r} must be a validation metric (the one trials are "
            f"pruned and stopped on); {did_you_mean(names[0], val)}"
        )
    for name in st.constraints:
        if name not in val + costs:
            problems.append(
                f"study.constraints.{name}: not a validation metric or a cost; "
                f"{did_you_mean(name, val + costs)}"
            )
    if st.select is not None:
        for key in ("metric", "then"):
            name = getattr(st.select, key)
            if name is not None and name not in val + costs:
                problems.append(
                    f"study.select.{key}: {name!r} is not a validation metric or a cost; "
                    f"{did_you_mean(name, val + costs)}"
                )
    if len(names) > 1:
        if st.sampler.name not in MULTI_OBJECTIVE_SAMPLERS:
            problems.append(
                f"study.sampler.name: {st.sampler.name} takes one objective; with several "
                f"study.metrics use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}"
            )
        if st.pruner.name not in MULTI_OBJECTIVE_PRUNERS:
            problems.append(
                f"study.pruner.name: {st.pruner.name} cannot prune a study with several "
                f"objectives; use one of {', '.join(MULTI_OBJECTIVE_PRUNERS)}"
            )
    return problems


def _check_semantics(spec: Spec, written: list[str], dataset_named: bool = True) -> list[str]:
    """The rules that read two settings at once; `written` names search_space's entries as
    written (some may have been dropped for their own problems); without `dataset_named` the
    dataset's name was not one, and its own rules are left out."""
    problems: list[str] = []
    ds = spec.dataset
    sp = ds.split
    if sp.val + sp.test >= 1:
        problems.append(
            f"dataset.split: val + test must leave data to train on (got {sp.val} + {sp.test})"
        )
    if sp.folds is not None and "val" in sp.model_fields_set:
        problems.append(
            "dataset.split: val and folds both given; with folds each fold is the validation "
            "set in turn: remove val"
        )
    if sp.final_model == "fold_ensemble" and sp.folds is None:
        problems.append(f"dataset.split.final_model: {sp.final_model} needs dataset.split.folds")
    if ds.test_unseen_labels != "error" and not ds.test_path:
        problems.append("dataset.test_unseen_labels: only used with dataset.test_path")

    task = spec.task
    if dataset_named:  # else the name is a stand-in: its dataset's rules say nothing
        problems += _dataset_problems(ds)
        entry = DATASETS[ds.name]
        if entry.task is not None:  # a table's target says which (`hpo.tables`)
            if task not in ("auto", entry.task):
                problems.append(f"task: {ds.name} is a {entry.task} dataset (got {task})")
            task = entry.task
    problems += metric_problems(spec, task)

    for where, url in (("study.storage", spec.study.storage), ("tracking.uri", spec.tracking.uri)):
        if problem := url_problem(url, where):
            problems.append(problem)
    problems += _check_links(spec.space, written)
    problems += _check_baselines(spec)
    if spec.study.sampler.name == "grid":
        problems += _check_grid(spec)
    return problems


def _dataset_problems(ds: DatasetSpec) -> list[str]:
    """The dataset keys its registry entry requires, and those it does not take."""
    problems = []
    entry = DATASETS[ds.name]
    for key in ("path", "test_path", "target", "openml", "drop_missing_target"):
        given = getattr(ds, key) not in (None, False)
        if key in entry.requires and not given:
            what = " (a name or an id)" if key == "openml" else ""
            problems.append(f"dataset.{key}: is required for dataset {ds.name}{what}")
        elif given and key not in entry.requires + entry.accepts:
            problems.append(f"dataset.{key}: not used with dataset {ds.name}")
    return problems


def _check_links(space: dict[str, Any], written: list[str]) -> list[str]:
    """`when` names other entries, with values they take."""
    problems: list[str] = []
    for name, d in space.items():
        if not isinstance(d, Distribution):
            continue
        path = f"search_space.{name}"
        for cond, allowed in (d.when or {}).items():
            if cond not in written or cond == name:
                others = [k for k in written if k != name]
                problems.append(
                    f"{path}.when.{cond}: must name another entry of search_space; "
                    f"{did_you_mean(str(cond), others)}"
                )
                continue
            values = allowed if isinstance(allowed, list) else [allowed]
            for v in values:
                problems += _value_problems(f"{path}.when.{cond}", cond, v)
    return problems


@functools.cache
def _values_of(name: str) -> TypeAdapter[Any]:
    return TypeAdapter(value_type(PARAMS[name]))


def _value_problems(where: str, name: str, value: Any) -> list[str]:
    """A fixed value of hyperparameter `name` held to its type and bounds."""
    if name not in PARAMS:
        return []
    try:
        _values_of(name).validate_python(value)
    except ValidationError as e:
        return [
            _format_pydantic(dict(err, loc=())).replace("(top level)", where, 1)
            for err in e.errors()
        ]
    return []


def _check_baselines(spec: Spec) -> list[str]:
    """Baselines' names are unique; a list of widths has one per layer."""
    problems: list[str] = []
    seen: set[str] = set()
    fixed = {k: v for k, v in spec.space.items() if not isinstance(v, Distribution)}
    for i, entry in enumerate(spec.baselines):
        path = f"baselines[{i}]"
        if entry.name in seen:
            problems.append(f"{path}.name: {entry.name!r} is used by an earlier baseline")
        seen.add(entry.name)
        values = entry.values()
        width = values.get("width")
        n = values.get("n_layers", fixed.get("n_layers", PARAMS["n_layers"].default))
        if isinstance(width, list) and isinstance(n, int) and len(width) != n:
            problems.append(
                f"{path}.width: {len(width)} widths for n_layers {n}; give one per layer"
            )
    return problems


def folder_name(name: str) -> str:
    """A study name made safe as one folder name (names stored by other tools may be anything)."""
    if name_problem(name, "") is None:
        return name
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:MAX_NAME].lstrip(".")
    return safe or "study"


def _check_grid(spec: Spec) -> list[str]:
    space = {k: v for k, v in spec.space.items() if isinstance(v, Distribution)}
    n_layers = spec.space.get("n_layers", PARAMS["n_layers"].default)
    layers = int(largest(n_layers))
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
