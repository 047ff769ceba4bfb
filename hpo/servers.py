"""Local web servers to browse studies: the MLflow UI (`hpo ui`) and Optuna's dashboard
(`hpo dashboard`).

A server runs as a child process in a session of its own: `mlflow ui` alone is a tree of
processes (uvicorn and its workers; a dozen with MLflow's job runner, if turned on). When hpo
gets SIGTERM, SIGINT (Ctrl-C) or SIGHUP, the whole tree is stopped: SIGTERM to its process
group and to any process of the tree that left the group, then SIGKILL to what is still there
after a grace period (a second signal to hpo skips the wait). Only a SIGKILL of hpo itself
leaves it behind.

`python -m hpo.servers dashboard --port N` is the dashboard's child process: it reads the
storage URL from the environment, so that a password in it never shows in the process list.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import IO, Any

HOST = "127.0.0.1"
GRACE_S = 10.0  # how long a stopped server may take to exit before it is killed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_DASHBOARD_STORAGE = "_HPO_DASHBOARD_STORAGE"  # the child's storage URL, off its command line
# The MLflow UI's own key for a view shared by a link: ?viewStateShareKey=KEY opens the runs
# table with the view (search, sort, columns) stored in the experiment tag PREFIX + KEY.
_SHARED_VIEW_TAG = "mlflow.sharedViewState."


class ServerError(Exception):
    """A server that cannot start: one line for the user (exit status 2)."""


# ------------------------------------------------------------------ running a server tree


class _Stop:
    """The stop signals hpo received while a server ran."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1


def check_port(port: int) -> None:
    """Refuse (ServerError) a port that another process holds on 127.0.0.1."""
    with socket.socket() as s:
        # As the servers do: connections of a server stopped a moment ago do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ServerError(
                f"--port {port}: cannot listen on {HOST}:{port} ({e.strerror or e}); "
                "stop what uses it or pass another --port"
            ) from None


def serve(
    cmd: Sequence[str],
    env: dict[str, str] | None = None,
    grace: float = GRACE_S,
    ready: tuple[str, Callable[[], None]] | None = None,
    output: IO[Any] | None = None,
) -> int:
    """Run the server `cmd` until it exits (its exit status is returned) or hpo gets SIGTERM,
    SIGINT or SIGHUP: then its whole process tree is stopped (see the module) and 0 returned.
    `ready`: (URL, call): the call is made once the URL answers (to print where to look only
    once there is something to see). `output`: a file for the server's own lines (its logs,
    its libraries' warnings), else they go to hpo's."""
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        # Its own session: a terminal's Ctrl-C or hang-up reaches hpo only, which stops the
        # tree as it stops for SIGTERM, in one way.
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
        )
        try:
            while not stop.count:
                try:
                    code = proc.wait(timeout=0.1 if ready is None else 0.25)
                except subprocess.TimeoutExpired:
                    if ready is not None and _answers(ready[0]):
                        ready, call = None, ready[1]
                        call()
                    continue
                stop_tree(proc, grace)  # what it may have left running
                return 128 - code if code < 0 else code  # killed by signal N: 128 + N
        except BaseException:  # hpo's own error (a closed stdout, ...): the tree goes too
            stop_tree(proc, grace)
            raise
        stop_tree(proc, grace, stop)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _answers(url: str) -> bool:
    """Whether the local server at `url` answers (asked directly: no proxy for 127.0.0.1)."""
    import http.client
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1):
            return True
    except (OSError, http.client.HTTPException):  # not listening yet, or not up as it should
        return False


