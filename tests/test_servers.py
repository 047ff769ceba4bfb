"""`hpo ui` and `hpo dashboard` as real processes on real stores: what they serve, the study's
runs view in headless Chromium, and that a signal to hpo stops every process of the server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import _free_port, chromium, hpo_process, small_spec, study_run, wait_for

from hpo.config import parse_spec

STUDY = "served"


# ---------------------------------------------------------------- helpers


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process, read from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(name)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def _tree(pid: int) -> tuple[set[int], set[int]]:
    """The running descendants of `pid`, and the sessions they are in (other than pid's)."""
    table = _processes()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, state) in table.items():
            if ppid == parent and child not in found and state != "Z":
                found.add(child)
                todo.append(child)
    return found, {table[p][1] for p in found} - {table[pid][1]}


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # gone since
        return ""


def _gone(pids: set[int], sessions: set[int]) -> bool:
    """No process of `pids` runs any more, nor any process of `sessions` (zombies do not run)."""
    return not any(
        state != "Z" and (pid in pids or sid in sessions)
        for pid, (_, sid, state) in _processes().items()
    )


def _kill_sessions(sessions: set[int]) -> None:
    """SIGKILL to every process of the server sessions that a test started."""
    for pid, (_, sid, state) in _processes().items():
        if sid in sessions and state != "Z":
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _answers(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class Server:
    """`python -m hpo ARGS` as a real process, its output collected by a thread."""

    def __init__(self, args, cwd, env=None):
        self.proc = hpo_process(args, cwd, env=env)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until_it_answers(self, url: str) -> str:
        def answered():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.output}")
            return _answers(url)

        return wait_for(answered, f"an answer from {url}", limit=240, every=0.2)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[set[int], int]:
        """Send `sig` to the hpo process only; (the tree's pids it had, its exit status)."""
        pids, sessions = _tree(self.proc.pid)
        assert sessions, "the server runs in a session of its own"
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        wait_for(lambda: _gone(pids, sessions), "every process of the server tree gone", 60)
        return pids, code

    def kill(self) -> None:
        """Clean-up after a failed test: the tree killed outright."""
        if self.proc.poll() is None:
            _kill_sessions(_tree(self.proc.pid)[1])
            self.proc.kill()
            self.proc.wait(timeout=30)


def _rendered_text(url: str, profile, wanted: str, tries: int = 3) -> str:
    """The text of the page at `url` once headless Chromium ran its scripts; tried again while
    `wanted` is not in it (a live page may still be fetching when the time budget ends)."""
    text = ""
    for _ in range(tries):
        dom = subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--window-size=1600,1000",
                "--virtual-time-budget=15000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
        dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
        if wanted in text:
            break
    return text


# ---------------------------------------------------------------- a study in real stores


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A finished small study: its Optuna storage and its MLflow store in one folder."""
    folder = tmp_path_factory.mktemp("served")
    spec = small_spec(
        name=STUDY,
        study={"storage": f"sqlite:///{folder / 'optuna.db'}"},
        tracking={"uri": f"sqlite:///{folder / 'mlflow.db'}"},
    )
    study_run(parse_spec(spec))
    return folder


@pytest.fixture(scope="module")
def mlflow_ui(stores, tmp_path_factory):
    """`hpo ui` (no study named: the only one) on the study's MLflow store, answering."""
    port = _free_port()
    cwd = tmp_path_factory.mktemp("ui-cwd")
    server = Server(
        ["ui", "--port", port, "--tracking-uri", f"sqlite:///{stores / 'mlflow.db'}"], cwd
    )
    server.port = port
    try:
        # where to look is printed once the server answers, so that a link opened then works
        wait_for(lambda: server.proc.poll() is not None or "MLflow UI at " in server.output,
                 "hpo ui saying where to look", limit=240, every=0.2)  # fmt: skip
        assert _answers(f"http://127.0.0.1:{port}/health") == "OK", server.output
        first = server.output.splitlines()[0]
        assert first.startswith("MLflow UI for sqlite:///") and "starting at http://" in first
        # hpo's lines only: not uvicorn's logs, its web stack's warnings or MLflow's advice to
        # use an option hpo ui does not have
        for noise in ("Warning", "INFO:", "--host 0.0.0.0", "Uvicorn"):
            assert noise not in server.output, server.output
        yield server
    finally:
        server.kill()


