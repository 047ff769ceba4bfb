"""The spec's `search_space` and `baselines` as typed models, built from the hyperparameter table.

Each row of `hpo.params.PARAMS` becomes one field: a fixed value of the row's type within its
bounds, or a distribution (`IntRange`, `FloatRange`, `Categorical`, told apart by `type`) whose
bounds and choices are held to the same type and bounds. Checks that read two entries at once
(`when`, `per_layer`, a baseline's widths against `n_layers`, the grid's size) are the spec's
cross-field rules in `hpo.config`. Imports neither torch nor optuna.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from hpo.params import PARAMS, Param
from hpo.registry import Registry

GRID_FLOAT_POINTS = 4  # points per float range the grid sampler gets when no step is given
MAX_NAME = 100  # characters in a study or baseline name
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# the tags pydantic puts in an error's location inside a search-space entry
TAGS = frozenset({"value", "distribution", "list", "int", "float", "categorical"})


def problem(message: str) -> PydanticCustomError:
    """A validation error whose message is the spec's one line, as written (no "got" added)."""
    return PydanticCustomError("spec", message)


def show(value: Any) -> str:
    """A value as an error message quotes it."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def name_problem(name: str, where: str) -> str | None:
    """None for a usable study name, else why not: it names files and folders (reports)."""
    if len(name) <= MAX_NAME and _NAME.fullmatch(name):
        return None
    shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name):,} characters)"
    return (
        f"{where}: must be 1 to {MAX_NAME} letters, digits, '-', '_' or '.', starting with a "
        f"letter or digit (got {shown})"
    )


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- distributions


class Distribution(Strict):
    """What every distribution of `search_space` has; `isinstance(v, Distribution)` tells a
    distribution from a fixed value."""

    # Sampled only when each named entry took one of the listed values.
    when: dict[str, Any] | None = None
    per_layer: bool = False  # one value per hidden layer (width only)


class _Range(Distribution):
    log: bool = False

    @field_validator("low", check_fields=False)
    @classmethod
    def _log_needs_positive_low(cls, v: float, info: ValidationInfo) -> float:
        if info.data.get("log") and v <= 0:
            raise problem(f"must be > 0 when log: true (got {v})")
        return v

    @field_validator("step", check_fields=False)
    @classmethod
    def _step_is_linear(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("log"):
            raise problem("cannot be combined with log: true")
        return v

    @model_validator(mode="after")
    def _low_below_high(self) -> _Range:
        low, high = self.low, self.high  # type: ignore[attr-defined]
        if low > high:
            raise problem(f"low must be <= high (got low={low}, high={high})")
        return self


class IntRange(_Range):
    """Integers from low to high (every `step`, or log-uniform with `log: true`)."""

    type: Literal["int"]
    low: int
    high: int
    step: Annotated[int, Field(gt=0)] | None = None


class FloatRange(_Range):
    """Real numbers from low to high (uniform, every `step`, or log-uniform)."""

    type: Literal["float"]
    low: Annotated[float, Field(allow_inf_nan=False)]
    high: Annotated[float, Field(allow_inf_nan=False)]
    step: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None


class Categorical(Distribution):
    """One of `choices`."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


# ---------------------------------------------------------------- one field per hyperparameter


def registry_name(registry: Registry) -> Any:
    """A name in `registry`, checked against it when validated (a plugin may register more
    after import); the JSON Schema lists the names registered when it is made."""

    def check(v: str) -> str:
        if (why := registry.problem("", v)) is not None:
            raise problem(why.removeprefix(": "))
        return v

    def schema(s: dict[str, Any]) -> None:
        s["enum"] = list(registry.names)

    return Annotated[str, AfterValidator(check), Field(json_schema_extra=schema)]


def _fixed(kind: str) -> Any:
    """Refuses what is not a fixed value of `kind` before pydantic converts it (a bool is not a
    number, nor is a string; 2.0 is the integer 2)."""

    def check(v: Any) -> Any:
        if isinstance(v, dict):
            raise problem("must be a fixed value, not a distribution (got a mapping)")
        if kind in ("int", "real") and (isinstance(v, bool) or not isinstance(v, int | float)):
            what = "an integer" if kind == "int" else "a number"
            raise problem(f"must be {what} (got {show(v)})")
        if kind == "int" and not float(v).is_integer():
            raise problem(f"must be an integer (got {v})")
        return v

    return BeforeValidator(check)


def value_type(p: Param) -> Any:
    """The type of one fixed value of hyperparameter `p`: its kind, bounds and names."""
    if p.kind == "bool":
        return Annotated[StrictBool, _fixed("bool")]
    if p.kind == "choice":
        assert p.registry is not None
        return Annotated[registry_name(p.registry), _fixed("choice")]
    bounds = Field(ge=p.min, gt=p.min_open, lt=p.max_open)
    if p.kind == "int":
        return Annotated[int, bounds, _fixed("int")]
    return Annotated[float, bounds, Field(allow_inf_nan=False), _fixed("real")]


