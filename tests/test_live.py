"""What a user sees while a study runs: each epoch in MLflow as it ends, and the terminal's
progress."""

from __future__ import annotations

import math
import signal

import optuna
from conftest import hpo_process, small_spec, wait_for, write_spec
from mlflow import MlflowClient
from optuna.trial import TrialState


def test_a_running_trials_curve_is_in_mlflow_while_it_trains(workdir, mlflow_uri):
    endless = {"max_epochs": 100_000, "early_stopping": {"patience": 100_000}}
    spec = small_spec(
        search_space={"n_layers": 1, "width": 32, "lr": 1e-3},
        training=endless,
        study={"n_trials": 1},
        tracking={"uri": mlflow_uri, "experiment": "live-curve"},
    )
    proc = hpo_process(["run", write_spec(workdir, spec)], workdir)
    client = MlflowClient(mlflow_uri)

    def running_trial():
        try:
            study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
        except KeyError:
            return None
        return next(iter(study.get_trials(states=(TrialState.RUNNING,))), None)

    def curve_of_a_running_trial():
        trial = running_trial()
        if trial is None or "mlflow_run_id" not in trial.user_attrs:
            return None
        run_id = trial.user_attrs["mlflow_run_id"]
        reported = max(trial.intermediate_values, default=0)  # epochs Optuna has heard of
        curve = client.get_metric_history(run_id, "val_loss")
        still = running_trial()  # read after the curve: the trial was running all along
        if len(curve) >= 3 and still is not None and still.number == trial.number:
            return run_id, curve, reported
        return None

    try:
        run_id, curve, reported = wait_for(curve_of_a_running_trial, "a running curve", 300)
        assert client.get_run(run_id).info.status == "RUNNING"
        steps = [m.step for m in curve]
        # Each epoch is logged as it is reported to Optuna, not in batches seconds later: the
        # curve read after Optuna's epochs lacks at most the one being logged then.
        assert len(steps) >= reported - 1, (len(steps), reported)
        for _ in range(20):
            trial = running_trial()
            reported = max(trial.intermediate_values)
            logged = len(client.get_metric_history(run_id, "val_loss"))
            assert logged >= reported - 1, (logged, reported)
        assert steps == list(range(1, len(steps) + 1))
        assert all(math.isfinite(m.value) and m.value > 0 for m in curve)
        assert len(client.get_metric_history(run_id, "train_accuracy")) >= len(curve)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
