"""Tracker against a real MLflow store: nested runs, batching, checkpoints, stale runs."""

from __future__ import annotations

import base64

import pytest
import torch
from conftest import http_server, small_spec, wait_for
from mlflow import MlflowClient

from hpo.config import SpecError
from hpo.tracking import FLUSH_S, MlflowTracker, resolve_uri


def test_uri_precedence_is_command_line_then_environment_then_spec(workdir, monkeypatch):
    from hpo.config import parse_spec
    from hpo.preflight import resolve_storage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    spec = parse_spec(
        small_spec(study={"storage": "sqlite:///spec.db"}, tracking={"uri": "sqlite:///s.db"})
    )
    assert resolve_uri("sqlite:///s.db", None) == "sqlite:///s.db"
    assert resolve_storage(spec) == "sqlite:///spec.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    monkeypatch.setenv("HPO_STORAGE", "sqlite:///env.db")
    assert resolve_uri("sqlite:///s.db", None) == "sqlite:///env.db"
    assert resolve_storage(spec) == "sqlite:///env.db"
    assert resolve_uri("sqlite:///s.db", "sqlite:///cli.db") == "sqlite:///cli.db"
    assert resolve_storage(spec, "sqlite:///cli.db") == "sqlite:///cli.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri(None, None) == f"sqlite:///{workdir / 'mlflow.db'}"


def test_trial_run_nests_with_its_epochs_sent_at_most_a_second_late(mlflow_uri, monkeypatch):
    """An epoch goes out at once when the run's last send is FLUSH_S old; faster ones wait for
    the next send (`flush(due_only=True)`, which the driver calls as it waits, or the trial's
    end), in calls of at most 1,000 metrics. The clock is the tracker's, moved by the test."""
    from hpo import tracking

    now = [1000.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: now[0])
    tracker = MlflowTracker(mlflow_uri, "tracking-batches")
    parent = tracker.open_parent(None, "study", {"dataset": "digits"}, {"hpo.study": "s"})
    run_id = tracker.start_trial(7)
    client = MlflowClient(mlflow_uri)

    def logged(key="val_loss"):
        return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]

    tracker.log_epoch(run_id, 1, {"train_loss": 1.0, "val_loss": 2.0, "lr": 0.1})
    assert logged() == [(1, 2.0)]  # the first epoch: at once
    for e in (2, 3):
        tracker.log_epoch(run_id, e, {"train_loss": 1.0 / e, "val_loss": 2.0 / e, "lr": 0.1})
    assert len(logged()) == 1  # within a second of the last send: they wait
    tracker.flush(due_only=True)
    assert len(logged()) == 1
    now[0] += FLUSH_S
    tracker.flush(due_only=True)  # a second on: sent
    assert [s for s, _ in logged()] == [1, 2, 3] and len(logged("train_loss")) == 3
    for e in range(4, 401):  # 1,191 metrics wait: more than one call's worth
        tracker.log_epoch(run_id, e, {"train_loss": 1.0 / e, "val_loss": 2.0 / e, "lr": 0.1})
    assert len(logged()) == 3
    tracker.end_trial(run_id, "PRUNED", {"lr": 0.1, "widths": [8, 4]}, {"best_epoch": 3})
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["hpo.trial_number"] == "7" and run.data.tags["hpo.state"] == "PRUNED"
    assert run.info.status == "FINISHED" and run.data.params["widths"] == "[8, 4]"
    curve = client.get_metric_history(run_id, "val_loss")
    assert len(curve) == 400 and curve[-1].step == 400 and curve[-1].value == 2.0 / 400
    assert [m.step for m in curve] == list(range(1, 401))
    assert run.data.metrics["best_epoch"] == 3


def test_epochs_that_wait_are_sent_when_a_run_is_closed_and_when_the_study_ends(mlflow_uri):
    tracker = MlflowTracker(mlflow_uri, "tracking-close")
    tracker.open_parent(None, "study", {}, {})
    client = MlflowClient(mlflow_uri)
    stale, running = tracker.start_trial(1), tracker.start_trial(2)
    for run_id in (stale, running):
        for e in (1, 2, 3):  # the first at once, the others wait
            tracker.log_epoch(run_id, e, {"val_loss": 1.0 / e})
    tracker.close_run(stale)  # a trial failed as stale: its run closed with what it had
    assert len(client.get_metric_history(stale, "val_loss")) == 3
    assert len(client.get_metric_history(running, "val_loss")) == 1
    tracker.close_parent("KILLED")  # the study's end (Ctrl-C, a lost server): all of it
    assert len(client.get_metric_history(running, "val_loss")) == 3


