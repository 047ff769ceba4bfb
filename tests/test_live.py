"""What a user sees while a study runs: each epoch in MLflow as it ends, and the terminal's
progress."""

from __future__ import annotations

import math
import signal

import optuna
from conftest import hpo_process, small_spec, study_run, wait_for, write_spec
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
        assert len(steps) <= reported  # nothing logged that Optuna has not heard of

        # Epochs go out as they end, or (epochs shorter than a second) at most FLUSH_S later
        # in one call: the curve keeps growing while the trial trains, not only at its end.
        def grown():
            later = client.get_metric_history(run_id, "val_loss")
            still = running_trial()
            return len(later) > len(steps) and still is not None and still.number == trial_no

        trial_no = running_trial().number
        wait_for(grown, "the running curve to grow", 300)
        assert steps == list(range(1, len(steps) + 1))
        assert all(math.isfinite(m.value) and m.value > 0 for m in curve)
        assert len(client.get_metric_history(run_id, "train_accuracy")) >= len(curve)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out


def test_on_a_terminal_the_display_shows_each_running_trials_epoch_and_bar(workdir, mlflow_uri):
    import io
    import re

    from rich.console import Console

    from hpo.config import parse_spec
    from hpo.progress import StudyDisplay

    spec = parse_spec(
        small_spec(
            training={"max_epochs": 6, "early_stopping": {"patience": 6}},
            study={"n_trials": 4, "fused_trials": 2},
            tracking={"uri": mlflow_uri, "experiment": "display"},
        )
    )
    out = io.StringIO()
    display = StudyDisplay("val_accuracy", Console(file=out, force_terminal=True, width=120))
    real_epoch = display.on_epoch

    def on_epoch(e):  # draw the panel after each epoch, as the live refresh would
        real_epoch(e)
        display.console.print(display)

    with display:
        result = study_run(
            spec,
            on_start=display.on_start,
            on_epoch=on_epoch,
            on_trial_end=display.on_trial_end,
        )
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert display.live
    # A fused pair trains at once: the panel shows both, each at its epoch, with a bar.
    assert re.search(r"\| 2 training", text)
    for number in (0, 1):
        assert re.search(rf"trial {number}\s+epoch 6/6\s+━+\s+val_accuracy 0\.\d{{4}}", text)
    assert "4/4 trials done" in text
    best = f"best val_accuracy {result.best_value:.4f} (#{result.best_number})"
    assert best in text
    assert len(re.findall(r"\[\d/4\] trial \d", text)) == 4


def test_hpo_run_draws_the_live_panel_on_a_terminal_and_plain_lines_into_a_pipe(workdir):
    import os
    import pty
    import subprocess
    import sys

    spec = small_spec(training={"max_epochs": 4, "early_stopping": {"patience": 4}})
    path = write_spec(workdir, spec)
    env = dict(os.environ, COLUMNS="120", TERM="xterm-256color")
    env.pop("MLFLOW_TRACKING_URI", None)
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo", "run", str(path)],
        cwd=workdir,
        env=env,
        stdin=child,
        stdout=child,
        stderr=child,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    os.close(main)
    tty = b"".join(chunks).decode(errors="replace")
    assert "trials done" in tty and "epoch 1/4" in tty and "\x1b[" in tty
    assert "[3/3] trial" in tty

    piped = subprocess.run(
        [sys.executable, "-m", "hpo", "run", str(path), "--n-trials", "4"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert piped.returncode == 0, piped.stderr
    assert "[4/4] trial 3" in piped.stdout
    assert "trials done" not in piped.stdout and "\x1b[" not in piped.stdout


def test_the_panel_of_a_resumed_study_shows_its_stored_best_from_the_start(workdir, mlflow_uri):
    import io

    from rich.console import Console

    from hpo.config import parse_spec
    from hpo.progress import StudyDisplay

    spec = small_spec(name="resumed", study={"n_trials": 2}, tracking={"uri": mlflow_uri})
    first = study_run(parse_spec(spec))
    spec["study"]["n_trials"] = 3
    out = io.StringIO()
    display = StudyDisplay("val_accuracy", Console(file=out, force_terminal=True, width=120))
    seen = []

    def on_start(info):  # the panel as drawn before the first new trial ends
        display.on_start(info)
        display.console.print(display)
        seen.append(out.getvalue())

    study_run(parse_spec(spec), on_start=on_start)
    assert "2/3 trials done" in seen[0] and "best -" not in seen[0]
    assert f"best val_accuracy {first.best_value:.4f} (#{first.best_number})" in seen[0]
