"""tracking.ensemble: greedy ensemble selection (Caruana et al. 2004) from the best trials'
kept weights, tested once beside the best trial, logged as one model that serves raw rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import small_spec, study_run
from mlflow import MlflowClient

from hpo import ensemble
from hpo.config import parse_spec
from hpo.data import load_data
from hpo.params import TrialConfig
from hpo.tracking import MlflowTracker
from hpo.trial import build_model


def test_selection_adds_the_model_that_most_improves_the_ensemble_with_replacement():
    y = torch.tensor([0, 1, 0, 1])
    sure = lambda cls: torch.nn.functional.one_hot(torch.tensor(cls), 2).float() * 8  # noqa: E731
    right_first = sure([0, 1, 1, 1])  # right on rows 0, 1, 3
    right_last = sure([1, 1, 0, 1])  # right on rows 1, 2, 3
    wrong = sure([1, 0, 1, 0])
    counts = ensemble.select([wrong, right_first, right_last], y, True, "val_accuracy", 4)
    assert sum(counts) == 4 and counts[0] == 0
    assert counts[1] > 0 and counts[2] > 0  # together they are right on every row
    mean = ensemble.combine([right_first, right_last], [0.5, 0.5], True)
    assert ensemble.scores(mean, y, True)["accuracy"] == 1.0
    # regression: the mean of two estimates that err on either side
    y = torch.tensor([1.0, 2.0])
    low, high = torch.tensor([[0.5], [1.5]]), torch.tensor([[1.5], [2.5]])
    assert ensemble.select([low, high], y, False, "val_rmse", 2) == [1, 1]


FRESH = """
import json, sys
sys.modules["hpo"] = None  # serving the model must not need hpo
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
rows = np.load(sys.argv[3])
print(json.dumps([int(v) for v in model.predict(rows)]))
"""


def test_an_ensemble_of_the_best_trials_is_tested_once_and_serves_raw_rows(workdir, mlflow_uri):
    spec = parse_spec(
        small_spec(
            name="ens",
            study={"n_trials": 5},
            training={"max_epochs": 4},
            tracking={
                "uri": mlflow_uri,
                "log_model": "best",
                "ensemble": {"size": 6, "candidates": 3},
            },
        )  # fmt: skip
    )
    result = study_run(spec, study_name="ens")
    study = result.study
    e = study.user_attrs["ensemble"]
    ranked = sorted(study.get_trials(states=(optuna_complete(),)), key=lambda t: -t.value)
    assert e["candidates"] == [t.number for t in ranked[:3]]  # the best three kept weights
    assert all(study.trials[n].user_attrs.get("checkpoint") for n in e["candidates"])
    assert set(e["members"]) <= {str(n) for n in e["candidates"]}
    assert sum(e["members"].values()) == pytest.approx(1.0)
    assert result.ensemble == e

    # the recorded validation and test figures are the weighted members' own, recomputed here
    data = load_data(spec, "cpu")
    tracker = MlflowTracker(mlflow_uri, "ens")
    members = []
    for n, w in e["members"].items():
        t = study.trials[int(n)]
        model = build_model(TrialConfig.of(t.user_attrs["config"]), data, "cpu")
        model.load_state_dict(tracker.load_checkpoint(t.user_attrs["mlflow_run_id"]))
        members.append((w, model.eval()))
    X_test, y_test = data.take_test()
    with torch.inference_mode():
        for split, (X, y) in (("val", data.val), ("test", (X_test, y_test))):
            mean = ensemble.combine([m(X) for _, m in members], [w for w, _ in members], True)
            got = ensemble.scores(mean, y, True)
            assert e[f"{split}_accuracy"] == pytest.approx(got["accuracy"])
            assert e[f"{split}_loss"] == pytest.approx(got["loss"], rel=1e-5)
        expected = ensemble.combine([m(X_test) for _, m in members], [w for w, _ in members], True)
    logged = MlflowClient(mlflow_uri).get_run(result.parent_run_id).data.metrics
    assert logged["ensemble_test_accuracy"] == pytest.approx(e["test_accuracy"])

    # the logged ensemble takes the raw test images (0-16 pixel values) in a fresh process
    raw = data.raw_example.astype(np.float32)
    np.save(workdir / "rows.npy", raw)
    done = subprocess.run(
        [sys.executable, "-c", FRESH, mlflow_uri, e["model_uri"], str(workdir / "rows.npy")],
        capture_output=True, text=True, check=True, cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    served = json.loads(done.stdout.strip().splitlines()[-1])
    from hpo.serving import Predictor

    here = Predictor(members, data.prep)
    X = torch.from_numpy(here.features(raw))
    with torch.inference_mode():
        mine = ensemble.combine([m(X) for _, m in members], [w for w, _ in members], True)
    labels = data.prep["classes"]
    assert served == [labels[i] for i in mine.argmax(1).tolist()]
    assert served == [int(v) for v in here.predict(raw)]
    assert expected.shape[0] == len(y_test)


def optuna_complete():
    from optuna.trial import TrialState

    return TrialState.COMPLETE


def test_with_folds_the_ensemble_is_chosen_on_out_of_fold_predictions(workdir, mlflow_uri):
    """Each pool row is predicted by the fold models that did not train on it; the chosen
    trials' refit models make the ensemble that is tested."""
    spec = small_spec(
        name="ens-folds", study={"n_trials": 4}, training={"max_epochs": 3},
        tracking={"uri": mlflow_uri, "ensemble": {"size": 4, "candidates": 3}},
    )  # fmt: skip
    del spec["dataset"]["split"]["val"]
    spec["dataset"]["split"]["folds"] = 3
    spec = parse_spec(spec)
    result = study_run(spec, study_name="ens-folds")
    e = result.ensemble
    data = load_data(spec, "cpu")
    assert e["selected_on"] == f"out-of-fold predictions of {len(data.train[0]):,} pool rows"
    tracker = MlflowTracker(mlflow_uri, "ens-folds")
    X, y = data.train
    mean = torch.zeros(len(X), 10)
    for n, w in e["members"].items():
        t = result.study.trials[int(n)]
        weights = tracker.load_checkpoint(t.user_attrs["mlflow_run_id"])
        config = TrialConfig.of(t.user_attrs["config"])
        for i, member in enumerate(t.user_attrs["members"]):
            net = build_model(config, data, "cpu")
            net.load_state_dict(
                {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith(f"member{i}.")}
            )
            rows = data.folds[member["fold"]][1]
            with torch.inference_mode():
                mean[rows] += w * torch.softmax(net.eval()(X[rows]), 1)
    assert e["val_accuracy"] == pytest.approx((mean.argmax(1) == y).float().mean().item())
    assert 0 < e["test_accuracy"] <= 1
    assert result.study.user_attrs["test_model"].startswith("refit on all ")


