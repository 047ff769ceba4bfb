"""Every name a spec can use, in one place: datasets, samplers, pruners, activations,
optimizers, weight inits and learning-rate schedules.

Adding one is one `Entry` here (plus its code, when it is ours). The spec's allowed values, its
error messages, `hpo names` and docs/spec.md's lists all read these tables. Targets are
"module:attribute" strings imported on first use, so this module (and `config.py`, which reads
it) imports neither torch nor optuna.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# Other names users know these by (the literature's, other libraries')
ALIASES = {
    "swish": "silu",
    "leakyrelu": "leaky_relu",
    "glorot": "xavier",
    "kaiming": "he",
    "cosineannealing": "cosine",
    "reducelronplateau": "plateau",
    "bayesian": "tpe",
    "sobol": "qmc",
    "cma": "cmaes",
    "asha": "successive_halving",
}


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """The known name it means (the same in other case or spelling, a synonym) or the nearest
    one, if one is close, and every known name."""

    def fold(text: Any) -> str:
        return "".join(c for c in str(text).lower() if c.isalnum())

    folded = fold(name)
    same = [k for k in known if fold(k) == folded]
    alias = ALIASES.get(folded)
    close = (
        same
        or ([alias] if alias in known else [])
        or difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    )
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}allowed: {', '.join(known)}"


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:attribute", imported by `Registry.load`
    doc: str  # one line, for `hpo names` and docs/spec.md
    # Datasets only: the `dataset.*` keys it needs and those it may take, and the task it always
    # is (None: read from the target column).
    requires: tuple[str, ...] = ()
    accepts: tuple[str, ...] = ()
    task: str | None = "classification"
    # Optimizers only: the settings it takes besides `lr` and `weight_decay` (rows of
    # `hpo.params.PARAMS` marked `optimizer_setting`), passed to its constructor.
    takes: tuple[str, ...] = ()


class Registry(Mapping[str, Entry]):
    """Names of one kind (`what`), each with where its code lives and a line of docs."""

    def __init__(self, what: str, key: str, entries: list[Entry]):
        self.what = what
        self.key = key  # where a spec names one
        self._entries = {e.name: e for e in entries}

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def load(self, name: str) -> Any:
        """The object behind `name` (a class or a function)."""
        module, _, attr = self[name].target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def problem(self, where: str, value: Any) -> str | None:
        """None for a known name, else the one-line error for it at YAML path `where`."""
        if isinstance(value, str) and value in self._entries:
            return None
        shown = repr(value) if isinstance(value, str) else str(value)
        return f"{where}: unknown {self.what} {shown}; {did_you_mean(str(value), self.names)}"

    def markdown(self) -> str:
        """A bullet list: `name`: doc."""
        return "\n".join(f"- `{e.name}`: {e.doc}" for e in self._entries.values())


DATASETS = Registry(
    "dataset",
    "dataset.name",
    [
        Entry("digits", "hpo.data:load_digits",
              "scikit-learn's 8x8 digits (1,797 images, 10 classes), bundled: no download"),
        Entry("mnist", "hpo.data:load_mnist",
              "MNIST handwritten digits, 28x28, 60,000 train + 10,000 official test"),
        Entry("fashion_mnist", "hpo.data:load_fashion_mnist",
              "Fashion-MNIST clothing images, 28x28, 60,000 train + 10,000 official test"),
        Entry("csv", "hpo.data:load_table",
              "a CSV file: `path` and a `target` column (optional `test_path`)",
              requires=("path", "target"), accepts=("test_path", "drop_missing_target"),
              task=None),
        Entry("parquet", "hpo.data:load_table",
              "a Parquet file: `path` and a `target` column (optional `test_path`)",
              requires=("path", "target"), accepts=("test_path", "drop_missing_target"),
              task=None),
        Entry("openml", "hpo.data:load_openml",
              "an OpenML dataset by name or id (`openml`), cached after the first download",
              requires=("openml",), task=None),
    ],
)  # fmt: skip

SAMPLERS = Registry(
    "sampler",
    "study.sampler.name",
    [
        Entry("tpe", "optuna.samplers:TPESampler",
              "Bayesian search: tree-structured Parzen estimator (the default)"),
        Entry("random", "optuna.samplers:RandomSampler", "random search"),
        Entry("grid", "optuna.samplers:GridSampler",
              "grid search over the space (float ranges without `step` get 4 points)"),
        Entry("qmc", "optuna.samplers:QMCSampler", "quasi-random (Sobol) search"),
        Entry("cmaes", "optuna.samplers:CmaEsSampler",
              "CMA evolution strategy (numeric parameters)"),
        Entry("gp", "optuna.samplers:GPSampler", "Bayesian search with a Gaussian process"),
        Entry("nsga2", "optuna.samplers:NSGAIISampler", "NSGA-II genetic algorithm"),
    ],
)  # fmt: skip

PRUNERS = Registry(
    "pruner",
    "study.pruner.name",
    [
        Entry("median", "optuna.pruners:MedianPruner",
              "stop a trial worse than the median of earlier trials at the same epoch"),
        Entry("percentile", "optuna.pruners:PercentilePruner",
              "stop a trial outside the best `percentile` (25 by default) at the same epoch"),
        Entry("successive_halving", "optuna.pruners:SuccessiveHalvingPruner",
              "asynchronous successive halving"),
        Entry("hyperband", "optuna.pruners:HyperbandPruner",
              "Hyperband, epochs as the resource (1 to `max_epochs`)"),
        Entry("patient", "optuna.pruners:PatientPruner",
              "wait `patience` epochs (2) without improvement before asking `wrapped` (median)"),
        Entry("none", "optuna.pruners:NopPruner", "never prune"),
    ],
)  # fmt: skip

ACTIVATIONS = Registry(
    "activation",
    "search_space.activation",
    [
        Entry("relu", "torch.nn:ReLU", "max(0, x)"),
        Entry("leaky_relu", "torch.nn:LeakyReLU", "ReLU with slope 0.01 below zero"),
        Entry("prelu", "torch.nn:PReLU", "leaky ReLU with a learned slope, one per layer"),
        Entry("elu", "torch.nn:ELU", "exponential linear unit"),
        Entry("selu", "torch.nn:SELU", "self-normalising ELU (dropout becomes alpha dropout)"),
        Entry("gelu", "torch.nn:GELU", "Gaussian error linear unit"),
        Entry("silu", "torch.nn:SiLU", "x * sigmoid(x), also called swish"),
        Entry("tanh", "torch.nn:Tanh", "hyperbolic tangent"),
        Entry("sigmoid", "torch.nn:Sigmoid", "logistic sigmoid"),
    ],
)

OPTIMIZERS = Registry(
    "optimizer",
    "search_space.optimizer",
    [
        Entry(
            "sgd",
            "torch.optim:SGD",
            "mini-batch SGD; `momentum`, `nesterov`",
            takes=("momentum", "nesterov"),
        ),
        Entry("adam", "torch.optim:Adam", "Adam, L2 `weight_decay` added to the gradient"),
        Entry("adamw", "torch.optim:AdamW", "Adam with decoupled `weight_decay`"),
        Entry("rmsprop", "torch.optim:RMSprop", "RMSprop; `momentum`", takes=("momentum",)),
        Entry("adagrad", "torch.optim:Adagrad", "Adagrad"),
        Entry("nadam", "torch.optim:NAdam", "Adam with Nesterov momentum"),
    ],
)

INITS = Registry(
    "init",
    "search_space.init",
    [
        Entry("default", "hpo.model:init_default", "PyTorch's own (Kaiming uniform, a=sqrt(5))"),
        Entry("he", "hpo.model:init_he", "He (Kaiming) normal, for ReLU-like activations"),
        Entry("xavier", "hpo.model:init_xavier", "Xavier (Glorot) uniform, for tanh/sigmoid"),
    ],
)

LR_SCHEDULES = Registry(
    "lr_schedule",
    "search_space.lr_schedule",
    [
        Entry("none", "hpo.optim:constant_lr", "a constant learning rate"),
        Entry("cosine", "hpo.optim:cosine_lr", "cosine annealing to 0 over `max_epochs`"),
        Entry("plateau", "hpo.optim:plateau_lr", "halve the rate after 2 epochs without a "
              "lower val_loss"),
    ],
)  # fmt: skip

# training.precision: how matrix products are computed (see hpo.train.matmul_precision).
PRECISIONS = ("auto", "fp32", "tf32", "bf16")

ALL = {
    "datasets": DATASETS,
    "samplers": SAMPLERS,
    "pruners": PRUNERS,
    "activations": ACTIVATIONS,
    "optimizers": OPTIMIZERS,
    "inits": INITS,
    "lr_schedules": LR_SCHEDULES,
}


def names_markdown() -> str:
    """Every registry as the body of docs/spec.md's Names section."""
    parts = []
    for title, reg in ALL.items():
        heading = title.replace("_", " ").capitalize()
        parts.append(f"**{heading}** (`{reg.key}`):\n\n{reg.markdown()}")
    return "\n\n".join(parts)


BEGIN, END = (
    "<!-- names: begin (make docs writes this from hpo/registry.py) -->",
    "<!-- names: end -->",
)


def sync_names(path: str) -> bool:
    """Rewrite the names section of docs/spec.md from these registries; True if it changed."""
    return sync_section(path, BEGIN, END, names_markdown())


def sync_section(path: str, begin: str, end: str, body: str) -> bool:
    """Put `body` between the lines `begin` and `end` of a Markdown file; True if it changed."""
    with open(path) as f:
        text = f.read()
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    new = f"{head}{begin}\n{body}\n{end}{tail}"
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return new != text