def test_the_machine_is_sampled_into_the_study_run_unless_told_not_to(mlflow_uri, monkeypatch):
    """MLflow's system metrics on the parent run while the study is driven: at least the
    sample `close_parent` sends (CPU and memory here; GPU use where NVML finds one)."""
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING")  # off for the other tests
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    client = MlflowClient(mlflow_uri)
    tracker = MlflowTracker(mlflow_uri, "tracking-system")
    watched = tracker.open_parent(None, "study", {}, {})
    samples = lambda run_id: client.get_metric_history(  # noqa: E731
        run_id, "system/cpu_utilization_percentage"
    )
    wait_for(lambda: samples(watched), "a sample of the machine")
    tracker.close_parent()
    assert all(0 <= m.value <= 100 for m in samples(watched))
    memory = client.get_metric_history(watched, "system/system_memory_usage_megabytes")
    assert memory and memory[0].value > 0
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    tracker = MlflowTracker(mlflow_uri, "tracking-system")
    quiet = tracker.open_parent(None, "quiet", {}, {})
    tracker.close_parent()
    assert not [k for k in client.get_run(quiet).data.metrics if k.startswith("system/")]


def test_joining_a_parent_leaves_live_trials_alone_and_closes_only_dead_ones(mlflow_uri):
    tracker = MlflowTracker(mlflow_uri, "tracking-stale")
    parent = tracker.open_parent(None, "study", {}, {})
    live = tracker.start_trial(0)  # another process is still training it
    dead = tracker.start_trial(1)  # its process died: the heartbeat check says so
    tracker.close_parent("KILLED")
    again = MlflowTracker(mlflow_uri, "tracking-stale")
    assert again.open_parent(parent, "study", {}, {}) == parent
    client = MlflowClient(mlflow_uri)
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(parent).info.status == "RUNNING"
    again.close_run(dead)
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(dead).data.tags["hpo.state"] == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"
    again.close_parent("FINISHED")
    assert client.get_run(parent).info.status == "FINISHED"


def test_checkpoint_roundtrip(mlflow_uri):
    tracker = MlflowTracker(mlflow_uri, "tracking-ckpt")
    tracker.open_parent(None, "study", {}, {})
    run_id = tracker.start_trial(0)
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    tracker.save_checkpoint(run_id, state, {"widths": [3]})
    loaded = tracker.load_checkpoint(run_id)
    assert torch.equal(loaded["w"], state["w"])


def test_a_server_url_with_a_user_and_password_is_sent_as_basic_auth(monkeypatch):
    """`hpo run --tracking-uri http://user:pass@host` first asks the server's /health, then
    MLflow's client talks to it: both send the user and password as HTTP basic auth (which a
    server behind a proxy or MLflow's basic-auth app checks); a refusal is told without the
    password."""
    expected = "Basic " + base64.b64encode(b"alice:p@ss:word").decode()
    heard = []

    def answer(request):
        heard.append((request.path, request.headers.get("Authorization")))
        request.rfile.read(int(request.headers.get("Content-Length") or 0))
        if request.path.startswith("/elsewhere"):  # a redirect, to be refused, not followed
            request.send_response(302)
            request.send_header("Location", "http://127.0.0.1:1/health")
            request.end_headers()
            return
        if request.headers.get("Authorization") != expected:
            request.send_response(401)
            request.end_headers()
            return
        body = b"{}" if request.path == "/health" else b'{"experiments": []}'
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    with http_server(answer) as url:
        host = url.removeprefix("http://")
        uri = f"http://alice:p%40ss:word@{host}/"
        MlflowTracker(uri, "x").check()
        assert heard == [("/health", expected)]
        assert MlflowClient(uri).search_experiments() == []
        assert heard[1] == ("/api/2.0/mlflow/experiments/search", expected)
        with pytest.raises(SpecError) as e:
            MlflowTracker(f"http://alice:wrong-Secret@{host}", "x").check()
        [line] = e.value.problems
        assert line.startswith(
            f"tracking.uri: no MLflow server answers at http://alice:***@{host}: "
        )
        assert "401" in line and "wrong-Secret" not in line
        heard.clear()
        with pytest.raises(SpecError) as e:
            MlflowTracker(f"http://alice:p%40ss:word@{host}/elsewhere", "x").check()
        assert "302" in e.value.problems[0] and len(heard) == 1  # not followed
        # MLflow's own variables, for a URL without a user
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "p@ss:word")
        MlflowTracker(url, "x").check()
        assert heard[-1] == ("/health", expected)


def test_a_folder_store_is_refused_in_one_line_unless_mlflow_is_told_to_allow_it(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in (str(tmp_path / "mlruns"), f"file://{tmp_path / 'mlruns'}"):
        with pytest.raises(SpecError) as e:
            MlflowTracker(uri, "x").check()
        [line] = e.value.problems
        assert line.startswith(f"tracking.uri: {uri!r} is a folder store, which MLflow 3 no")
        assert "MLFLOW_ALLOW_FILE_STORE=true" in line
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # then MLflow opens it, and so does hpo
    tracker = MlflowTracker(str(tmp_path / "mlruns"), "folder")
    tracker.check()
    tracker.open()
    assert MlflowClient(str(tmp_path / "mlruns")).get_experiment_by_name("folder") is not None