def test_a_csv_studys_ensemble_scores_the_raw_test_file_as_recorded(workdir, mlflow_uri):
    """The ensemble logged for a table takes the raw test file in a fresh process (string
    labels out) and scores it as its recorded test accuracy; the report names it."""
    import pandas as pd
    from test_deploy import _fresh_predictions, _tables

    from hpo.reports.data import report_data
    from hpo.reports.render import facts

    target = _tables(workdir, regression=False)
    spec = small_spec(
        name="ens-csv",
        dataset={"name": "csv", "path": str(workdir / "train.csv"),
                 "test_path": str(workdir / "test.csv"), "target": target,
                 "split": {"val": 0.2, "seed": 0}},
        task="auto",
        search_space={"n_layers": 1, "width": {"type": "int", "low": 8, "high": 64},
                      "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                      "batch_size": 16},
        training={"max_epochs": 10, "early_stopping": {"patience": 10}},
        study={"n_trials": 4},
        tracking={"uri": mlflow_uri, "log_model": "best", "ensemble": {"size": 5}},
    )  # fmt: skip
    result = study_run(parse_spec(spec), study_name="ens-csv")
    e = result.ensemble
    served = _fresh_predictions(mlflow_uri, e["model_uri"], workdir / "test.csv", target)
    truth = pd.read_csv(workdir / "test.csv")[target].tolist()
    hits = sum(p == t for p, t in zip(served["predictions"], truth, strict=True))
    assert hits / len(truth) == pytest.approx(e["test_accuracy"])
    shown = dict(facts(report_data(result.study)))
    assert shown["Ensemble of the best trials"].startswith("#")
    assert f"test_accuracy = {e['test_accuracy']:.4f}" in shown["Ensemble of the best trials"]
