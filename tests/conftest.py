"""Fixed seeds, a tiny dataset, and specs with small budgets written into temporary folders."""

from __future__ import annotations

import os
import random
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
    """A throwaway PostgreSQL server on 127.0.0.1 with password authentication."""

    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port

    def url(self, database: str) -> str:
        return f"postgresql://hpo:{PG_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's postgresql package: initdb and pg_ctl) for the
    session; `make test` installs the package when it is missing."""
    import shutil
    import subprocess
    import tempfile

    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed: run `make test`")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="hpo-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    (folder / "pw").write_text(PG_PASSWORD)
    if as_user:
        shutil.chown(folder / "pw", "postgres")
    data = folder / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True)  # noqa: E731
    run(initdb, "-D", str(data), "-U", "hpo", "--auth=scram-sha-256", f"--pwfile={folder / 'pw'}")
    port = _free_port()
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
    run(pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        yield Postgres(folder, port)
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """A real `mlflow server` process: PostgreSQL backend store, served artifact store."""
    import subprocess
    import sys
    import time
    import urllib.request

    backend = postgres.create_database("mlflow")
    artifacts = tmp_path_factory.mktemp("mlartifacts")
    port = _free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend,
            "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.close()
                why = (artifacts.parent / "mlflow-server.log").read_text()[-3000:]
                raise RuntimeError(why) from None
            time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()


def hpo_process(args, cwd, **kw):
    """`python -m hpo ARGS` as a real process in `cwd`, output merged, unbuffered."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
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


def wait_for(condition, what: str, limit: float = 600.0, every: float = 0.05):
    """Poll until `condition()` is truthy and return it; the limit only stops a hung test."""
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"never saw: {what}")
