"""A database or tracking server that goes away mid-study, against real servers: a restart is
waited for; one gone for longer than --retry-for stops the run cleanly, and a rerun continues."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from pathlib import Path

import optuna
import psycopg
import pytest
import sqlalchemy
import sqlalchemy.exc
from conftest import (
    PG_PASSWORD,
    MlflowServer,
    hpo_process,
    http_server,
    small_spec,
    tmpfs,
    wait_for,
    write_spec,
)
from mlflow import MlflowClient
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hpo.outage import Retry, ServerLost, stop_signals_between_calls
from hpo.outcomes import count_finished, was_interrupted
from hpo.storage import open_storage

# Trials of a second or more (100 epochs, no early stop), so a server can be stopped while one
# is training, whatever the speed of the machine: the tests wait for one to be 1 to 50 epochs
# in (a state, not a time), which leaves 50 at least to notice the fault in.
LONG = {"max_epochs": 100, "early_stopping": {"patience": 100}}
RUNNING_SQL = (
    "SELECT count(*) FROM trials t JOIN trial_intermediate_values v ON v.trial_id = t.trial_id"
    " WHERE t.state = 'RUNNING' GROUP BY t.trial_id"
)


class Output:
    """A process's output, read line by line in a thread, so a test can wait for a line."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self._thread.join(timeout=60)
        return code, "".join(self.lines)


def _epochs_of_running_trial_pg(url: str) -> int:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            rows = conn.execute(RUNNING_SQL).fetchall()
    except psycopg.Error:  # no tables yet
        return 0
    return rows[0][0] if len(rows) == 1 else 0


def _epochs_of_running_trial_sqlite(db) -> int:
    try:
        with sqlite3.connect(db) as con:
            rows = con.execute(RUNNING_SQL).fetchall()
    except sqlite3.OperationalError:  # no tables yet
        return 0
    return rows[0][0] if len(rows) == 1 else 0


def test_a_database_restart_mid_study_is_waited_for(tmp_path, own_postgres):
    storage = own_postgres.create_database("restart")
    path = write_spec(tmp_path, small_spec(name="restart", study={"n_trials": 1}, training=LONG))
    proc = hpo_process(["run", path, "--storage", storage, "--retry-for", 600], tmp_path)
    out = Output(proc)
    # one trial a few epochs into its 100 (a state, not a number of seconds)
    wait_for(
        lambda: 1 <= _epochs_of_running_trial_pg(storage) <= 50, "a trial training", process=proc
    )
    own_postgres.stop()  # fast: every open connection is cut, as in a restart or failover
    wait_for(lambda: out.has("unreachable: retrying for up to 600 s"), "the outage noticed")
    own_postgres.start()
    code, text = out.finish()
    assert code == 0, text
    assert "Traceback" not in text and PG_PASSWORD not in text
    assert "warning: Optuna storage postgresql://hpo:***@127.0.0.1:" in text
    assert "back after" in text
    study = optuna.load_study(study_name="restart", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE]  # the trial went on training
    assert len(study.trials[0].intermediate_values) == 100
    assert study.user_attrs["test_metrics"]["test_accuracy"] > 0.8