# One test process starts `hpo ui` on the study for all of them (see test_workers.ON_THE_SERVER).
IN_THE_UI = pytest.mark.xdist_group("hpo_ui")


def _views(output: str) -> list[str]:
    return re.findall(r"^  .*?: (http://\S+)$", output, flags=re.M)


@IN_THE_UI
def test_ui_prints_the_study_runs_view(mlflow_ui, stores):
    from mlflow import MlflowClient

    port = mlflow_ui.port
    nested, trials = _views(mlflow_ui.output)
    client = MlflowClient(f"sqlite:///{stores / 'mlflow.db'}")
    exp = client.get_experiment_by_name(STUDY)
    runs = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?"
    assert nested == runs + "workflowType=machine_learning&viewStateShareKey=hpo-runs-served"
    assert trials == runs + "workflowType=machine_learning&viewStateShareKey=hpo-trials-served"
    view = json.loads(exp.tags["mlflow.sharedViewState.hpo-trials-served"])
    assert view["orderByKey"] == "metrics.`best_val_accuracy`" and view["orderByAsc"] is False
    assert view["searchFilter"].startswith("tags.`mlflow.parentRunId` = ")
    for column in ("metrics.`best_val_accuracy`", "metrics.`test_accuracy`", "tags.`hpo.state`"):
        assert column in view["selectedColumns"]
    # the hyperparameters that vary across the trials, not the fixed ones
    trial_runs = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")
    lrs = {r.data.params["lr"] for r in trial_runs}
    assert len(trial_runs) == 3 and len(lrs) == 3 and "params.`lr`" in view["selectedColumns"]
    assert {r.data.params["batch_size"] for r in trial_runs} == {"64"}
    assert "params.`batch_size`" not in view["selectedColumns"]
    nested_view = json.loads(exp.tags["mlflow.sharedViewState.hpo-runs-served"])
    assert (
        nested_view["orderByKey"] == "attributes.start_time" and "searchFilter" not in nested_view
    )


@IN_THE_UI
def test_without_a_study_name_the_views_are_of_the_study_started_last(stores, tmp_path):
    """A second study in the same MLflow store, started after the fixture's: hpo ui without
    a name shows it; with the first study's name, the first."""
    from mlflow import MlflowClient

    from hpo.servers import mlflow_views

    uri = f"sqlite:///{stores / 'mlflow.db'}"
    spec = small_spec(
        name="later",
        study={"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "n_trials": 1},
        tracking={"uri": uri},
    )
    study_run(parse_spec(spec))
    client = MlflowClient(uri)
    later, first = (client.get_experiment_by_name(n).experiment_id for n in ("later", STUDY))
    for name, exp_id in ((None, later), ("later", later), (STUDY, first)):
        urls = [url for _, url in mlflow_views(uri, name, "http://h")]
        assert len(urls) == 2 and all(f"/#/experiments/{exp_id}/runs?" in u for u in urls), name


@pytest.mark.skipif(not chromium(), reason="chromium not installed")
@IN_THE_UI
def test_ui_views_show_the_runs_in_headless_chromium(mlflow_ui, tmp_path):
    nested, trials = _views(mlflow_ui.output)
    text = _rendered_text(nested, tmp_path / "chrome-nested", "best_val_accuracy")
    # the runs table (not the GenAI overview), the study's run, the chosen metric columns
    assert "Run Name" in text and "Token Usage" not in text, text[:2000]
    assert f" {STUDY} " in text and "best_val_accuracy" in text and "test_accuracy" in text
    text = _rendered_text(trials, tmp_path / "chrome-trials", "trial-0")
    for n in range(3):
        assert f"trial-{n}" in text, text[:2000]
    assert "best_val_accuracy" in text and "3 matching runs" in text


@IN_THE_UI
def test_sigterm_to_hpo_ui_stops_the_whole_mlflow_server_tree(mlflow_ui):
    commands = [_command(pid) for pid in _tree(mlflow_ui.proc.pid)[0]]
    # MLflow's job runner and its huey consumers (GenAI jobs) are not started
    assert not [c for c in commands if "huey" in c or "jobs" in c], commands
    pids, code = mlflow_ui.stop(signal.SIGTERM)
    assert len(pids) >= 3, pids  # mlflow ui, uvicorn and its workers at least
    assert code == 0, mlflow_ui.output[-3000:]
    assert _port_closed(mlflow_ui.port)


@IN_THE_UI
def test_ui_refuses_a_study_that_is_not_there(stores, tmp_path):
    port = _free_port()
    uri = f"sqlite:///{stores / 'mlflow.db'}"
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "ui", "absent", "--port", str(port), "--tracking-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith("error: no study or experiment 'absent' in MLflow store")
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert _port_closed(port)


# ---------------------------------------------------------------- Optuna's dashboard


@IN_THE_UI
def test_dashboard_serves_the_storage_and_sigterm_stops_it(stores, tmp_path):
    port = _free_port()
    storage = f"sqlite:///{stores / 'optuna.db'}"
    server = Server(["dashboard", "--storage", storage, "--port", port], tmp_path)
    try:
        body = server.wait_until_it_answers(f"http://127.0.0.1:{port}/api/studies")
        names = [s["study_name"] for s in json.loads(body)["study_summaries"]]
        assert names == [STUDY]
        assert f"at http://127.0.0.1:{port}/dashboard" in server.output
        assert server.output.count("\n") == 1, server.output  # hpo's one line, nothing else
        if chromium():  # the page itself, rendered
            page = f"http://127.0.0.1:{port}/dashboard"
            text = _rendered_text(page, tmp_path / "chrome", STUDY)
            assert STUDY in text and "MAXIMIZE" in text, text[:2000]
        pids, code = server.stop(signal.SIGTERM)
        assert code == 0 and pids
        assert _port_closed(port)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "chrome") == []
    finally:
        server.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_dashboard_on_the_default_or_env_storage_stops_on_ctrl_c_and_hangup(
    stores, tmp_path, monkeypatch, sig
):
    monkeypatch.delenv("HPO_STORAGE", raising=False)
    port = _free_port()
    if sig == signal.SIGINT:  # $HPO_STORAGE, read as --storage
        env = {"HPO_STORAGE": f"sqlite:///{stores / 'optuna.db'}"}
    else:  # the default: optuna.db in the working folder
        shutil.copy(stores / "optuna.db", tmp_path / "optuna.db")
        env = None
    server = Server(["dashboard", "--port", port], tmp_path, env=env)
    try:
        body = server.wait_until_it_answers(f"http://127.0.0.1:{port}/api/studies")
        assert [s["study_name"] for s in json.loads(body)["study_summaries"]] == [STUDY]
        _, code = server.stop(sig)
        assert code == 0 and _port_closed(port)
    finally:
        server.kill()


