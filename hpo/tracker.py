"""What the driver asks of experiment tracking: a `Tracker`.

The driver (`hpo.study`) depends on this protocol only. `hpo.tracking.MlflowTracker` is the
implementation the CLI builds (one MLflow parent run per study, a nested run per trial,
checkpoints and the deployable model as artifacts); the driver's unit tests hand it a fake
that records what it was asked (`tests/test_driver.py`).
"""

from __future__ import annotations

from typing import Any, Protocol

from hpo.outage import Retry


class Tracker(Protocol):
    uri: str  # where the runs go (shown redacted)
    experiment_id: str | None  # set by `open`
    parent_id: str | None  # the study's run, set by `open_parent`
    retry: Retry | None  # set by the driver once the study is under way

    def check(self) -> None:
        """Refuse, with `SpecError`, a store that cannot be used; before anything is written."""

    def open(self) -> None:
        """Make (or find) the experiment: the run is sure to go ahead."""

    def open_parent(
        self, run_id: str | None, name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> str:
        """The study's run: `run_id` again when it still exists, else a new one."""

    def close_parent(self, status: str = "FINISHED") -> None: ...

    def log_text(self, text: str, name: str) -> None:
        """A text file (the spec) on the study's run."""

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """Metrics and tags on the study's run (test metrics, the best trial)."""

    def start_trial(self, number: int, tags: dict[str, str] | None = None) -> str:
        """A trial's run, nested in the study's: its id."""

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """An epoch's metrics; they may wait for `flush` (or the trial's end) to be sent."""

    def flush(self, due_only: bool = False, run_id: str | None = None) -> None:
        """Send the epochs that wait (`due_only`: those that have waited long enough), of
        every run or of `run_id`."""

    def end_trial(
        self,
        run_id: str,
        state: str,
        params: dict[str, Any],
        final: dict[str, float],
        tags: dict[str, str] | None = None,
    ) -> None:
        """A trial's run closed, with its configuration, its kept epoch's metrics and tags;
        `state`: COMPLETE, PRUNED, FAIL or KILLED."""

    def close_run(self, run_id: str, status: str = "KILLED", state: str = "KILLED") -> None:
        """Close a run another process left open (its trial was failed as stale)."""

    def running_trial_runs(self) -> dict[str, int]:
        """Trial runs left RUNNING in the study's run: run id -> trial number."""

    def save_checkpoint(self, run_id: str, state_dict: dict[str, Any], config: dict) -> None:
        """A trial's kept weights and configuration, to test or retrain it later."""

    def load_checkpoint(self, run_id: str) -> dict[str, Any]: ...

    def log_model(
        self, predictor: Any, input_example: Any, run_id: str | None = None, name: str = "model"
    ) -> str:
        """The deployable model (on the study's run, or a trial's) under `name`: its URI."""

    def register_model(self, uri: str, name: str, alias: str) -> tuple[str, str]:
        """A logged model as a new version of the registered model `name`, with `alias`
        pointing at it: its `models:/NAME@ALIAS` URI and version."""

    def fail_pending_models(self) -> int:
        """Mark failed the model uploads a Ctrl-C cut short; how many."""
