"""All MLflow code: one parent run per study, one nested run per trial, artifacts, closing runs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from hpo.outage import DiskFault, Retry, disk_fault, uncut
from hpo.redact import first_line, redact, redact_url, url_problem

SYSTEM_S = 5.0  # seconds between samples of the machine (`MlflowTracker._watch_system`)
SYSTEM_STOP_S = 10.0  # the longest the last samples are waited for at the study's end

_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
# A running trial's epochs reach its MLflow run at most this many seconds after they end.
FLUSH_S = 1.0

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "KILLED": "KILLED"}


def resolve_uri(spec_uri: str | None, cli_uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else tracking.uri, else sqlite:///mlflow.db:
    the command line, the environment, the spec.

    The default is made absolute: MLflow caches one store per URI string in a process, so a
    relative one would keep pointing at the first working folder it was used in.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = cli_uri or env or spec_uri
    where = "--tracking-uri" if cli_uri else "MLFLOW_TRACKING_URI" if env else "tracking.uri"
    problem = url_problem(uri, where)
    if problem:
        from hpo.config import SpecError

        raise SpecError([problem])
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def _no_urls_printed() -> None:
    """With a tracking server, MLflow prints "View run ... at: URL" to stdout as each run
    ends: the URL's password with it, two lines a trial through hpo's progress, and one more
    request to the server for the run's name. hpo prints where to browse the runs once. (The
    one setting hpo changes outside the CLI, when it first talks to MLflow: a password is
    never printed, from a notebook either.)"""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def _file_store_allowed() -> bool:
    """MLFLOW_ALLOW_FILE_STORE, read as MLflow reads it."""
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE

    return bool(MLFLOW_ALLOW_FILE_STORE.get())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """An MLflow server's /health answers itself: a redirect (which urllib would follow with
    the password, to any host) is an error."""

    def redirect_request(self, *args: Any) -> None:
        return None


def _health(uri: str) -> None:
    """GET the server's /health; a user and password in the URL (else MLflow's
    MLFLOW_TRACKING_USERNAME and _PASSWORD) go as HTTP basic auth, as MLflow's own requests
    send them (urllib would take them for part of the host name)."""
    import base64

    url = urllib.parse.urlsplit(uri.rstrip("/") + "/health")
    user, password = url.username, url.password
    if user is not None or password is not None:
        user, password = (urllib.parse.unquote(x or "") for x in (user, password))
        url = url._replace(netloc=url.netloc.rsplit("@", 1)[1])
    elif os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        user, password = (
            os.environ["MLFLOW_TRACKING_USERNAME"],
            os.environ["MLFLOW_TRACKING_PASSWORD"],
        )
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(urllib.parse.urlunsplit(url), headers=headers)
    with urllib.request.build_opener(_NoRedirect()).open(request, timeout=10):
        pass


class MlflowTracker:  # implements hpo.tracker.Tracker
    """Writes a study and its trials to one MLflow tracking store.

    Built by the CLI and handed to the driver, which calls `check` before anything is written
    and `open` once the run is sure to go ahead. Several processes may track one study: each
    has its own tracker, and they share the study's one parent run.
    """

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.experiment = experiment
        self.experiment_id: str | None = None
        self.parent_id: str | None = None
        self._client: Any = None
        # Epoch metrics not yet sent, per trial run, and when each run's were last sent.
        self._pending: dict[str, list[Any]] = {}
        self._sent_at: dict[str, float] = {}
        # Set by the driver once the study is under way: a server that goes away then is
        # waited for (at start, one that does not answer is refused at once instead).
        self.retry: Retry | None = None
        self._system: Any = None  # MLflow's system metrics monitor, on the parent run

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            _no_urls_printed()
            self._client = MlflowClient(tracking_uri=self.uri)
        if self.retry is not None:
            return _Retrying(self._client, self.retry)
        return self._client

    def check(self) -> None:
        """Refuse, with `SpecError`, a URI of an unknown kind or a server that does not answer."""
        from hpo.config import SpecError

        scheme = self.uri.split("://", 1)[0].lower() if "://" in self.uri else "file"
        if scheme in ("http", "https"):
            try:
                _health(self.uri)
            except Exception as e:  # noqa: BLE001 - refused, timed out, not an MLflow server
                raise SpecError(
                    [
                        f"tracking.uri: no MLflow server answers at {redact_url(self.uri)}: "
                        f"{redact(str(e))[:200]}"
                    ]
                ) from None
        elif scheme.split("+")[0] not in _SCHEMES:
            raise SpecError(
                [
                    f"tracking.uri: unknown kind of MLflow store {redact_url(self.uri)!r}; "
                    f"allowed: http(s)://HOST:PORT, sqlite:///FILE, postgresql://..., file:///DIR"
                ]
            )
        elif scheme == "file" and not _file_store_allowed():
            # MLflow 3 refuses its folder store unless told, with a paragraph about it
            raise SpecError(
                [
                    f"tracking.uri: {redact_url(self.uri)!r} is a folder store, which MLflow 3 no "
                    "longer opens (maintenance mode); give sqlite:///FILE.db (the default: "
                    "sqlite:///mlflow.db), a database or a server, or set "
                    "MLFLOW_ALLOW_FILE_STORE=true to use the folder anyway (`mlflow "
                    "migrate-filestore` converts it)"
                ]
            )
        else:
            from hpo.storage import check_driver, check_writable, sqlite_path

            check_driver(self.uri, "tracking.uri")
            way_out = "run from a writable folder, or give --tracking-uri a store elsewhere"
            db = sqlite_path(self.uri)
            if db is not None:
                check_writable(db.parent, db.name, "tracking.uri", way_out)
            root = self.artifact_root()
            if root is not None:
                check_writable(root, "MLflow artifacts", "tracking.uri", way_out)

    def artifact_root(self) -> Path | None:
        """Where a local store keeps new experiments' artifacts: next to a SQLite database,
        inside a file store, else ./mlruns (MLflow's default); None for a tracking server."""
        from hpo.storage import sqlite_path

        scheme = self.uri.split("://", 1)[0].lower() if "://" in self.uri else "file"
        if scheme in ("http", "https", "databricks"):
            return None
        db = sqlite_path(self.uri)
        if db is not None:
            return db.absolute().parent / "mlruns"
        if scheme == "file":
            return Path(self.uri[len("file://") :] if "://" in self.uri else self.uri)
        return Path("mlruns").absolute()

    def open(self) -> None:
        """Connect and create the experiment (once, whoever comes first)."""
        from hpo.config import SpecError
        from hpo.storage import storage_lock

        try:
            # Not cut in two by Ctrl-C: a write cut short leaves a SQLite store locked.
            with uncut(), storage_lock(self.uri, "hpo:mlflow"):  # store migrations run once
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    self.experiment_id = self._create_experiment()
                else:
                    if exp.lifecycle_stage == "deleted":
                        self.client.restore_experiment(exp.experiment_id)
                    self.experiment_id = exp.experiment_id
        except Exception as e:  # noqa: BLE001 - a malformed URI or an unreachable server
            raise SpecError(
                [
                    f"tracking.uri: cannot open MLflow store {redact_url(self.uri)!r}: "
                    f"{first_line(e)}"
                ]
            ) from None

    def _create_experiment(self) -> str:
        """Create the experiment; if another process created it first (a tracking server
        takes no lock of ours), use theirs."""
        from mlflow.exceptions import MlflowException

        from hpo.config import folder_name
        from hpo.storage import sqlite_path

        root = self.artifact_root() if sqlite_path(self.uri) else None
        # A SQLite store's artifacts go next to it, wherever hpo was started.
        location = (root / folder_name(self.experiment)).as_uri() if root else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # ------------------------------------------------------------ the study's parent run

    def open_parent(
        self, run_id: str | None, name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> str:
        """Reopen the study's parent run, or create it. Call it under the study's lock: every
        process of a study shares the one parent run it names."""
        from mlflow.entities import Param

        if self.experiment_id is None:
            self.open()
        if run_id is not None and self._exists(run_id):
            if self.client.get_run(run_id).info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        self.parent_id = run_id
        self._watch_system()
        return run_id

    def _watch_system(self) -> None:
        """Sample the machine into the parent run while this process drives the study:
        MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk, network,
        and each NVIDIA GPU's use and memory through NVML: `system/gpu_0_utilization_percentage`),
        every `SYSTEM_S` seconds or `$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`. Off with
        `MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`. It logs past hpo's retries: a tracking
        server that goes away ends the sampling, not the study."""
        self._stop_watching()  # a parent opened again: one sampler at a time
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").lower() in ("false", "0"):
            return
        import logging

        # its start and stop lines, and why there is no GPU to sample, are not the user's news
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                self.parent_id, sampling_interval=SYSTEM_S, resume_logging=True,
                tracking_uri=self.uri,
            )  # fmt: skip
            self._system.start()
        except Exception:  # noqa: BLE001 - no psutil, say: the study goes on without
            self._system = None

    def _stop_watching(self) -> None:
        """The last samples sent, waiting at most `SYSTEM_STOP_S` (the server may be gone)."""
        import threading

        monitor, self._system = self._system, None
        if monitor is not None:
            done = threading.Thread(target=monitor.finish, name="hpo-system-metrics", daemon=True)
            done.start()
            done.join(SYSTEM_STOP_S)

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException when the store has no such run
            return False
        return True

    def close_run(self, run_id: str, status: str = "KILLED", state: str = "KILLED") -> None:
        """Close the run of a trial whose process died (its heartbeat went silent)."""
        from mlflow.entities import RunTag

        if run_id in self._pending:
            self._send(run_id)
        if run_id and self._exists(run_id):
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.log_batch(run_id, tags=[RunTag("hpo.state", state)])
                self.client.set_terminated(run_id, status)

    def running_trial_runs(self) -> dict[str, int]:
        """Run id -> trial number of the parent's child runs still marked RUNNING."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'"
            ),
            max_results=10_000,
        )
        return {r.info.run_id: int(r.data.tags.get("hpo.trial_number", -1)) for r in runs}

    def fail_pending_models(self) -> int:
        """Mark FAILED the models of the parent run left PENDING by an interrupted upload."""
        from mlflow.entities import LoggedModelStatus

        pending = [
            m
            for m in self.client.search_logged_models(experiment_ids=[self.experiment_id])
            if m.source_run_id == self.parent_id and m.status == LoggedModelStatus.PENDING
        ]
        for m in pending:
            self.client.finalize_logged_model(m.model_id, LoggedModelStatus.FAILED)
        return len(pending)

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

    def log_model(
        self, predictor: Any, input_example: Any, run_id: str | None = None, name: str = "model"
    ) -> str:
        """Log a deployable model (hpo/serving.py's `Predictor` as an MLflow pyfunc: raw rows
        in, labels or values in the target's unit out) with its signature and an input
        example of raw rows; return its URI."""
        import mlflow
        import mlflow.pyfunc
        from mlflow.models import infer_signature

        from hpo import serving

        mlflow.set_tracking_uri(self.uri)
        run_id = run_id or self.parent_id
        active = mlflow.active_run()
        if active is not None and active.info.run_id != run_id:
            mlflow.end_run()
        classify = predictor.prep["task"] == "classification"
        output = predictor.predict(input_example)
        params = {"probabilities": False} if classify else None
        signature = infer_signature(input_example, output, params=params)
        if predictor.prep["kind"] != "table":
            # Raw pixel values come as uint8, int64 or float arrays, one image a row or a
            # single image: a tensor schema would accept only the example's exact dtype.
            signature.inputs = None
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            artifacts = predictor.save(Path(folder))
            with uncut():  # as in `open`
                mlflow.start_run(run_id=run_id)
                try:
                    info = mlflow.pyfunc.log_model(
                        name=name,
                        python_model=serving.__file__,  # the model's code: needs no hpo to serve
                        artifacts=artifacts,
                        signature=signature,
                        input_example=input_example,
                        pip_requirements=[
                            f"torch=={_torch_version()}",
                            f"mlflow=={mlflow.__version__}",
                            "pandas",
                            "numpy",
                        ],
                    )
                except Exception as e:
                    fault = disk_fault(e)
                    if fault is None:
                        raise
                    raise DiskFault("model of run", run_id, fault) from None
                finally:
                    # end_run marks the run FINISHED; close_parent/end_trial set the final status.
                    mlflow.end_run()
        self.client.update_run(run_id, status="RUNNING")
        return info.model_uri

    def register_model(self, uri: str, name: str, alias: str) -> tuple[str, str]:
        """A logged model registered as a new version of `name` in MLflow's model registry,
        `alias` moved onto it (`MlflowClient.set_registered_model_alias`)."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        # MLflow prints "Successfully registered model" to stderr: hpo says it in its summary
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            version = mlflow.register_model(uri, name).version
        self.client.set_registered_model_alias(name, alias, version)
        return f"models:/{name}@{alias}", str(version)

    def close_parent(self, status: str = "FINISHED") -> None:
        """End the parent run: FINISHED, KILLED (Ctrl-C) or FAILED."""
        self._stop_watching()
        self.flush()
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

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics at step = epoch. Sent at once when the run's last epochs went
        out `FLUSH_S` ago or more (an epoch of a second or longer goes out as it ends), else
        with the next send: a running trial's curve in the MLflow UI is at most `FLUSH_S`
        behind (the driver calls `flush(due_only=True)` as it waits), and epochs of a few
        milliseconds cost one write a second, not one each."""
        from mlflow.entities import Metric

        now = _now()
        batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if _finite(v)]
        self._pending.setdefault(run_id, []).extend(batch)
        if time.monotonic() - self._sent_at.get(run_id, -math.inf) >= FLUSH_S:
            self._send(run_id)

    def flush(self, due_only: bool = False, run_id: str | None = None) -> None:
        """Send the epochs not sent yet: every run's (or `run_id`'s), or (`due_only`) those of
        runs whose last send was `FLUSH_S` ago or more."""
        now = time.monotonic()
        for pending in [run_id] if run_id is not None else list(self._pending):
            if pending not in self._pending:
                continue
            if not due_only or now - self._sent_at.get(pending, -math.inf) >= FLUSH_S:
                self._send(pending)

    def _send(self, run_id: str, metrics: list[Any] | None = None, **with_them: Any) -> None:
        """The run's pending epochs, with `metrics` and `with_them` (params, tags), in one
        `log_batch` (which MLflow's client splits at its limits per request)."""
        batch = self._pending.get(run_id, []) + (metrics or [])
        self.client.log_batch(run_id, metrics=batch, **with_them)
        self._pending.pop(run_id, None)
        self._sent_at[run_id] = time.monotonic()

    def end_trial(
        self,
        run_id: str,
        state: str,
        params: dict[str, Any],
        final: dict[str, float],
        tags: dict[str, str] | None = None,
    ) -> None:
        """Params, final metrics and tags; then close the run."""
        from mlflow.entities import Metric, Param, RunTag

        now = _now()
        metrics = [Metric(k, float(v), now, 0) for k, v in final.items() if _finite(v)]
        all_tags = [RunTag("hpo.state", state)] + [
            RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()
        ]
        p = [Param(k, _param(v)) for k, v in params.items()]
        self._send(run_id, metrics=metrics, params=p, tags=all_tags)  # with its last epochs
        self._sent_at.pop(run_id, None)
        self.client.set_terminated(run_id, STATUS.get(state, "FINISHED"))

    def save_checkpoint(self, run_id: str, state_dict: dict[str, Any], config: dict) -> None:
        """The trial's kept weights and the configuration that builds them."""
        import torch

        try:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(state_dict, Path(tmp) / "weights.pt")
                (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, default=str))
                self.client.log_artifacts(run_id, tmp, "checkpoint")
        except Exception as e:
            fault = disk_fault(e)
            if fault is None:
                raise
            self._remove_local_artifacts(run_id, "checkpoint")  # no half-written weights.pt
            raise DiskFault("checkpoint of run", run_id, fault) from None

    def _remove_local_artifacts(self, run_id: str, folder: str) -> None:
        """Remove a run's artifact folder when it is a local one (best effort)."""
        import shutil
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        try:
            uri = self._client.get_run(run_id).info.artifact_uri
        except Exception:  # noqa: BLE001 - the store itself may be on the full disk
            return
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            shutil.rmtree(Path(url2pathname(parsed.path)) / folder, ignore_errors=True)

    def load_checkpoint(self, run_id: str) -> dict[str, Any]:
        """The weights a trial saved with `save_checkpoint`."""
        import torch

        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, "checkpoint/weights.pt", tmp)
            return torch.load(path, map_location="cpu", weights_only=True)


