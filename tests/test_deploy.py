"""The best model as users take it away: raw rows in, answers in their terms out, through
mlflow.pyfunc in a fresh process, `hpo predict`, and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import _free_port, small_spec, study_run, wait_for
from mlflow import MlflowClient
from sklearn.datasets import load_diabetes, load_iris

from hpo.config import parse_spec
from hpo.data import load_data


def _tables(folder, regression: bool):
    """Train and test CSV files with a categorical feature, a few missing values and, for
    classification, string labels."""
    rng = np.random.default_rng(0)
    if regression:
        d = load_diabetes(as_frame=True)
        frame, target = d.frame.rename(columns={"target": "progression"}), "progression"
    else:
        d = load_iris(as_frame=True)
        frame = d.frame.drop(columns="target")
        frame["species"] = [d.target_names[t] for t in d.target]
        target = "species"
    frame.columns = [c.replace(" (cm)", "").replace(" ", "_") for c in frame.columns]
    frame.insert(1, "site", rng.choice(["north", "south", "east"], len(frame)))
    numeric = frame.columns[0]
    frame.loc[rng.choice(len(frame), 5, replace=False), numeric] = np.nan
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    cut = int(len(frame) * 0.75)
    frame.iloc[:cut].to_csv(folder / "train.csv", index=False)
    frame.iloc[cut:].to_csv(folder / "test.csv", index=False)
    return target


def _table_study(workdir, mlflow_uri, regression: bool):
    target = _tables(workdir, regression)
    spec = parse_spec(
        small_spec(
            name="deploy-reg" if regression else "deploy-cls",
            dataset={
                "name": "csv",
                "path": str(workdir / "train.csv"),
                "test_path": str(workdir / "test.csv"),
                "target": target,
                "split": {"val": 0.2, "seed": 0},
            },
            task="regression" if regression else "classification",
            search_space={"n_layers": 1, "width": 32, "lr": 1e-2, "batch_size": 16},
            training={"max_epochs": 15, "early_stopping": {"patience": 15}},
            study={"n_trials": 2, "metric": "val_rmse" if regression else "val_accuracy"},
            tracking={"uri": mlflow_uri, "experiment": "deploy", "log_model": "best"},
        )
    )
    result = study_run(spec, study_name=spec.name)
    study = optuna.load_study(study_name=spec.name, storage="sqlite:///optuna.db")
    return result, study, target


FRESH = """
import json, sys
sys.modules["hpo"] = None  # serving the model must not need hpo: importing it now fails
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
rows = pd.read_csv(sys.argv[3]).drop(columns=[sys.argv[4]])
out = model.predict(rows)
inputs = [c.name for c in model.metadata.get_input_schema().inputs]
print(json.dumps({"predictions": list(out), "inputs": inputs}))
"""


def _fresh_predictions(mlflow_uri, uri, data, target):
    """Predictions of the logged model in a new Python process that never imports hpo."""
    done = subprocess.run(
        [sys.executable, "-c", FRESH, mlflow_uri, uri, str(data), target],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd="/",
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_csv_studys_best_model_takes_raw_rows_and_returns_its_string_labels(workdir, mlflow_uri):
    result, study, target = _table_study(workdir, mlflow_uri, regression=False)
    uri = study.user_attrs["model_uri"]
    parent = MlflowClient(mlflow_uri).get_run(result.parent_run_id)
    assert parent.data.tags["hpo.model_uri"] == uri

    got = _fresh_predictions(mlflow_uri, uri, workdir / "test.csv", target)
    truth = pd.read_csv(workdir / "test.csv")[target].tolist()
    assert set(got["predictions"]) <= {"setosa", "versicolor", "virginica"}
    assert got["inputs"] == [c for c in pd.read_csv(workdir / "test.csv").columns if c != target]
    hits = sum(p == t for p, t in zip(got["predictions"], truth, strict=True))
    # The study's own test evaluation and the deployed model agree exactly.
    assert hits / len(truth) == result.test_metrics["test_accuracy"]
    assert hits / len(truth) > 0.8


def test_a_regression_models_predictions_are_in_the_targets_unit(workdir, mlflow_uri):
    result, study, target = _table_study(workdir, mlflow_uri, regression=True)
    got = _fresh_predictions(
        mlflow_uri, study.user_attrs["model_uri"], workdir / "test.csv", target
    )
    truth = pd.read_csv(workdir / "test.csv")[target].to_numpy()
    predicted = np.asarray(got["predictions"])
    rmse = float(np.sqrt(np.mean((predicted - truth) ** 2)))
    assert rmse == pytest.approx(result.test_metrics["test_rmse"], rel=1e-5)
    assert 25 < predicted.mean() < 350  # disease progression's own unit, not standardised


def test_hpo_predict_writes_labels_and_probabilities_and_scores_a_target_column(
    workdir, mlflow_uri
):
    from typer.testing import CliRunner

    from hpo.cli import app

    result, study, target = _table_study(workdir, mlflow_uri, regression=False)
    runner = CliRunner()
    done = runner.invoke(
        app,
        [
            "predict",
            "deploy-cls",
            "test.csv",
            "--out",
            "predictions.csv",
            "--probabilities",
            "--tracking-uri",
            mlflow_uri,
        ],
    )
    assert done.exit_code == 0, done.output
    table = pd.read_csv(workdir / "predictions.csv")
    classes = ["setosa", "versicolor", "virginica"]
    assert list(table.columns) == ["prediction"] + [f"probability_{c}" for c in classes]
    assert np.allclose(table[[f"probability_{c}" for c in classes]].sum(axis=1), 1.0, atol=1e-5)
    assert (table["prediction"] == table.iloc[:, 1:].idxmax(axis=1).str[12:]).all()
    accuracy = result.test_metrics["test_accuracy"]
    assert f"accuracy {accuracy:.4f}" in done.output
    # the target given as class numbers (0 = setosa, ...) scores the same
    rows = pd.read_csv(workdir / "test.csv")
    rows[target] = rows[target].map(classes.index)
    rows.to_csv(workdir / "numbered.csv", index=False)
    done = runner.invoke(
        app, ["predict", "deploy-cls", "numbered.csv", "--tracking-uri", mlflow_uri]
    )
    assert done.exit_code == 0 and f"accuracy {accuracy:.4f}" in done.output, done.output

    (workdir / "bad.csv").write_text("sepal_length,site\n1.0,north\n")
    done = runner.invoke(app, ["predict", "deploy-cls", "bad.csv", "--tracking-uri", mlflow_uri])
    assert done.exit_code == 2
    assert (
        done.output.strip()
        .splitlines()[-1]
        .startswith("error: bad.csv: missing feature columns: sepal_width")
    )


def test_an_image_model_takes_raw_pixel_values(workdir, mlflow_uri):
    spec = parse_spec(
        small_spec(
            name="deploy-digits",
            search_space={"n_layers": 1, "width": 32},
            study={"n_trials": 1},
            tracking={"uri": mlflow_uri, "experiment": "deploy-digits", "log_model": "best"},
        )
    )
    study_run(spec, study_name=spec.name)
    study = optuna.load_study(study_name=spec.name, storage="sqlite:///optuna.db")
    from hpo.tracking import load_predictor

    predictor = load_predictor(study.user_attrs["model_uri"], mlflow_uri)
    data = load_data(spec)
    raw = data.raw_example  # raw validation images: pixel values 0-16
    assert raw.max() > 1 and set(np.unique(raw)) <= set(range(17))
    scaled = predictor.features(raw)
    assert np.array_equal(scaled, data.val[0][: len(raw)].numpy())  # built-in scaling, exact
    labels = predictor.predict(raw).tolist()
    assert labels == predictor.outputs(scaled).argmax(1).tolist()
    # Through MLflow's pyfunc, as users call it: integer pixels of any dtype, one image alone.
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model(study.user_attrs["model_uri"])
    for pixels in (raw.astype(np.uint8), raw.astype(np.int64), pd.DataFrame(raw)):
        assert list(model.predict(pixels)) == labels
    assert list(model.predict(raw[0].astype(np.uint8))) == labels[:1]
    # hpo predict on a CSV of pixel rows, with pandas' "0,1,2,..." header or without one
    from typer.testing import CliRunner

    from hpo.cli import app

    pd.DataFrame(raw.astype(int)).to_csv(workdir / "header.csv", index=False)
    pd.DataFrame(raw.astype(int)).to_csv(workdir / "bare.csv", index=False, header=False)
    for name in ("header.csv", "bare.csv"):
        done = CliRunner().invoke(
            app, ["predict", "deploy-digits", name, "--tracking-uri", mlflow_uri]
        )
        assert done.exit_code == 0, done.output
        assert done.output.split() == ["prediction"] + [str(label) for label in labels]
    # with a `label` column, it is scored against it (and not taken for pixels)
    truth = data.val[1][: len(raw)].numpy()
    pixels = pd.DataFrame(raw.astype(int), columns=[f"pixel{i}" for i in range(raw.shape[1])])
    pixels.assign(label=truth).to_csv(workdir / "labelled.csv", index=False)
    done = CliRunner().invoke(
        app, ["predict", "deploy-digits", "labelled.csv", "--tracking-uri", mlflow_uri]
    )
    assert done.exit_code == 0, done.output
    hits = int((np.array(labels) == truth).sum())
    assert f"against the 'label' column of labelled.csv: accuracy {hits / len(truth):.4f} (" in (
        done.output
    )


def test_text_categories_read_as_text_and_booleans_as_booleans(workdir):
    """A code such as "007" is a category, not the number 7, even in a file of predictions
    where every code looks like a number; a boolean column takes true/false, 1/0 or their
    text, and nothing else."""
    import torch

    from hpo.serving import Predictor, read_rows

    rows = pd.DataFrame(
        {
            "code": ["007", "A1", "007", "A1", "B2", "007"] * 5,
            "member": [True, False, True, True, False, False] * 5,
            "x": np.arange(30, dtype=float),
            "label": ["yes", "no", "yes", "no", "no", "yes"] * 5,
        }
    )
    rows.to_csv(workdir / "train.csv", index=False)
    spec = parse_spec(
        small_spec(
            dataset={"name": "csv", "path": str(workdir / "train.csv"), "target": "label"},
            search_space={},
        )
    )
    data = load_data(spec)
    assert [c["type"] for c in data.prep["columns"]] == ["string", "boolean", "double"]
    torch.manual_seed(0)
    predictor = Predictor(torch.nn.Linear(data.n_features, 2), data.prep)
    (workdir / "new.csv").write_text("code,member,x\n007,true,3\n007,0,4\n")
    new = read_rows(workdir / "new.csv", data.prep)
    assert new["code"].tolist() == ["007", "007"]
    X = predictor.features(new)
    i = data.prep["encoded"].index("code_007")
    present = np.float32(
        (np.float32(1) - np.float32(data.prep["shift"][i])) / data.prep["scale"][i]
    )
    assert X[:, i].tolist() == [present, present]  # the one-hot column of "007" is set
    # A category never seen in training sets none of the code's columns; a column the model
    # does not take is ignored.
    (workdir / "unseen.csv").write_text("code,member,x,note\nZ9,true,3,hello\n")
    X = predictor.features(read_rows(workdir / "unseen.csv", data.prep))
    codes = [j for j, name in enumerate(data.prep["encoded"]) if name.startswith("code_")]
    absent = [
        np.float32((np.float32(0) - np.float32(data.prep["shift"][j])) / data.prep["scale"][j])
        for j in codes
    ]
    assert X.shape == (1, data.n_features) and X[0, codes].tolist() == absent
    (workdir / "bad.csv").write_text("code,member,x\nA1,maybe,3\n")
    with pytest.raises(ValueError, match="column 'member', row 0: 'maybe' is not true or false"):
        predictor.features(read_rows(workdir / "bad.csv", data.prep))


def test_mlflow_models_serve_answers_a_request(workdir, mlflow_uri):
    result, study, target = _table_study(workdir, mlflow_uri, regression=False)
    uri = study.user_attrs["model_uri"]
    rows = pd.read_csv(workdir / "test.csv").drop(columns=[target]).head(5)
    port = _free_port()
    # mlflow starts `uvicorn` by name: the environment's bin folder is on PATH, as when it
    # is activated.
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip

    def answers():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                return r.status == 200
        except OSError:
            assert server.poll() is None, "mlflow models serve exited"
            return False

    try:
        wait_for(answers, "mlflow models serve answering /ping", limit=300, every=0.5)
        body = json.dumps({"dataframe_split": rows.to_dict(orient="split")}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            served = json.loads(r.read())["predictions"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    from hpo.tracking import load_predictor

    local = load_predictor(uri, mlflow_uri).predict(rows).tolist()
    assert served == local
    assert set(served) <= {"setosa", "versicolor", "virginica"}