def test_a_database_gone_for_good_stops_the_run_and_a_rerun_continues(tmp_path, own_postgres):
    storage = own_postgres.create_database("gone")
    path = write_spec(tmp_path, small_spec(name="gone", study={"n_trials": 1}, training=LONG))
    args = ["run", path, "--storage", storage, "--retry-for", 2]
    proc = hpo_process(args, tmp_path)
    out = Output(proc)
    wait_for(
        lambda: 1 <= _epochs_of_running_trial_pg(storage) <= 50, "a trial training", process=proc
    )
    own_postgres.stop()
    code, text = out.finish()
    assert code == 1, text
    assert "Traceback" not in text and PG_PASSWORD not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: Optuna storage postgresql://hpo:***@127.0.0.1:"), text
    assert "unreachable for" in last and "run the same command again" in last

    own_postgres.start()
    study = optuna.load_study(study_name="gone", storage=storage)
    [cut] = study.get_trials(states=(TrialState.RUNNING,))  # its storage was away: not marked
    rerun = hpo_process(["run", path, "--storage", storage], tmp_path)
    code, text = Output(rerun).finish()
    assert code == 0, text
    study = optuna.load_study(study_name="gone", storage=storage)
    cut = study.trials[cut.number]
    # the rerun sees at once that the process which ran it is gone, and runs it again
    assert cut.state == TrialState.FAIL and was_interrupted(cut) and "lost" in cut.user_attrs
    again = [t for t in study.trials if t.user_attrs.get("retry_of") == cut.number]
    assert len(again) == 1 and again[0].params == cut.params
    assert again[0].state == TrialState.COMPLETE
    assert count_finished(study) == 1
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


def _kill_the_tracking_server_mid_trial(
    tmp_path, server: MlflowServer, name: str, retry_for: int
) -> tuple[Output, Path, Path]:
    """`hpo run` of one long trial tracked on `server`, which is killed a few epochs in (a
    state, not a number of seconds); its output, spec and Optuna database."""
    path = write_spec(tmp_path, small_spec(name=name, study={"n_trials": 1}, training=LONG))
    args = ["run", path, "--tracking-uri", server.url, "--retry-for", retry_for]
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    out = Output(hpo_process(args, tmp_path, env=quick))
    db = tmp_path / "optuna.db"
    wait_for(lambda: 1 <= _epochs_of_running_trial_sqlite(db) <= 50, "a trial training")
    server.kill(9)
    return out, path, db


