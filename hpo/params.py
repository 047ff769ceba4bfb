"""Every hyperparameter a trial has, one row each: its kind, default, bounds, whether it is
structural, where it applies, and its one-line doc.

The spec's checks and their messages (`config`), the training and model defaults
(`train.TrainConfig`, `model.build_mlp`), cohort planning (`space.structure`), the summary's
configurations (`applies`), `hpo names` and the spec reference (docs/spec.md, written by
`make docs`) all read this table; nothing else lists hyperparameters. Which optimizers take a
setting is said by the optimizer's own registry entry (`Entry.takes`). Imports neither torch
nor optuna.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Literal

from hpo.registry import ACTIVATIONS, INITS, LR_SCHEDULES, OPTIMIZERS, Registry, sync_section

Kind = Literal["real", "int", "bool", "choice"]


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    default: Any
    doc: str  # one line, for docs/spec.md and `hpo names`
    min: float | None = None  # inclusive lower bound
    min_open: float | None = None  # exclusive lower bound
    max_open: float | None = None  # exclusive upper bound
    registry: Registry | None = None  # the names a "choice" takes
    # Shapes the network or the step's code: the members of a fused cohort share it.
    structural: bool = False
    hidden: bool = False  # belongs to the hidden layers: a linear model (depth 0) has none
    optimizer_setting: bool = False  # only the optimizers whose entry `takes` it use it

    def bound_problem(self, value: float) -> str | None:
        """What is wrong with a number against this row's bounds, or None."""
        if self.min is not None and value < self.min:
            return f"must be >= {self.min}"
        if self.min_open is not None and value <= self.min_open:
            return f"must be > {self.min_open}"
        if self.max_open is not None and value >= self.max_open:
            return f"must be < {self.max_open}"
        if not math.isfinite(value):
            return "must be finite"
        return None

    @property
    def optimizers(self) -> tuple[str, ...]:
        """The optimizers that use this setting (all of them for a general one)."""
        if not self.optimizer_setting:
            return OPTIMIZERS.names
        return tuple(name for name, e in OPTIMIZERS.items() if self.name in e.takes)

    @property
    def shown_default(self) -> str:
        """The default as YAML writes it."""
        return str(self.default).lower() if self.kind == "bool" else str(self.default)

    def described(self) -> str:
        """Its doc, with the optimizers that use it when only some do."""
        if not self.optimizer_setting:
            return self.doc
        return f"{self.doc}; used by {', '.join(self.optimizers)}"

    def allowed(self) -> str:
        """The values it takes, as docs/spec.md says them."""
        if self.registry is not None:
            return ", ".join(f"`{n}`" for n in self.registry.names)
        if self.kind == "bool":
            return "`true`, `false`"
        if self.max_open is not None:
            return f"{self.min:g} <= x < {self.max_open:g}"
        return f">= {self.min:g}" if self.min is not None else f"> {self.min_open:g}"


_ROWS = [
    Param("n_layers", "int", 2, "hidden layers; 0 is a linear model (softmax or linear "
          "regression)", min=0, structural=True),
    Param("width", "int", 128, "units per hidden layer (see `per_layer`)", min=1,
          structural=True, hidden=True),
    Param("activation", "choice", "relu", "after each hidden layer", registry=ACTIVATIONS,
          structural=True, hidden=True),
    Param("dropout", "real", 0.0, "after each hidden activation; with `selu` it is alpha "
          "dropout; applied to the nearest 1/65536", min=0.0, max_open=1.0, hidden=True),
    Param("batchnorm", "bool", False, "batch norm in each hidden block: Linear, BatchNorm, "
          "activation, Dropout", structural=True, hidden=True),
    Param("init", "choice", "default", "weight initialisation: PyTorch's own (Kaiming "
          "uniform, a=sqrt(5)), He normal, Xavier uniform", registry=INITS),
    Param("optimizer", "choice", "adam", "torch.optim's optimizer of that name",
          registry=OPTIMIZERS, structural=True),
    Param("lr", "real", 1e-3, "learning rate", min_open=0.0),
    Param("momentum", "real", 0.0, "momentum of the optimizers that take it", min=0.0,
          max_open=1.0, optimizer_setting=True),
    Param("nesterov", "bool", False, "Nesterov momentum, only with `momentum > 0`",
          structural=True, optimizer_setting=True),
    Param("weight_decay", "real", 0.0, "L2 penalty, added to the gradient; decoupled for "
          "`adamw`", min=0.0),
    Param("l1", "real", 0.0, "L1 penalty `l1 * sum(abs(w))` on the weights (not the "
          "biases): its gradient `l1 * sign(w)` joins the loss's; `train_loss` is reported "
          "without it", min=0.0),
    Param("batch_size", "int", 128, "mini-batch size", min=1, structural=True),
    Param("lr_schedule", "choice", "none", "how the rate changes from epoch to epoch: "
          "constant, cosine annealing to 0 over `max_epochs`, or halved after 2 epochs "
          "without a lower `val_loss`",
          registry=LR_SCHEDULES, structural=True),
    Param("grad_clip", "real", 0.0, "maximum global gradient norm; 0 is off", min=0.0),
]  # fmt: skip

