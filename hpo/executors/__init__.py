"""How trials get run: in this process, in local worker processes, or as Ray tasks.

An executor has `slots` workers. The driver (`study.py`) submits `TrialJob`s (or
`CohortJob`s: several trials trained together by one worker), two per worker (one to train,
one to hold next), reads `Started`, `Epoch`, `Done` and `Lost` events (one per trial), and
answers each `Epoch` with a decision (None to go on, "pruned" or "interrupted" to stop
there). Every executor runs the same worker loop (`worker.serve`) over its own kind of
channel, so a trial runs the same code wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from hpo.trial import CohortJob, TrialJob, TrialRecord


@dataclass
class Started:
    """A worker took a trial: where it runs ("host:pid")."""

    number: int
    worker: str


@dataclass
class Epoch:
    """A trial finished an epoch; the driver answers it with a decision."""

    number: int
    epoch: int
    metrics: dict[str, float]


@dataclass
class Done:
    """A trial ended (complete, pruned, failed, stopped): its record."""

    number: int
    record: TrialRecord


@dataclass
class Lost:
    """The worker running a trial died (killed, out of memory): the trial has no record."""

    number: int
    reason: str


Event = Started | Epoch | Done | Lost


class Executor(Protocol):
    """Runs trials on `slots` workers; see the module docstring."""

    slots: int
    description: str  # for the start-up line: "2 worker processes on cpu, 1 thread each"

    def adapt(self, spec: Any, data: Any) -> Any:
        """The spec as these workers will run it (the local executor with nothing given on a
        GPU picks the cohort size, and its own workers, from a probe on `data`)."""

    def start(self, data: Any) -> None:
        """Start the workers (the driver's own data is shared where the device matches);
        they load their data and warm up while the driver opens its stores."""

    def ready(self) -> None:
        """Wait until every worker is ready for trials; raise if one cannot start."""

    def submit(self, job: TrialJob | CohortJob) -> None:
        """Run a trial (or a cohort of them): on a worker with nothing to train, else held by
        one until its current job ends, else as soon as one can take it."""

    def cancel(self) -> list[int]:
        """Take back the jobs not started (the study stops): their trial numbers."""

    def wait(self, timeout: float) -> list[Event]:
        """Events that arrived within `timeout` seconds (maybe none)."""

    def decide(self, number: int, decision: str | None) -> None:
        """Answer a trial's `Epoch`: None goes on, "pruned" or "interrupted" stops it."""

    def close(self, interrupt: bool = False) -> None:
        """Stop the workers; with `interrupt`, running trials are cut short or killed."""