def test_a_tracking_server_gone_for_good_stops_the_run_and_a_rerun_closes_its_runs(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    try:
        out, path, db = _kill_the_tracking_server_mid_trial(tmp_path, server, "lost-tracking", 2)
        code, text = out.finish()
        assert code == 1, text
        assert "Traceback" not in text
        last = text.strip().splitlines()[-1]
        assert last.startswith(f"error: tracking server {server.url} unreachable for"), text

        # the storage was there: the trial is marked interrupted and queued to run again
        study = optuna.load_study(study_name="lost-tracking", storage=f"sqlite:///{db}")
        [cut] = [t for t in study.trials if t.state == TrialState.FAIL]
        assert was_interrupted(cut) and cut.user_attrs["interrupted"] is True
        [queued] = study.get_trials(states=(TrialState.WAITING,))
        assert queued.user_attrs["retry_of"] == cut.number

        server.start()
        code, text = Output(
            hpo_process(["run", path, "--tracking-uri", server.url], tmp_path)
        ).finish()
        assert code == 0, text
        study = optuna.load_study(study_name="lost-tracking", storage=f"sqlite:///{db}")
        assert count_finished(study) == 1
        assert study.trials[queued.number].params == cut.params
        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name("lost-tracking")
        runs = client.search_runs([exp.experiment_id])
        children = {r.data.tags.get("hpo.trial_number"): r for r in runs if r.data.tags.get(
            "mlflow.parentRunId")}  # fmt: skip
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert children[str(cut.number)].info.status == "KILLED"  # closed by the rerun
        assert len([r for r in runs if r.info.status == "FINISHED"]) == 2  # the trial + parent
    finally:
        server.kill()


def test_a_tracking_server_restart_mid_study_loses_no_epoch(tmp_path):
    """The tracking server killed while a trial trains and started again within --retry-for:
    the epochs that waited to be sent meanwhile (hpo sends a trial's fast epochs about once a
    second) go out once it is back, and the trial's curve in MLflow is every epoch Optuna
    heard of."""
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    try:
        out, _, db = _kill_the_tracking_server_mid_trial(tmp_path, server, "restart-tracking", 600)
        wait_for(lambda: out.has("unreachable: retrying for up to 600 s"), "the outage noticed")
        server.start()
        code, text = out.finish()
        assert code == 0, text
        assert "back after" in text
        study = optuna.load_study(study_name="restart-tracking", storage=f"sqlite:///{db}")
        [trial] = study.trials
        assert trial.state == TrialState.COMPLETE and len(trial.intermediate_values) == 100
        client = MlflowClient(server.url)
        curve = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_loss")
        assert [m.step for m in curve] == list(range(1, 101))
    finally:
        server.kill()


def test_retry_waits_out_a_lost_connection_but_not_a_bad_request():
    def refused():
        return sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("down"))

    calls, heard = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise refused()
        return "answer"

    url = "postgresql://u:secret@h/db"
    retry = Retry("Optuna storage", url, 600, heard.append)
    assert retry(flaky) == "answer" and len(calls) == 3
    assert (
        heard[0] == "Optuna storage postgresql://u:***@h/db unreachable: retrying for up to 600 s"
    )
    assert heard[1].startswith("Optuna storage postgresql://u:***@h/db back after")
    assert len(heard) == 2

    def bad_request():
        calls.append(1)
        raise ValueError("no such column")

    with pytest.raises(ValueError):  # not a lost connection: not waited for
        retry(bad_request)
    assert len(calls) == 4

    def gone():
        calls.append(1)
        raise refused()

    with pytest.raises(ServerLost) as e:
        Retry("Optuna storage", url, 0)(gone)
    assert len(calls) == 5
    assert str(e.value) == (
        "Optuna storage postgresql://u:***@h/db unreachable for 0 s (ConnectionRefusedError: "
        "down); stopped"
    )


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB file system of its own, so that the disk can really fill up."""
    with tmpfs(tmp_path / "disk", "64m") as folder:
        yield folder


def _fill(folder) -> None:
    """Write zeros until the file system says it is full."""
    chunk = b"\0" * (1 << 20)
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == 28  # ENOSPC
    with open(folder / "filler", "ab", buffering=0) as f:  # the last few bytes too
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


def test_a_full_disk_stops_the_run_cleanly_and_a_rerun_continues(small_disk):
    import torch

    spec = small_spec(
        name="full",
        study={"n_trials": 1},
        # 200 epochs: 150 at least to make the writes that need the full disk's new blocks
        training={"max_epochs": 200, "early_stopping": {"patience": 200}},
        tracking={"log_model": "all"},
    )
    path = write_spec(small_disk, spec)
    proc = hpo_process(["run", path], small_disk)
    out = Output(proc)
    db = small_disk / "optuna.db"
    wait_for(lambda: 1 <= _epochs_of_running_trial_sqlite(db) <= 50, "a trial training")
    _fill(small_disk)
    code, text = out.finish()
    assert code == 1, text
    assert "Traceback" not in text and "ERROR" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: no space left on device"), text
    assert "stopped; free some space (or fix the disk), then run the same command again" in last
    for weights in small_disk.rglob("weights.pt"):  # any checkpoint there is whole
        torch.load(weights, weights_only=True)

    (small_disk / "filler").unlink()
    code, text = Output(hpo_process(["run", path], small_disk)).finish()
    assert code == 0, text
    study = optuna.load_study(study_name="full", storage=f"sqlite:///{db}")
    assert count_finished(study) == 1
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    cut = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(cut) == 1 and was_interrupted(cut[0])
    client = MlflowClient(f"sqlite:///{small_disk / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert sorted(r.info.status for r in runs).count("RUNNING") == 0
    assert sum(r.data.tags.get("hpo.state") == "COMPLETE" for r in runs) == 1


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_removed_not_left_half_written(small_disk):
    import torch

    from hpo.outage import DiskFault
    from hpo.tracking import MlflowTracker

    tracker = MlflowTracker(f"sqlite:///{small_disk / 'mlflow.db'}", "full-checkpoint")
    tracker.open_parent(None, "study", {}, {})
    run_id = tracker.start_trial(0)
    folder = small_disk / "mlruns" / "full-checkpoint"
    _fill(small_disk)
    with pytest.raises(DiskFault) as e:
        tracker.save_checkpoint(run_id, {"w": torch.zeros(2_000_000)}, {"widths": [8]})
    assert str(e.value).startswith("no space left on device")
    assert f"writing the checkpoint of run {run_id}; stopped" in str(e.value)
    assert list(folder.rglob("checkpoint")) == [] and list(folder.rglob("weights.pt")) == []


def _ctrl_c_inside_the_next_write(storage, times: int, at: str = "before_cursor_execute"):
    """Send this process `times` SIGINTs from inside the storage's next write, where a user's
    Ctrl-C lands when it comes mid-write: as a statement runs, or just before the commit."""
    left = [times]

    def ctrl_c(*args):
        while left[0]:
            left[0] -= 1
            os.kill(os.getpid(), signal.SIGINT)

    sqlalchemy.event.listen(storage._rdb.engine, at, ctrl_c)


def _sqlite_storage_with_a_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, retry=Retry("Optuna storage", url, 0.0))
    trial_id = storage.create_new_trial(storage.create_new_study([StudyDirection.MAXIMIZE], "s"))
    return storage, trial_id


def _attrs_and_no_lock(db) -> dict:
    """The trials' user attributes, read by a writer that will not wait for a lock."""
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")  # "database is locked" if a write was left holding it
        rows = con.execute("SELECT key, value_json FROM trial_user_attributes").fetchall()
        con.execute("ROLLBACK")
        return dict(rows)
    finally:
        con.close()


