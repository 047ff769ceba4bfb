"""A study's objectives, its constraints and the choice of its one model, as functions of plain
data (Optuna's `FrozenTrial`s): one objective or a Pareto front, which trials are feasible,
which are on the front, and which one is the study's model (`study.select`).

The first objective is always a validation metric, the one trials are pruned and stopped on;
the others are validation metrics or costs (`hpo.config.COSTS`), whose values a finished trial
keeps in its user attribute `costs`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.config import COSTS, Spec, named_costs, objective_direction

ATTR = "objectives"  # the study's user attribute holding `Objectives.as_attr()`


def primary(trial: FrozenTrial) -> float | None:
    """A trial's value on the study's first objective (its metric), with one or several."""
    return trial.values[0] if trial.values else None


@dataclass(frozen=True)
class Objectives:
    """What a study optimises (names and directions, first the metric), the bounds a trial
    must keep to be feasible, and how its one model is chosen."""

    names: tuple[str, ...]
    directions: tuple[str, ...]  # "minimize" or "maximize", one per name
    constraints: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    select: str | None = None  # chosen within `within` of the best on this (null: the metric)
    within: float = 0.0
    then: str | None = None  # ... and among those, the best on this (null: `select`)

    @classmethod
    def of_spec(cls, spec: Spec) -> Objectives:
        st = spec.study
        pairs = st.objectives()
        sel = st.select
        return cls(
            tuple(n for n, _ in pairs),
            tuple(d for _, d in pairs),
            {k: (b.min, b.max) for k, b in st.constraints.items()},
            sel.metric if sel else None,
            sel.within if sel else 0.0,
            sel.then if sel else None,
        )

    @classmethod
    def of_study(cls, study: optuna.Study) -> Objectives:
        """As the study stored them; a study from before several objectives: its metric."""
        stored = study.user_attrs.get(ATTR)
        if stored:
            return cls(
                tuple(stored["names"]),
                tuple(stored["directions"]),
                {k: (v[0], v[1]) for k, v in stored.get("constraints", {}).items()},
                stored.get("select"),
                stored.get("within", 0.0),
                stored.get("then"),
            )
        metric = study.user_attrs.get("metric", "value")
        return cls((metric,), tuple(d.name.lower() for d in study.directions[:1]))

    @classmethod
    def single(cls, metric: str, direction: str) -> Objectives:
        return cls((metric,), (direction.lower(),))

    def as_attr(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "directions": list(self.directions),
            "constraints": {k: list(v) for k, v in self.constraints.items()},
            "select": self.select,
            "within": self.within,
            "then": self.then,
        }

    @property
    def metric(self) -> str:
        return self.names[0]

    @property
    def direction(self) -> str:
        return self.directions[0]

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    @property
    def plain(self) -> bool:
        """One objective, no constraint, the best on it is the model: the simplest study."""
        return not self.several and not self.constraints and self._key() == self.metric

    def describe_choice(self) -> str:
        """How the study's model is chosen, in words."""
        key = self._key()
        feasible = " feasible" if self.constraints else ""
        best = f"the best {key}"
        if self.then and self.then != key:
            lowest = "lowest" if self._sign(self.then) > 0 else "highest"
            within = f"within {self.within:g} of {best}" if self.within else f"at {best}"
            return f"the{feasible} trial with the {lowest} {self.then} {within} (study.select)"
        return f"the{feasible} trial with {best}"

    def cost_names(self) -> list[str]:
        """The costs a trial must measure: those the objectives, constraints or choice name."""
        return named_costs(*self.names, *self.constraints, self.select, self.then)

    # ------------------------------------------------------------- a trial's quantities

    def quantity(self, trial: FrozenTrial, name: str) -> float | None:
        """A complete trial's value of an objective, a cost or a validation metric."""
        if name in self.names and trial.values:
            return trial.values[self.names.index(name)]
        if name in COSTS:
            return trial.user_attrs.get("costs", {}).get(name)
        return trial.user_attrs.get("metrics", {}).get(name)

    def values(self, metrics: dict[str, float], costs: dict[str, float]) -> list[float | None]:
        """The values a finished trial is told with, each None when it is missing or not
        finite (the trial then fails)."""
        out: list[float | None] = []
        for name in self.names:
            v = costs.get(name) if name in COSTS else metrics.get(name)
            out.append(float(v) if v is not None and math.isfinite(v) else None)
        return out

    def violations(self, trial: FrozenTrial) -> dict[str, float]:
        """Optuna's constraint values for a trial (`Trial.set_constraint`), one per bound
        (`n_params.max`): feasible when each is at most 0. A quantity not measured (a pruned
        trial's inference time) violates nothing."""
        out = {}
        for name, (low, high) in self.constraints.items():
            q = self.quantity(trial, name)
            if low is not None:
                out[f"{name}.min"] = 0.0 if q is None else low - q
            if high is not None:
                out[f"{name}.max"] = 0.0 if q is None else q - high
        return out

    def feasible(self, trial: FrozenTrial) -> bool:
        return all(v <= 0 for v in self.violations(trial).values())

    def broken(self, trial: FrozenTrial) -> list[str]:
        """The constraints a trial breaks, as a reader wants them."""
        out = []
        for name, (low, high) in self.constraints.items():
            q = self.quantity(trial, name)
            if q is None:
                continue
            if low is not None and q < low:
                out.append(f"{name} {show(q)} < min {show(low)}")
            if high is not None and q > high:
                out.append(f"{name} {show(q)} > max {show(high)}")
        return out

    # ------------------------------------------------------------- the front and the choice

    def _sign(self, name: str) -> float:
        if name in self.names:
            return -1.0 if self.directions[self.names.index(name)] == "maximize" else 1.0
        return -1.0 if objective_direction(name) == "maximize" else 1.0

    def _signed(self, trial: FrozenTrial, name: str) -> float:
        """Lower is better; a quantity not there ranks last."""
        q = self.quantity(trial, name)
        return math.inf if q is None else self._sign(name) * q

    def _key(self) -> str:
        return self.select or self.metric

    def _dims(self) -> list[str]:
        """The quantities the front and the choice read."""
        return list(dict.fromkeys([*self.names, self._key(), self.then or self._key()]))

    def candidates(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The complete, feasible trials: those the model may be chosen from."""
        return [
            t for t in trials
            if t.state == TrialState.COMPLETE and t.values and self.feasible(t)
        ]  # fmt: skip

    def ranked(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The feasible complete trials, best first on the metric (the first objective), the
        lower number first among equal values: an ensemble's candidates, in order."""
        return sorted(
            self.candidates(trials), key=lambda t: (self._signed(t, self.metric), t.number)
        )

    def dominated(self, trial: FrozenTrial, by: FrozenTrial) -> bool:
        """`by` is at least as good on every objective (and on what the choice reads) and
        better on one."""
        mine = [self._signed(trial, n) for n in self._dims()]
        theirs = [self._signed(by, n) for n in self._dims()]
        return all(b <= a for a, b in zip(mine, theirs, strict=True)) and theirs != mine

    def front(self, trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
        """The Pareto front of the feasible complete trials, in trial order."""
        pool = self.candidates(trials)
        return [t for t in pool if not any(self.dominated(t, o) for o in pool if o is not t)]

    def summary(self, trials: Sequence[FrozenTrial]) -> dict[str, Any]:
        """The front, the infeasible trials and the choice, for the summary and the report:
        {objectives: [[name, direction]], front: [{number, values: {name: value}}],
        infeasible: {number: [broken constraints]}, chosen: number or None, rule: words}."""
        front = self.front(trials)
        chosen = self.best(trials)
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
        return {
            "objectives": [[n, d] for n, d in zip(self.names, self.directions, strict=True)],
            "front": [
                {"number": t.number, "values": {n: self.quantity(t, n) for n in self._dims()}}
                for t in front
            ],  # fmt: skip
            "complete": len(done),
            "infeasible": {t.number: self.broken(t) for t in done if not self.feasible(t)},
            "chosen": chosen.number if chosen else None,
            "rule": self.describe_choice(),
        }

    def best(self, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
        """The study's one model (`study.select`): among the feasible complete trials, those
        within `within` of the best on the choice's metric, then the best on `then`, then on
        the metric, then on each objective, then the lowest number. A total order, so every
        process names the same trial whatever order ties finished in. With one objective and
        no `select`, the best value and then the lowest number."""
        pool = self.candidates(trials)
        if not pool:
            return None
        key = self._key()
        edge = min(self._signed(t, key) for t in pool) + self.within
        window = [t for t in pool if self._signed(t, key) <= edge]
        then = self.then or key
        return min(
            window,
            key=lambda t: (
                self._signed(t, then), self._signed(t, key),
                *(self._signed(t, n) for n in self.names), t.number,
            ),
        )  # fmt: skip


def show(q: float | None) -> str:
    """A metric or a cost as the summary and the report print it: 0.9772, 1,168,075, 0.31."""
    if q is None:
        return "-"
    if q == int(q) and abs(q) >= 100:
        return f"{q:,.0f}"
    return f"{q:.4f}" if abs(q) < 1 else f"{q:.4g}"
