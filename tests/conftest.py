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
