"""Trust: passwords of every shape never shown, ties for the best name one trial everywhere,
a test file that does not match its training file refused, a stalled worker replaced."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.parse

import optuna
import pytest
import torch
from conftest import hpo_process, small_spec, wait_for, write_spec
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config import SpecError, parse_spec
from hpo.data import load_data
from hpo.objectives import Objectives
from hpo.redact import redact, redact_url, url_problem

runner = CliRunner()
ON_THE_SERVER = pytest.mark.xdist_group("mlflow_server")

# The shapes of real passwords: base64 from `openssl rand` or a password manager, one with
# the characters that split a URL, one with spaces; each as a user would put it in a URL,
# raw (refused: it cannot be parsed as meant) and percent-encoded (used).
PASSWORDS = ["Qz7/Kx+Vw9==", "Jq@Zx:Wv#8?", "Fy Kq Zv"]


def pieces(password: str) -> set[str]:
    """Every 3-character piece of the password, and of its percent-encoded form those that
    hold a character of the password (not '%2F' alone: URLs in a report have those)."""
    encoded = urllib.parse.quote(password, safe="")
    out = {password[i : i + 3] for i in range(len(password) - 2)}
    for i in range(len(encoded) - 2):
        piece = encoded[i : i + 3]
        if not re.fullmatch(r"[%0-9A-F]{3}", piece):
            out.add(piece)
    return out


def leaks(texts, password: str) -> list[str]:
    found = []
    for text in texts:
        for piece in pieces(password):
            at = text.find(piece)
            if at >= 0:
                found.append(f"{piece!r} in ...{text[max(0, at - 60) : at + 60]}...")
    return found


def storage_url(password: str, encode: bool, port: int = 9, db: str = "hpo") -> str:
    pw = urllib.parse.quote(password, safe="") if encode else password
    return f"postgresql://hpo:{pw}@127.0.0.1:{port}/{db}"


def tracking_url(password: str, encode: bool, port: int = 9) -> str:
    pw = urllib.parse.quote(password, safe="") if encode else password
    return f"http://hpo:{pw}@127.0.0.1:{port}"


# ---------------------------------------------------------------- passwords


@pytest.mark.parametrize("password", PASSWORDS)
def test_redact_masks_every_shape_of_password(password):
    for encode in (False, True):
        for url in (storage_url(password, encode), tracking_url(password, encode)):
            for shown in (redact(f"cannot open {url!r}: refused"), redact_url(url)):
                assert "hpo:***@127.0.0.1:9" in shown, shown
                assert not leaks([shown], password), shown
    pw = urllib.parse.quote(password, safe="")
    for text in (  # what may follow a URL in a message, and hosts of other shapes
        f"postgresql://u:{pw}@host?sslmode=require",
        f"(postgresql://u:{pw}@host:5000), then",
        f"at postgresql://u:{pw}@[::1]:5432/db.",
        f"postgresql://u:{pw}@db1:5432,db2:5432/app",
    ):
        assert not leaks([redact(text)], password), redact(text)
    assert redact_url(f"postgresql://u@host/db?password={pw}") == (
        "postgresql://u@host/db?password=***"
    )


def test_outage_notices_and_errors_show_no_password():
    from hpo.outage import Retry, ServerLost

    password = PASSWORDS[0]
    url = storage_url(password, encode=True)
    heard = []
    retry = Retry("Optuna storage", url, 0.0, heard.append)
    retry._down()
    retry._up()
    long_error = OSError("x" * 165 + f" connecting to {url}")  # cut in the password
    lost = ServerLost("Optuna storage", url, 3.0, long_error)
    assert not leaks([*heard, str(lost)], password), [*heard, str(lost)]
    assert "hpo:***@127.0.0.1:9" in heard[0]


def test_a_password_that_splits_the_url_is_refused_and_an_encoded_one_is_not():
    for password in PASSWORDS:
        problem = url_problem(storage_url(password, encode=False), "--storage")
        assert problem and problem.startswith("--storage: the password in postgresql://hpo:***@")
        assert "percent-encode" in problem and not leaks([problem], password)
        assert url_problem(storage_url(password, encode=True)) is None
    assert "holds '@', ':', '#', '?'" in url_problem(storage_url("Jq@Zx:Wv#8?", False))
    assert "a space" in url_problem(storage_url("Fy Kq Zv", False))
    for fine in ("sqlite:///optuna.db", "http://127.0.0.1:5000", "postgresql://hpo@h/db"):
        assert url_problem(fine) is None and redact_url(fine) == fine


def _commands(spec_path, rows, url, tracking):
    """Every command that takes a storage or tracking URL, with `url` and `tracking`."""
    return [
        ["run", spec_path, "--storage", url],
        ["run", spec_path, "--tracking-uri", tracking],
        ["studies", "--storage", url],
        ["report", "s", "--storage", url],
        ["report", "s", "--tracking-uri", tracking],
        ["predict", "s", rows, "--storage", url],
        ["predict", "s", rows, "--tracking-uri", tracking],
        ["compare", "s", "t", "--storage", url],
        ["dashboard", "--storage", url],
        ["ui", "--tracking-uri", tracking],
    ]


@pytest.mark.parametrize("password", PASSWORDS)
def test_no_command_shows_a_password_with_an_unreachable_server(workdir, password):
    """Unreachable servers (port 9): raw passwords are refused before any connection, encoded
    ones fail to connect; each in one line, exit status 2, the password nowhere, nothing
    written."""
    rows = workdir / "rows.csv"
    rows.write_text("a,b\n1,2\n")
    outputs = []
    for encode in (False, True):
        url, tracking = storage_url(password, encode), tracking_url(password, encode)
        spec = small_spec(name="s")
        plain = write_spec(workdir, spec)
        commands = _commands(plain, rows, url, tracking)
        in_spec = small_spec(name="s", study={"storage": url}, tracking={"uri": tracking})
        commands.append(["run", write_spec(workdir, in_spec, "in-spec.yaml")])
        for args in commands:
            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 2, (args, result.output)
            assert "Traceback" not in result.output
            outputs.append(result.output)
        result = runner.invoke(app, ["validate", str(workdir / "in-spec.yaml")])
        assert result.exit_code == (0 if encode else 2), result.output  # it connects to nothing
        outputs.append(result.output)
        for env in ({"HPO_STORAGE": url}, {"MLFLOW_TRACKING_URI": tracking}):
            result = runner.invoke(app, ["run", str(plain)], env=env)
            assert result.exit_code == 2, result.output
            outputs.append(result.output)
    assert not leaks(outputs, password)
    assert any("percent-encode" in out for out in outputs)
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


@ON_THE_SERVER
def test_no_password_shows_anywhere_with_a_real_postgresql_and_mlflow_server(
    tmp_path, postgres, mlflow_server
):
    """A role whose password holds every shape at once, on a real PostgreSQL server, and the
    same password for a real `mlflow server`'s basic auth: a study runs, is listed, reported,
    compared, predicted with and served; the password is in no output line, MLflow param or
    tag, artifact, Optuna attribute or report."""
    import psycopg

    password = "Qz7/Kx+Vw9== Jq@Zx:Wv#8?"
    from psycopg import sql

    with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE odd LOGIN PASSWORD {}").format(sql.Literal(password)))
        conn.execute('CREATE DATABASE "oddpw" OWNER odd')
    encoded = urllib.parse.quote(password, safe="")
    url = f"postgresql://odd:{encoded}@127.0.0.1:{postgres.port}/oddpw"
    tracking = mlflow_server.replace("://", f"://odd:{encoded}@")
    spec = small_spec(name="oddpw", study={"n_trials": 2}, tracking={"log_model": "best"})
    path = write_spec(tmp_path, spec)
    outputs = []

    def hpo(*args, code=0):  # in this process: a process's start costs seconds each
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == code, result.output
        outputs.append(result.output)

    proc = hpo_process(["run", path, "--storage", url, "--tracking-uri", tracking], tmp_path)
    outputs.append(proc.communicate(timeout=600)[0])  # as a user runs it: its own process
    assert proc.returncode == 0, outputs[0]
    hpo("run", path, "--study-name", "oddpw2", "--storage", url, "--tracking-uri", tracking)
    assert "odd:***@127.0.0.1" in outputs[0]
    hpo("studies", "--storage", url)
    hpo("report", "oddpw", "--storage", url, "--tracking-uri", tracking, "--out", tmp_path / "r")
    hpo("compare", "oddpw", "oddpw2", "--storage", url, "--out", tmp_path / "c")
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(f"p{i}" for i in range(64)) + "\n" + ",".join(["3"] * 64) + "\n")
    hpo("predict", "oddpw", rows, "--storage", url, "--tracking-uri", tracking)
    # the storage is opened, then the port (the database's, taken) refused: no server left
    hpo("dashboard", "--storage", url, "--port", postgres.port, code=2)
    hpo("ui", "--tracking-uri", tracking, code=2)  # a server: hpo ui serves stores only

    texts = list(outputs)
    storage = optuna.storages.RDBStorage(url)
    for name in ("oddpw", "oddpw2"):
        study = optuna.load_study(study_name=name, storage=storage)
        assert study.user_attrs["test_metrics"]
        texts.append(json.dumps(study.user_attrs, default=str))
        texts += [json.dumps(t.user_attrs, default=str) for t in study.trials]
    client = MlflowClient(mlflow_server)
    for name in ("oddpw", "oddpw2"):
        exp = client.get_experiment_by_name(name)
        for run in client.search_runs([exp.experiment_id]):
            texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
            for artifact in client.list_artifacts(run.info.run_id):
                if artifact.path.endswith((".yaml", ".txt", ".json", ".md", ".html")):
                    got = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
                    texts.append(open(got, errors="replace").read())
    for folder in (tmp_path / "r", tmp_path / "c"):
        for f in folder.rglob("*"):
            if f.suffix in (".md", ".html", ".json"):
                # the page's own script library (megabytes of minified code) holds every
                # 3 characters there are; the page's text and data are what is checked
                parts = f.read_text(errors="replace").split("</script>")
                texts += [part for part in parts if len(part) < 100_000]
    found = leaks(texts, password)
    assert not found, found[:5]


# ---------------------------------------------------------------- ties for the best


def _frozen(number: int, value: float, state=TrialState.COMPLETE) -> FrozenTrial:
    complete = state == TrialState.COMPLETE
    empty: dict = {}
    return FrozenTrial(
        number, state, value if complete else None, None, None, empty, empty, empty, empty,
        empty, number,
    )  # fmt: skip


def test_the_best_trial_is_the_best_value_then_the_lowest_number():
    trials = [
        _frozen(3, 0.9),
        _frozen(1, 0.95),
        _frozen(5, 0.95),
        _frozen(0, 0.99, TrialState.PRUNED),
    ]
    up, down = (
        Objectives.single("val_accuracy", "maximize"),
        Objectives.single("val_loss", "minimize"),
    )
    assert up.best(trials).number == 1
    assert up.best(list(reversed(trials))).number == 1  # whatever the order
    assert down.best(trials).number == 3
    assert down.best([_frozen(7, 0.2), _frozen(2, 0.2)]).number == 2
    assert up.best([_frozen(0, 0.5, TrialState.FAIL)]) is None


def separable_csv(folder):
    """Two classes 10 standard deviations apart: every model reaches val_accuracy 1.0."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 240)
    x = np.where(y == 1, 5.0, -5.0) + rng.normal(0, 0.5, 240)
    rows = [f"{a:.4f},{b:.4f},{c}" for a, b, c in zip(x, rng.normal(0, 1, 240), y, strict=True)]
    (folder / "sep.csv").write_text("x1,x2,label\n" + "\n".join(rows) + "\n")