PARAMS: Mapping[str, Param] = {p.name: p for p in _ROWS}

# What the members of a fused cohort share (per-layer widths are `width_0`, `width_1`, ...).
STRUCTURAL = tuple(name for name, p in PARAMS.items() if p.structural)


_TYPES = {"real": float, "int": int, "bool": bool, "choice": str}


def _of(cls: type, params: Mapping[str, Any]) -> Any:
    """A trial's configuration from sampled (or stored) values: every row of the table, its
    default where `params` leaves it out; `widths`, one per hidden layer, from `width` (one
    for all, or a list) and `n_layers` unless given. A key the table lacks is an error."""
    unknown = sorted(set(params) - set(PARAMS) - {"widths"})
    if unknown:
        raise ValueError(f"not hyperparameters: {', '.join(unknown)}")
    values = {name: params.get(name, p.default) for name, p in PARAMS.items()}
    width = values["width"]
    values["width"] = (
        tuple(int(w) for w in width) if isinstance(width, list | tuple) else int(width)
    )
    for name, p in PARAMS.items():
        if name != "width" and values[name] is not None:
            values[name] = _TYPES[p.kind](values[name])
    widths = params.get("widths")  # stored with the configuration; else derived (`_post_init`)
    given = {} if widths is None else {"widths": tuple(int(w) for w in widths)}
    return cls(**values, **given)


def _post_init(self: Any) -> None:
    """`widths` when not given: one per hidden layer, from `width` (one for all, or a list)."""
    if not self.widths and self.n_layers:
        width = self.width
        widths = width if isinstance(width, tuple) else (width,) * int(self.n_layers)
        object.__setattr__(self, "widths", tuple(int(w) for w in widths))


def _as_dict(self: Any) -> dict[str, Any]:
    """The configuration as stored (Optuna's `config` user attribute, MLflow params):
    plain values, `width` and `widths` as lists."""
    out = {name: getattr(self, name) for name in PARAMS}
    if isinstance(out["width"], tuple):
        out["width"] = list(out["width"])
    return out | {"widths": list(self.widths)}


# One trial's hyperparameters, typed and frozen: built once from the sampled values
# (`hpo.space.suggest_params`) or a baseline, it travels to the worker and the trainer. Its
# fields are the table's rows (defaults included), plus `widths`, one per hidden layer.
TrialConfig = make_dataclass(
    "TrialConfig",
    [(name, _TYPES[p.kind], field(default=p.default)) for name, p in PARAMS.items()]
    + [("widths", tuple, field(default=()))],
    frozen=True,
    namespace={
        "of": classmethod(_of),
        "as_dict": _as_dict,
        "__post_init__": _post_init,
        "__module__": __name__,
    },
)


def default_config() -> dict[str, Any]:
    """Every hyperparameter at its default."""
    return {name: p.default for name, p in PARAMS.items()}


def applies(name: str, config: Mapping[str, Any]) -> bool:
    """Whether a hyperparameter changes anything in `config`: hidden-layer settings do not in
    a linear model, an optimizer setting only in the optimizers that take it. Anything not
    in the table (the derived `widths`, say) applies."""
    p = PARAMS.get(name)
    if p is None:
        return True
    if p.hidden and config.get("n_layers") == 0:
        return False
    return not p.optimizer_setting or config.get("optimizer") in p.optimizers


def markdown_table() -> str:
    """docs/spec.md's table of hyperparameters."""
    lines = [
        "| name | kind | allowed | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in PARAMS.values():
        kind = "name" if p.kind == "choice" else p.kind
        lines.append(
            f"| `{p.name}` | {kind} | {p.allowed()} | `{p.shown_default}` | {p.described()} |"
        )
    return "\n".join(lines)


BEGIN, END = (
    "<!-- hyperparameters: begin (make docs writes this from hpo/params.py) -->",
    "<!-- hyperparameters: end -->",
)


def sync_doc(path: str) -> bool:
    """Rewrite the hyperparameter table of docs/spec.md from this table; True if it changed."""
    return sync_section(path, BEGIN, END, markdown_table())