class _Retrying:
    """An MlflowClient whose calls go through a `Retry`."""

    def __init__(self, client: Any, retry: Retry):
        self._client, self._retry = client, retry

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._retry(attr, *args, **kwargs)


def load_predictor(model_uri: str, tracking_uri: str | None = None) -> Any:
    """A logged model's `Predictor` (hpo/serving.py), read from the tracking store."""
    import mlflow.pyfunc

    from hpo.storage import missing_sqlite

    uri = resolve_uri(None, tracking_uri)
    if missing_sqlite(uri):
        raise FileNotFoundError(f"no tracking store {uri} (give --tracking-uri)")
    mlflow.set_tracking_uri(uri)
    _no_urls_printed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mlflow.pyfunc.load_model(model_uri)
        try:
            return model.unwrap_python_model().predictor
        except Exception:  # noqa: BLE001 - not hpo's pyfunc model
            raise ValueError(
                "it is not a model hpo can read raw rows with (an older hpo logged plain "
                "mlflow.pytorch models: load it with mlflow.pytorch.load_model)"
            ) from None


def log_folder(uri: str, run_id: str, folder: str | Path, artifact_path: str) -> None:
    """Files of a folder as artifacts of an existing run (a report on the study's parent run)."""
    from mlflow import MlflowClient

    _no_urls_printed()
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


def tracker_for(
    spec: Any, tracking_uri: str | None = None, study_name: str | None = None
) -> MlflowTracker:
    """The tracker a spec asks for: its store (see `resolve_uri`) and its experiment."""
    uri = resolve_uri(spec.tracking.uri, tracking_uri)
    return MlflowTracker(uri, spec.tracking.experiment or study_name or spec.name)