# Two searched trials (baselines keep their weights anyway), one at batch size 1 (slow), one
# at 240 (fast), both reaching 1.0: random sampler seed 10 gives batch sizes [1, 240].
def tie_spec(name, seed=10):
    return small_spec(
        name=name,
        dataset={"name": "csv", "path": "sep.csv", "target": "label", "split": {"val": 0.25}},
        search_space={
            "n_layers": 1,
            "width": 8,
            "lr": 0.05,
            "batch_size": {"type": "categorical", "choices": [1, 240]},
        },
        training={"max_epochs": 6, "early_stopping": {"patience": 6}},
        study={"n_trials": 2, "sampler": {"name": "random", "seed": seed}},
        tracking={"log_model": "best"},
    )


def assert_one_best(folder, name, outputs):
    """The lower-numbered of the tied trials is named by the study, its test evaluation, its
    model, the summary, the MLflow parent run and the report."""
    storage = f"sqlite:///{folder / 'optuna.db'}"
    study = optuna.load_study(study_name=name, storage=storage)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [t.value for t in done] == [1.0, 1.0], [(t.number, t.value) for t in study.trials]
    attrs = study.user_attrs
    assert attrs["test_trial"] == attrs["model_trial"] == 0 and attrs["test_metrics"]
    assert "best trial #0:" in "".join(outputs)
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    [parent] = client.search_runs([exp.experiment_id], "tags.hpo.best_trial = '0'")
    assert parent.info.status == "FINISHED"
    tracking = f"sqlite:///{folder / 'mlflow.db'}"
    args = [
        "report",
        name,
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
        "--out",
        folder / name,
    ]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads((folder / name / "report.json").read_text())["overview"]["best_number"] == 0
    return study


