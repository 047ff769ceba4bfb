"""What a user reads must be right: fit labels in a real study, the run's first lines and its
summary, the report's charts and advice, the compare page, help texts."""

from __future__ import annotations

import optuna
from conftest import small_spec, write_spec
from typer.testing import CliRunner

from hpo.cli import app

runner = CliRunner()

# make run's trial 23, trained at batch size 64: its training loss climbs within 8 epochs
UNSTABLE = {
    "n_layers": 3,
    "width": 206,
    "activation": "gelu",
    "dropout": 0.49,
    "optimizer": "adam",
    "lr": 0.025,
    "batch_size": 64,
}


def test_a_study_labels_a_too_large_learning_rate_unstable_everywhere(workdir):
    spec = small_spec(
        name="unst",
        search_space=UNSTABLE,
        training={"max_epochs": 8, "early_stopping": {"patience": 8}},
        study={"n_trials": 1},
    )
    result = runner.invoke(app, ["run", str(write_spec(workdir, spec))])
    assert result.exit_code == 0, result.output
    assert "fit diagnosis: 0 good, 0 overfit, 0 underfit, 1 unstable (#0)" in result.output
    [trial] = optuna.load_study(study_name="unst", storage="sqlite:///optuna.db").trials
    assert trial.user_attrs["fit"] == "unstable"
    evidence = trial.user_attrs["fit_evidence"]
    assert evidence.startswith("train_loss ") and "(lr 0.025 here)" in evidence
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("unst").experiment_id], "tags.hpo.trial_number = '0'"
    )
    assert run.data.tags["hpo.fit"] == "unstable"