def _class(base: type[Distribution], p: Param, **fields: Any) -> Any:
    validators = {}
    if p.name != "width":

        def one_value(cls: Any, v: bool) -> bool:
            if v:
                raise problem(f"only width can be per layer (got it on {p.name})")
            return v

        validators["_one_value"] = field_validator("per_layer")(one_value)
    name = f"{base.__name__}_{p.name}"
    cls = create_model(
        name, __base__=base, __doc__=base.__doc__, __validators__=validators, **fields
    )
    globals()[name] = cls  # found by its name here, as pickle (a spec sent to a worker) looks
    return cls


def _distribution(p: Param) -> Any:
    """The distributions hyperparameter `p` takes: ranges of its type (an int range of a real
    one too), or choices of its values."""
    v = value_type(p)
    kinds = [_class(Categorical, p, choices=(list[v], Field(min_length=1)))]  # type: ignore[valid-type]
    if p.kind in ("int", "real"):
        n = value_type(replace(p, kind="int"))
        kinds.insert(0, _class(IntRange, p, low=(n, ...), high=(n, ...)))
    if p.kind == "real":
        kinds.insert(1, _class(FloatRange, p, low=(v, ...), high=(v, ...)))
    return Annotated[Union[tuple(kinds)], Field(discriminator="type")]  # noqa: UP007


def _is_distribution(v: Any) -> str:
    return "distribution" if isinstance(v, dict | Distribution) else "value"


def _entry(p: Param) -> Any:
    """A search-space entry: a fixed value, or a distribution (a mapping with `type`)."""
    return Annotated[
        Union[  # noqa: UP007
            Annotated[value_type(p), Tag("value")],
            Annotated[_distribution(p), Tag("distribution")],
        ],
        Discriminator(_is_distribution),
        Field(description=p.described()),
    ]


class _Written(Strict):
    """Entries kept in the order they were written: Optuna suggests them in that order."""

    _order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        if isinstance(data, dict):
            model._order = [k for k in data if k in model.model_fields_set]
        return model

    def items(self) -> Iterator[tuple[str, Any]]:
        """(name, value) of each entry given, in the written order."""
        return ((k, getattr(self, k)) for k in self._order)


class _Space(_Written):
    def as_dict(self) -> dict[str, Any]:
        """Each entry given: a fixed value or a `Distribution`."""
        return dict(self.items())


SearchSpace = create_model(
    "SearchSpace",
    __base__=_Space,
    __doc__="Which hyperparameters are searched (a distribution) or fixed (a value).",
    **{name: (_entry(p), None) for name, p in PARAMS.items()},  # type: ignore[call-overload]
)


def _widths(p: Param) -> Any:
    """A baseline's width: one for every layer, or a list of one per layer."""
    one = value_type(p)
    return Annotated[
        Union[Annotated[one, Tag("value")], Annotated[list[one], Tag("list")]],  # type: ignore[valid-type]  # noqa: UP007
        Discriminator(lambda v: "list" if isinstance(v, list | tuple) else "value"),
    ]


def _usable(name: str) -> str:
    if (why := name_problem(name, "")) is not None:
        raise problem(why.removeprefix(": "))
    return name


# A study's or a baseline's name: it names files and folders.
Name = Annotated[str, AfterValidator(_usable)]


class _Baseline(_Written):
    name: Name

    def values(self) -> dict[str, Any]:
        """Its hyperparameters as given (width perhaps a list, one per layer)."""
        return {k: v for k, v in self.items() if k != "name"}


Baseline = create_model(
    "Baseline",
    __base__=_Baseline,
    __doc__="A named fixed configuration, run once per study before the search.",
    **{  # type: ignore[call-overload]
        name: (_widths(p) if name == "width" else value_type(p), None)
        for name, p in PARAMS.items()
    },
)


def largest(entry: Any, default: Any = None) -> Any:
    """The largest value a search-space entry can take (the default when it is absent)."""
    if entry is None:
        return default
    if not isinstance(entry, Distribution):
        return max(entry) if isinstance(entry, list) and entry else entry
    if entry.type == "categorical":
        numbers = [c for c in entry.choices or [] if isinstance(c, int | float)]
        return max(numbers) if numbers else (entry.choices or [default])[0]
    return entry.high


# ---------------------------------------------------------------- the grid


def grid_values(d: Distribution) -> Sequence[Any]:
    """The values the grid sampler walks for one distribution: every choice; every value (every
    `step`) of an int range; every `step` of a float range from `low`, `high` included when a
    step lands on it; `GRID_FLOAT_POINTS` points of a float range without `step` and of a log
    int range (log-spaced with `log: true`, rounded and unique for ints). A range of ints
    stays a `range`, so its size is known without listing it."""
    if isinstance(d, Categorical):
        return list(d.choices)
    assert isinstance(d, IntRange | FloatRange)
    low, high = float(d.low), float(d.high)
    if isinstance(d, IntRange) and not d.log:
        return range(int(low), int(high) + 1, int(d.step or 1))
    if isinstance(d, IntRange):
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
    if isinstance(d, FloatRange) and d.step:  # numpy.arange's length, without the array
        return max(math.ceil((d.high + d.step / 2 - d.low) / d.step), 0)
    return len(grid_values(d))