def _dashboard(args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "hpo", "dashboard", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


@pytest.mark.parametrize(
    "storage, says",
    [
        ("nosuch://db", "error: storage: cannot open 'nosuch://db'"),
        ("sqlite:///missing.db", "error: --storage: no such file: sqlite:///missing.db"),
        ("postgresql://hpo:pw-Secret-x1@127.0.0.1:1/db", "postgresql://hpo:***@127.0.0.1:1/db"),
    ],
)
def test_dashboard_refuses_a_bad_storage_in_one_line(tmp_path, storage, says):
    out = _dashboard(["--storage", storage, "--port", _free_port()], tmp_path)
    assert out.returncode == 2 and out.stdout == "", out
    assert len(out.stderr.strip().splitlines()) == 1 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "pw-Secret" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no database file created


@IN_THE_UI
def test_dashboard_refuses_a_port_in_use(stores, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _dashboard(
            ["--port", port], tmp_path, {"HPO_STORAGE": f"sqlite:///{stores}/optuna.db"}
        )
    assert (
        out.returncode == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in out.stderr
    )
    assert len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- the stopping itself

_STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignores SIGTERM: needs SIGKILL
# a grandchild that leaves the process group, and ignores SIGTERM too
subprocess.Popen([sys.executable, "-c", "import os, signal, time; os.setpgid(0, 0); "
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("ready", flush=True)
time.sleep(600)
"""


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text(_STUBBORN)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from hpo.servers import serve; "
            f"sys.exit(serve([sys.executable, {str(script)!r}], grace=1.0))",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    sessions: set[int] = set()
    try:
        assert proc.stdout.readline() == "ready\n"
        wait_for(lambda: len(_tree(proc.pid)[0]) == 2, "the server and its grandchild", 60)
        pids, sessions = _tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: _gone(pids, sessions), "the tree gone", 30)
    finally:
        proc.kill()
        _kill_sessions(sessions)  # after a failure: nothing left behind