def test_a_tie_for_the_best_with_two_workers_ends_with_the_test_and_the_model(tmp_path):
    """Trial 1 (batch size 240) usually finishes long before trial 0 (batch size 1): before
    the fix this ended in a traceback (the best trial had no checkpoint)."""
    separable_csv(tmp_path)
    path = write_spec(tmp_path, tie_spec("tie"))
    proc = hpo_process(["run", path, "--workers", 2], tmp_path)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out
    study = assert_one_best(tmp_path, "tie", [out])
    assert [t.params["batch_size"] for t in study.trials] == [1, 240]
    assert study.trials[0].user_attrs["checkpoint"]


def test_a_tie_for_the_best_across_two_processes_names_one_trial(tmp_path):
    separable_csv(tmp_path)
    path = write_spec(tmp_path, tie_spec("tie2"))
    procs = [hpo_process(["run", path], tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and "Traceback" not in out, out
    assert_one_best(tmp_path, "tie2", outputs)


# ---------------------------------------------------------------- a test file that does not fit


def _tables(folder, test_header="a,b,kind,label", test_rows=None, extra_train_col=False):
    rows = [
        f"{i},{i % 7},{'cat' if i % 2 else 'dog'},{'pos' if i % 3 else 'neg'}" for i in range(60)
    ]
    header = "a,b,kind,label"
    if extra_train_col:  # a column that is empty in every row
        header += ",blank"
        rows = [r + "," for r in rows]
    (folder / "train.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    test = test_rows if test_rows is not None else rows[:20]
    (folder / "test.csv").write_text(test_header + "\n" + "\n".join(test) + "\n")
    spec = {"name": "csv", "path": "train.csv", "test_path": "test.csv", "target": "label"}
    return small_spec(dataset=spec, task="auto")


def _problems(folder, spec):
    with pytest.raises(SpecError) as e:
        load_data(parse_spec(spec, source_dir=folder))
    return e.value.problems


def test_a_test_file_with_other_columns_is_refused_in_one_line(tmp_path):
    spec = _tables(tmp_path, test_header="a,bb,kind,label")
    [problem] = _problems(tmp_path, spec)
    assert problem == (
        "dataset.test_path: test.csv must have the feature columns of train.csv (in any "
        "order): missing 'b'; extra 'bb'"
    )
    code, out = _cli(tmp_path, "validate", tmp_path / write_spec(tmp_path, spec).name)
    assert code == 2 and out.count("\n") == 1 and "missing 'b'; extra 'bb'" in out


def test_a_test_file_whose_column_holds_another_kind_is_refused(tmp_path):
    rows = [f"{i},x{i},{'cat' if i % 2 else 'dog'},pos" for i in range(10)]
    [problem] = _problems(tmp_path, _tables(tmp_path, test_rows=rows))
    assert problem == (
        "dataset.test_path: column 'b' holds text in test.csv but numbers in train.csv; both "
        "files must hold the same kind"
    )


def test_columns_in_another_order_are_the_same_columns(tmp_path):
    rows = [f"{'cat' if i % 2 else 'dog'},pos,{i % 7},{i}" for i in range(10)]
    spec = _tables(tmp_path, test_header="kind,label,b,a", test_rows=rows)
    data = load_data(parse_spec(spec, source_dir=tmp_path))
    X, y = data.take_test()
    assert X.shape == (10, 4) and y.tolist() == [1] * 10  # pos is class 1 of neg, pos
    # the same rows in the training file's order give the same inputs
    same = [f"{i},{i % 7},{'cat' if i % 2 else 'dog'},pos" for i in range(10)]
    other = load_data(parse_spec(_tables(tmp_path, test_rows=same), source_dir=tmp_path))
    assert torch.equal(other.take_test()[0], X)


def test_a_label_the_training_file_lacks_is_an_error_or_dropped_and_counted(tmp_path):
    rows = [f"{i},{i % 7},cat,{'neutral' if i in (3, 8, 9) else 'pos'}" for i in range(12)]
    spec = _tables(tmp_path, test_rows=rows)
    [problem] = _problems(tmp_path, spec)
    assert problem.startswith(
        "dataset.test_path: 3 rows have a label the training file does not have ('neutral'; "
        "lines 5, 10, 11); the classes are neg, pos."
    )
    spec["dataset"]["test_unseen_labels"] = "drop"
    data = load_data(parse_spec(spec, source_dir=tmp_path))
    assert (
        data.n_outputs == 2
        and data.info["n_test"] == 9
        and data.info["classes"]
        == [
            "neg",
            "pos",
        ]
    )
    assert any(n.startswith("3 test rows dropped") for n in data.info["notes"])
    assert data.info["test_dropped"] == 3  # what the summary says the test metrics leave out
    del spec["dataset"]["test_path"]
    assert _problems(tmp_path, spec) == [
        "dataset.test_unseen_labels: only used with dataset.test_path"
    ]


def test_an_unseen_category_is_encoded_as_unknown_and_said(tmp_path):
    rows = [f"{i},{i % 7},{'bird' if i < 4 else 'cat'},pos" for i in range(10)]
    data = load_data(parse_spec(_tables(tmp_path, test_rows=rows), source_dir=tmp_path))
    X, _ = data.take_test()
    assert X.shape[1] == 4  # kind_cat, kind_dog only: the test file shapes nothing
    # bird: unknown, both of kind's one-hot inputs 0 (then scaled as training scaled them)
    shift, scale = (torch.tensor(data.prep[k][2:]) for k in ("shift", "scale"))
    assert torch.allclose(X[:4, 2:], (-shift / scale).expand(4, 2))
    assert torch.allclose(X[4:, 2:], ((torch.tensor([1.0, 0.0]) - shift) / scale).expand(6, 2))
    assert data.info["notes"] == [
        "4 test rows have a 'kind' the training file never has ('bird'): encoded as unknown, "
        "as hpo predict does"
    ]


def _cli(folder, *args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_an_all_empty_column_is_a_note_and_no_library_warning_reaches_the_terminal(tmp_path):
    spec = _tables(tmp_path, extra_train_col=True, test_header="a,b,kind,label,blank")
    spec["dataset"].pop("test_path")
    path = write_spec(tmp_path, spec)
    proc = hpo_process(["run", path, "--n-trials", 1], tmp_path, env={"PYTHONWARNINGS": "default"})
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "note: column 'blank' is empty in every training row" in out
    assert "Warning" not in out and "warnings.warn" not in out, out


# ---------------------------------------------------------------- a worker that stops answering


def test_a_stopped_worker_is_failed_as_stalled_killed_replaced_and_its_trial_run_again(tmp_path):
    """SIGSTOP on a worker mid-trial (a hung GPU call or file system looks the same to hpo):
    after training.stall_timeout (8 s; 24 s before a trial's first epoch, which on a busy
    machine took over 5 s once: a false stall would retry a healthy trial) its trial is FAIL
    as stalled, its process killed, a new worker started, the configuration run again once,
    and the study ends with n_trials."""
    from hpo.outcomes import FINISHED, was_interrupted

    spec = small_spec(
        name="stall",
        # 600 epochs (seconds a trial): the wait below sees a trial a few epochs in, far from
        # its end, whatever the machine's speed
        training={"max_epochs": 600, "early_stopping": {"patience": 600}, "stall_timeout": 8},
        study={"n_trials": 3},
    )
    path = write_spec(tmp_path, spec)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = hpo_process(["run", path, "--workers", 2], tmp_path)

    def training():
        try:
            study = optuna.load_study(study_name="stall", storage=storage)
        except KeyError:  # not created yet
            return None
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" in t.user_attrs and 2 <= len(t.intermediate_values) <= 300:
                return t
        return None

    victim = wait_for(training, "a trial RUNNING on a worker, 2 to 300 epochs in", process=proc)
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGSTOP)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "Traceback" not in out, out
    study = optuna.load_study(study_name="stall", storage=storage)
    stalled = study.trials[victim.number]
    summary = [(t.number, t.state.name, t.user_attrs.get("lost")) for t in study.trials]
    assert stalled.state == TrialState.FAIL and was_interrupted(stalled), (summary, out)
    assert stalled.user_attrs["lost"].startswith("stalled: its worker was silent for ")
    assert f"worker process {pid} killed" in stalled.user_attrs["lost"]
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.params == stalled.params and retry.state in FINISHED
    assert retry.user_attrs["worker"] != stalled.user_attrs["worker"]  # a new process
    counted = [t for t in study.trials if t.state in FINISHED and not was_interrupted(t)]
    assert len(counted) == 3
    assert f"trial {victim.number} " in out and "stalled" in out
    with pytest.raises(ProcessLookupError):  # no process left behind
        os.kill(pid, 0)


def test_a_worker_has_stalled_past_ten_of_its_epochs_and_the_floor():
    import time

    from hpo.executors.local import WorkerSlots

    slots = WorkerSlots()
    slots._init_slots(2, stall_s=300.0)
    slots._job = [{3}, {4}]
    now = time.monotonic()
    slots._epochs[0] = [40.0, 50.0, 60.0]  # slow epochs: 10 x 50 s = 500 s, past the floor
    slots._owed = [now - 400, now - 299]
    assert slots._stalled() == []
    slots._owed = [now - 600, now - 901]  # worker 1 has no epoch yet: 3 x the floor, 900 s
    [(first, why), (second, why_1)] = slots._stalled()
    assert (first, second) == (0, 1)
    assert why.startswith("stalled: its worker was silent for 600 s (its epochs took 50 s; ")
    assert why.endswith("the limit is 500 s, training.stall_timeout)")
    assert "(before its 1st epoch; the limit is 900 s" in why_1
    slots._owed = [0.0, now - 900]  # worker 0 waits for the driver's decision: not its fault
    assert [i for i, _ in slots._stalled()] == [1]
    slots._init_slots(2, stall_s=None)  # training.stall_timeout: null
    slots._job, slots._owed = [{3}, {4}], [now - 1e6, now - 1e6]
    assert slots._stalled() == []


def test_a_library_warning_is_one_line_in_hpos_form():
    import io
    import warnings

    from hpo.redact import warning_line

    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda *a, **k: warning_line(*a[:4], file=out)
        warnings.warn("Mean of empty slice\nsecond line", RuntimeWarning, stacklevel=1)
    assert out.getvalue() == "warning: Mean of empty slice (RuntimeWarning)\n"


def test_hpo_installs_the_one_line_warnings_in_its_entry_point(tmp_path):
    import subprocess
    import sys

    code = (
        "import warnings; from hpo import cli; "
        "cli.app = lambda: warnings.warn('Mean of empty slice\\nsource line', RuntimeWarning); "
        "cli.main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stderr == "warning: Mean of empty slice (RuntimeWarning)\n", done.stderr


def test_class_numbers_match_across_files_when_a_blank_makes_one_column_floats(tmp_path):
    rows = [f"{i},{i % 7},cat,{i % 2}" for i in range(60)]
    (tmp_path / "train.csv").write_text("a,b,kind,label\n" + "\n".join(rows) + "\n")
    test = [f"{i},{i % 7},cat,{i % 2}" for i in range(9)] + ["9,2,cat,"]  # 0.0, 1.0, blank
    (tmp_path / "test.csv").write_text("a,b,kind,label\n" + "\n".join(test) + "\n")
    dataset = {"name": "csv", "path": "train.csv", "test_path": "test.csv", "target": "label",
               "drop_missing_target": True}  # fmt: skip
    data = load_data(parse_spec(small_spec(dataset=dataset, task="auto"), source_dir=tmp_path))
    assert data.info["classes"] == ["0", "1"]
    assert data.take_test()[1].tolist() == [i % 2 for i in range(9)]


def test_a_study_whose_data_now_gives_other_inputs_is_not_resumed():
    """A table study from before classes and categories came from the training file only:
    its trials' weights have another number of inputs."""
    from hpo.preflight import refuse_changed_spec

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="old", storage=storage)
    study.set_user_attr("data", {"split_hash": "abc", "n_features": 6, "n_classes": 2})
    same = {"split_hash": "abc", "n_features": 6, "n_classes": 2}
    assert refuse_changed_spec(storage, "sqlite://", "old", ("h",), same)["data"] == same
    with pytest.raises(SpecError) as e:
        refuse_changed_spec(storage, "sqlite://", "old", ("h",), {**same, "n_features": 5})
    assert e.value.problems == [
        "dataset: the data of study 'old' now gives 5 inputs where its trials had 6; to start "
        "a new study, change `name:` in the spec or pass --study-name NEW_NAME"
    ]