# Cut short before its commit, a write used to leave the database locked for every later one:
# the clean-up after Ctrl-C then waited a minute a write (SQLite's busy timeout).
@pytest.mark.parametrize("at", ["before_cursor_execute", "commit"])
def test_ctrl_c_during_a_storage_write_stops_after_it_and_leaves_no_lock(tmp_path, at):
    storage, trial_id = _sqlite_storage_with_a_trial(tmp_path)
    before = signal.getsignal(signal.SIGINT)
    with stop_signals_between_calls():
        _ctrl_c_inside_the_next_write(storage, times=1, at=at)
        with pytest.raises(KeyboardInterrupt):
            storage.set_trial_user_attrs(trial_id, {"a": 1, "b": 2})
    # The write went through whole, then Ctrl-C stopped the caller; the handler is put back.
    assert _attrs_and_no_lock(tmp_path / "optuna.db") == {"a": "1", "b": "2"}
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("at", ["before_cursor_execute", "commit"])
def test_a_second_ctrl_c_during_a_storage_write_does_not_wait_for_it(tmp_path, at):
    storage, trial_id = _sqlite_storage_with_a_trial(tmp_path)
    with stop_signals_between_calls():
        _ctrl_c_inside_the_next_write(storage, times=2, at=at)
        with pytest.raises(KeyboardInterrupt):
            storage.set_trial_user_attrs(trial_id, {"a": 1})
        storage.remove_session()  # as the driver does after a Ctrl-C: no lock is left behind
    assert _attrs_and_no_lock(tmp_path / "optuna.db") == {}


def test_a_stop_signal_ignored_from_the_start_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `hpo run &` in a script
    try:
        with stop_signals_between_calls():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_server_gone_in_the_middle_of_its_answer_is_a_lost_connection(monkeypatch):
    """A tracking server killed while it sends an answer: MLflow raises 'Connection broken:
    IncompleteRead(17 bytes read, 983 more expected)'. That is waited for like a refused
    connection (it came out as a traceback), not taken for a bad request."""

    def cut_short(request):
        request.rfile.read(int(request.headers.get("Content-Length") or 0))
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", "1000")
        request.end_headers()
        request.wfile.write(b'{"experiments": [')  # and no more: the connection closes
        request.close_connection = True

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with http_server(cut_short) as url:
        with pytest.raises(ServerLost) as e:
            Retry("tracking server", url, 0)(MlflowClient(url).search_experiments)
    assert "IncompleteRead" in str(e.value)
