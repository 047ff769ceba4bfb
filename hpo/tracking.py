"""All MLflow code: one parent run per study, one nested run per trial, artifacts, closing runs."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

_BATCH = 1000  # MLflow's limit of metrics per log_batch call
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "KILLED": "KILLED"}


def resolve_uri(spec_uri: str | None, cli_uri: str | None) -> str:
    """tracking.uri, else --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db.

    The default is made absolute: MLflow caches one store per URI string in a process, so a
    relative one would keep pointing at the first working folder it was used in.
    """
    uri = spec_uri or cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def _quiet() -> None:
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Tracker:
    """Writes a study and its trials to one MLflow tracking store."""

    def __init__(self, uri: str, experiment: str):
        import mlflow
        from mlflow import MlflowClient

        _quiet()  # after the import: mlflow sets its logger's level when imported

        from hpo.config import SpecError

        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
        except Exception as e:  # noqa: BLE001 - a malformed URI or an unreachable server
            msg = str(e).splitlines()[0][:300]
            raise SpecError([f"tracking.uri: cannot open MLflow store {uri!r}: {msg}"]) from None
        if exp is None:
            self.experiment_id = self.client.create_experiment(experiment)
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id
        self.parent_id: str | None = None

    # ------------------------------------------------------------ the study's parent run

    def open_parent(
        self, run_id: str | None, name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> str:
        """Reopen the study's parent run, or create it; runs a killed process left open are
        marked KILLED."""
        from mlflow.entities import Param

        if run_id is not None and self._exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self._close_stale_children(run_id)
        else:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        self.parent_id = run_id
        return run_id

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException when the store has no such run
            return False
        return True

    def _close_stale_children(self, parent_id: str) -> None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'"
            ),
        )
        for run in runs:
            self.client.set_terminated(run.info.run_id, "KILLED")

    def log_text(self, text: str, name: str) -> None:
        """A text file as an artifact of the parent run."""
        self.client.log_text(self.parent_id, text, name)

    def log_summary(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """Final study figures (test metrics, best value) and tags on the parent run."""
        from mlflow.entities import Metric, RunTag

        now = _now()
        self.client.log_batch(
            self.parent_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()],
        )

    def log_model(self, model: Any, input_example: Any, run_id: str | None = None) -> str:
        """Log a PyTorch model with `mlflow.pytorch` (input example included); return its URI."""
        import mlflow
        import mlflow.pytorch

        run_id = run_id or self.parent_id
        active = mlflow.active_run()
        if active is not None and active.info.run_id != run_id:
            mlflow.end_run()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.start_run(run_id=run_id)
            try:
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    input_example=input_example,
                    pip_requirements=[f"torch=={_torch_version()}"],
                )
            finally:
                # end_run marks the run FINISHED; close_parent/end_trial set the final status.
                mlflow.end_run()
        self.client.update_run(run_id, status="RUNNING")
        return info.model_uri

    def close_parent(self, status: str = "FINISHED") -> None:
        """End the parent run: FINISHED, KILLED (Ctrl-C) or FAILED."""
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)

    # ------------------------------------------------------------ one nested run per trial

    def start_trial(self, number: int, tags: dict[str, str] | None = None) -> str:
        """Create the trial's child run, nested under the parent."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                "mlflow.parentRunId": self.parent_id,
                "hpo.trial_number": str(number),
                "hpo.state": "RUNNING",
                **(tags or {}),
            },
        )
        return run.info.run_id

    def end_trial(
        self,
        run_id: str,
        state: str,
        params: dict[str, Any],
        history: list[dict[str, float]],
        final: dict[str, float],
        tags: dict[str, str] | None = None,
    ) -> None:
        """Params, per-epoch metrics at step = epoch, final metrics and tags, in batches."""
        from mlflow.entities import Metric, Param, RunTag

        now = _now()
        metrics = [
            Metric(k, float(v), now, epoch)
            for epoch, row in enumerate(history, start=1)
            for k, v in row.items()
            if _finite(v)
        ]
        metrics += [Metric(k, float(v), now, 0) for k, v in final.items() if _finite(v)]
        all_tags = [RunTag("hpo.state", state)] + [
            RunTag(k, str(v)) for k, v in (tags or {}).items()
        ]
        p = [Param(k, _param(v)) for k, v in params.items()]
        self.client.log_batch(run_id, metrics=metrics[:_BATCH], params=p, tags=all_tags)
        for i in range(_BATCH, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        self.client.set_terminated(run_id, STATUS.get(state, "FINISHED"))

    def save_checkpoint(self, run_id: str, state_dict: dict[str, Any], config: dict) -> None:
        """The trial's kept weights and the configuration that builds them."""
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state_dict, Path(tmp) / "weights.pt")
            (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, default=str))
            self.client.log_artifacts(run_id, tmp, "checkpoint")

    def load_checkpoint(self, run_id: str) -> dict[str, Any]:
        """The weights a trial saved with `save_checkpoint`."""
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, "checkpoint/weights.pt", tmp)
            return torch.load(path, map_location="cpu", weights_only=True)


def log_folder(uri: str, run_id: str, folder: str | Path, artifact_path: str) -> None:
    """Files of a folder as artifacts of an existing run (a report on the study's parent run)."""
    from mlflow import MlflowClient

    _quiet()
    MlflowClient(tracking_uri=uri).log_artifacts(run_id, str(folder), artifact_path)


def _now() -> int:
    return int(time.time() * 1000)


def _finite(v: Any) -> bool:
    try:
        return float(v) == float(v) and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False


def _param(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]
