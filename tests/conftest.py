"""Fixed seeds, a tiny dataset, and specs with small budgets written into temporary folders."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
if not os.environ.get("HPO_DATA_DIR") and SHARED_DATA.is_dir():
    os.environ["HPO_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# The machine's samples on a study's run (hpo.tracking's system metrics) are tested where they
# are turned on again: elsewhere a tracker left open by a test would go on writing its store.
os.environ["MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"] = "false"
torch.set_num_threads(min(2, torch.get_num_threads()))


def mnist_available() -> bool:
    d = Path(os.environ.get("HPO_DATA_DIR", "")) / "mnist"
    return (d / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder: optuna.db and mlflow.db land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def blobs():
    """Three well-separated Gaussian blobs in 8 dimensions: (train, val) tensors."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 4
    y = torch.randint(0, 3, (600,), generator=g)
    X = centers[y] + torch.randn(600, 8, generator=g)
    return (X[:480], y[:480]), (X[480:], y[480:])


def small_spec(**overrides) -> dict:
    """A digits spec with a budget of seconds; nested keys merge into the defaults, except
    search_space, which replaces them."""
    spec = {
        "name": "tiny",
        "dataset": {"name": "digits", "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "task": "classification",
        "search_space": {
            "n_layers": {"type": "int", "low": 1, "high": 2},
            "width": {"type": "int", "low": 16, "high": 64, "log": True},
            "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "batch_size": 64,
        },
        "training": {"max_epochs": 3, "early_stopping": {"patience": 2}, "device": "cpu"},
        "study": {
            "n_trials": 3,
            "metric": "val_accuracy",
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
        },
        "tracking": {"log_model": "none"},
    }
    return _merge(spec, overrides)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        nested = isinstance(v, dict) and isinstance(base.get(k), dict) and k != "search_space"
        out[k] = _merge(base[k], v) if nested else v
    return out


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def study_run(spec, **kw):
    """run_study with the tracker the spec asks for, in this process (one worker)."""
    from hpo.study import run_study
    from hpo.tracking import tracker_for

    return run_study(spec, tracker_for(spec, study_name=kw.get("study_name")), **kw)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One MLflow store for the session: creating a store runs its migrations (seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


# ---------------------------------------------------------------- real servers

PG_PASSWORD = "pw-Secret-7f3a9"  # must appear nowhere hpo prints, logs or stores


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 with password authentication (Debian's
    postgresql package: initdb and pg_ctl; `make test` installs it when it is missing)."""

    def __init__(self):
        import shutil
        import tempfile

        initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (initdb and self.pg_ctl):
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed: run `make test`")
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.folder = Path(tempfile.mkdtemp(prefix="hpo-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.folder, "postgres")
        (self.folder / "pw").write_text(PG_PASSWORD)
        if self.as_user:
            shutil.chown(self.folder / "pw", "postgres")
        self.data = self.folder / "data"
        pw = f"--pwfile={self.folder / 'pw'}"
        self._run(initdb, "-D", str(self.data), "-U", "hpo", "--auth=scram-sha-256", pw)
        self.port = _free_port()
        self.start()

    def _run(self, *cmd, check=True):
        import subprocess

        return subprocess.run([*self.as_user, *cmd], check=check, capture_output=True)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        log = str(self.folder / "log")
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: open connections are cut, as in a restart or failover)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def remove(self) -> None:
        import shutil

        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://hpo:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session."""
    server = Postgres()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of the test's own, which it may stop and start."""
    server = Postgres()
    try:
        yield server
    finally:
        server.remove()


class MlflowServer:
    """A real `mlflow server` process: a backend store, a served artifact store."""

    def __init__(self, backend: str, folder: Path):
        self.backend, self.folder = backend, folder
        self.artifacts = folder / "mlartifacts"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        log_path = self.folder / "mlflow-server.log"
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "mlflow", "server",
                    "--backend-store-uri", self.backend,
                    "--artifacts-destination", str(self.artifacts),
                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # as README
            )  # fmt: skip
        deadline = time.monotonic() + 180  # only stops a server that never comes up
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:]) from None
                time.sleep(0.5)

    def kill(self, sig: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """A real `mlflow server` for the session: PostgreSQL backend, served artifacts."""
    server = MlflowServer(
        postgres.create_database("mlflow"), tmp_path_factory.mktemp("mlflow-srv")
    )
    try:
        yield server.url
    finally:
        server.kill()


def hpo_process(args, cwd, env=None, **kw):
    """`python -m hpo ARGS` as a real process in `cwd`, output merged, unbuffered; `env` adds
    to the environment."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "hpo", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@contextlib.contextmanager
def http_server(answer):
    """A real HTTP server on 127.0.0.1 that answers every GET and POST with `answer(handler)`
    (a `BaseHTTPRequestHandler`); yields its URL."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            answer(self)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A file system of its own (tmpfs of `size`, e.g. '64m') mounted on the new `folder`, so
    that a test can fill it or make it read-only for real; skips where mounting is not allowed."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root")
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("this machine does not let tests mount a file system")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def kill_a_worker_training(study_name: str, storage: str, alongside: int = 1, process=None):
    """Wait for a trial RUNNING on a worker process, 2 to 150 epochs in (with `alongside` - 1
    cohort mates RUNNING too), kill -9 that worker, and return the trial. Its trials must be
    much longer than 150 epochs: far from its end, it is still that worker's trial when killed."""
    import optuna
    from optuna.trial import TrialState

    def training():
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:  # not created yet
            return None
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in running:
            if "worker" in t.user_attrs and 2 <= len(t.intermediate_values) <= 150:
                cohort = t.user_attrs.get("fused_with", [t.number])
                if sum(r.number in cohort for r in running) >= alongside:
                    return t
        return None

    what = f"{alongside} trial(s) of a cohort RUNNING on a worker"
    victim = wait_for(training, what, process=process)
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    return victim


def wait_for(condition, what: str, limit: float = 600.0, every: float = 0.05, process=None):
    """Poll until `condition()` is truthy and return it; the limit only stops a hung test. With
    `process` (a Popen), fail as soon as it has ended without the condition."""
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            out = process.stdout.read() if process.stdout is not None else ""
            raise AssertionError(f"never saw: {what}; the process ended first:\n{out}")
        time.sleep(every)
    raise AssertionError(f"never saw: {what}")


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def rendered_dom(page, profile, window=(1280, 900)):
    """The page's DOM after headless Chromium ran its scripts (offline: no network flags)."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            f"--window-size={window[0]},{window[1]}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