def stop_tree(proc: subprocess.Popen, grace: float = GRACE_S, hurry: _Stop | None = None) -> None:
    """Stop `proc` (started with start_new_session) and every process it started: SIGTERM,
    then SIGKILL after `grace` seconds or at a further signal counted by `hurry`."""
    group = proc.pid  # a new session's leader leads its process group too
    pids = _tree({proc.pid})  # before any exits: an orphan loses its parent
    signals_before = hurry.count if hurry else 0
    _signal_tree(group, pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    killed_at = None
    while True:
        proc.poll()  # reaps the child once it exits
        pids = _tree(pids)  # and what they started meanwhile
        if not _running(group, pids):
            break
        now = time.monotonic()
        if killed_at is None and (
            now > deadline or (hurry is not None and hurry.count > signals_before)
        ):
            _signal_tree(group, pids, signal.SIGKILL)
            killed_at = now
        elif killed_at is not None and now > killed_at + 5:
            break  # stuck in the kernel (uninterruptible I/O): nothing more to do
        time.sleep(0.05)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _signal_tree(group: int, pids: set[int], sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
    table = _proc_table()
    for pid in pids:  # those that moved to a group of their own
        if table is None or (pid in table and table[pid][2] != "Z"):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _running(group: int, pids: set[int]) -> bool:
    """Whether a process of the group or of `pids` is still running (zombies are not)."""
    table = _proc_table()
    if table is not None:
        return any(
            state != "Z" and (pgid == group or pid in pids)
            for pid, (_, pgid, state) in table.items()
        )
    for pid in pids:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        return True
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _proc_table() -> dict[int, tuple[int, int, str]] | None:
    """pid -> (parent pid, process group, state) of every process, from /proc; None where
    there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in (...) may hold spaces
        table[int(name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _tree(pids: set[int]) -> set[int]:
    """`pids` and all their descendants (just `pids` where there is no /proc)."""
    table = _proc_table() or {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = set(pids)
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# ------------------------------------------------------------------ the MLflow UI

# MLflow 3's server starts a job runner with 7 huey consumers (for its GenAI jobs) unless told.
NO_JOBS = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def mlflow_ui_command(uri: str, port: int) -> tuple[list[str], dict[str, str]]:
    """`mlflow ui` on the tracking store `uri`, bound to 127.0.0.1: the command and its
    environment (the store's URL goes there, so that its password stays off the process list).

    MLflow's job runner is off unless the environment turns it on: it serves GenAI features
    hpo does not use, and starts 8 more processes that keep 2 cores busy for 12 s or so."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", HOST, "--port", str(port)]
    # The registry in the same store (MLflow prints a line to say so when it is not given);
    # deprecation warnings of MLflow's web stack are not the user's to act on.
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=uri, MLFLOW_REGISTRY_STORE_URI=uri)
    env.setdefault(*NO_JOBS)
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return cmd, env


def mlflow_views(uri: str, study: str | None, base: str) -> list[tuple[str, str]]:
    """(what, URL) of the MLflow UI's pages for a study, on the server at `base`.

    `study` is a study name or an MLflow experiment name; None means the study started last.
    The pages are the experiment's runs table (MLflow 3 opens an experiment on its GenAI
    overview unless the URL asks for `workflowType=machine_learning`): first with the trials
    nested under the study's run, then the study's trials alone, best first. Both show the
    columns that matter (the study's metric at the kept epoch, the test metrics, best_val_loss,
    best_epoch, the trial's state and fit, the hyperparameters that vary) through a view that
    hpo stores on the experiment (tags mlflow.sharedViewState.hpo-*), where the store lets it.
    Raises ServerError for a `study` that is neither a study nor an experiment there.
    """
    from hpo.redact import first_line, redact_url
    from hpo.storage import missing_sqlite

    if missing_sqlite(uri):  # opening it would create it
        if study is not None:
            raise ServerError(
                f"no study or experiment {study!r} in {redact_url(uri)} (no such file)"
            )
        return []
    try:
        return _views(_mlflow_client(uri), uri, study, base)
    except ServerError:
        raise
    except Exception as e:  # noqa: BLE001 - not an MLflow store, an old schema, a server away
        raise ServerError(
            f"cannot read the MLflow store {redact_url(uri)}: {first_line(e)}"
        ) from None


def _views(client: Any, uri: str, study: str | None, base: str) -> list[tuple[str, str]]:
    from hpo.config import metric_direction
    from hpo.redact import redact_url

    parent, experiment_id = _find_study(client, study)
    if experiment_id is None:
        if study is None:
            return []
        raise ServerError(
            f"no study or experiment {study!r} in MLflow store {redact_url(uri)}; `hpo studies` "
            "lists the studies (--tracking-uri picks another store)"
        )
    runs = f"{base}/#/experiments/{experiment_id}/runs"
    if parent is None:  # an experiment without hpo studies
        return [(f"experiment {study!r}", f"{runs}?workflowType=machine_learning")]
    name = parent.data.tags["hpo.study"]
    metric = parent.data.params.get("metric", "val_loss")
    trials = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        max_results=1000,
    )
    columns = _columns(parent, trials, metric)
    nested = {"orderByKey": "attributes.start_time", "orderByAsc": False}
    best_first = {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        "orderByKey": f"metrics.`best_{metric}`",
        "orderByAsc": metric_direction(metric) == "minimize",
    }
    views = []
    for key, facets in ((f"hpo-runs-{name}", nested), (f"hpo-trials-{name}", best_first)):
        view = {**facets, "selectedColumns": columns}
        try:
            client.set_experiment_tag(experiment_id, _SHARED_VIEW_TAG + key, json.dumps(view))
            query = {"viewStateShareKey": key}
        except Exception:  # noqa: BLE001 - a read-only store: the URL carries search and sort
            query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in facets.items()}
        url = f"{runs}?" + urllib.parse.urlencode({"workflowType": "machine_learning", **query})
        views.append(url)
    return [
        (f"study {name!r}, its runs (trials nested under the study's run)", views[0]),
        (f"its trials, best {metric} first", views[1]),
    ]


def _mlflow_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _find_study(client: Any, study: str | None) -> tuple[Any, str | None]:
    """(the study's parent run or None, its experiment id or None)."""
    from hpo.config import name_problem

    def latest(experiment_ids: list[str], where: str) -> Any:
        if not experiment_ids:
            return None
        found = client.search_runs(
            experiment_ids,
            filter_string=where,
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0] if found else None

    every = [e.experiment_id for e in client.search_experiments()]
    if study is None:
        parent = latest(every, "tags.`hpo.study` LIKE '%'")
    elif name_problem(study, "STUDY") is None:  # a name that is safe inside the filter
        parent = latest(every, f"tags.`hpo.study` = '{study}'")
    else:
        parent = None
    if parent is not None:
        return parent, parent.info.experiment_id
    if study is not None:
        exp = client.get_experiment_by_name(study)
        if exp is not None and exp.lifecycle_stage == "active":
            return latest([exp.experiment_id], "tags.`hpo.study` LIKE '%'"), exp.experiment_id
    return None, None


def _columns(parent: Any, trials: list[Any], metric: str) -> list[str]:
    """The runs table's columns for a study, in MLflow's `TYPE.\\`KEY\\`` form."""
    metrics = [f"best_{metric}"]
    metrics += sorted(k for k in parent.data.metrics if k.startswith("test_"))
    metrics += [k for k in ("best_val_loss", "best_epoch") if k not in metrics]
    params: list[str] = []
    for trial in trials:  # the hyperparameters that vary between the trials
        for key in trial.data.params:
            if key not in params and len({t.data.params.get(key) for t in trials}) > 1:
                params.append(key)
    return (
        [f"metrics.`{k}`" for k in metrics]
        + [f"tags.`{k}`" for k in ("hpo.state", "hpo.fit")]
        + [f"params.`{k}`" for k in params]
    )


# ------------------------------------------------------------------ Optuna's dashboard


def dashboard_command(url: str, port: int) -> tuple[list[str], dict[str, str]]:
    """This module's dashboard child on the Optuna storage `url`, bound to 127.0.0.1: the
    command and its environment (which carries the URL)."""
    cmd = [sys.executable, "-m", "hpo.servers", "dashboard", "--port", str(port)]
    return cmd, dict(os.environ, **{_DASHBOARD_STORAGE: url})


def _dashboard(port: int) -> None:
    """Serve optuna-dashboard on the storage in $_HPO_DASHBOARD_STORAGE (threads, quiet log)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna
    from optuna_dashboard import wsgi

    from hpo.storage import open_storage

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Handler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # no line per request
            pass

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(os.environ.pop(_DASHBOARD_STORAGE))
    with make_server(HOST, port, wsgi(storage), server_class=Server, handler_class=Handler) as s:
        s.serve_forever()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hpo.servers")
    parser.add_argument("server", choices=["dashboard"])
    parser.add_argument("--port", type=int, required=True)
    _dashboard(parser.parse_args().port)
