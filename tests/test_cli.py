"""The `hpo` command driven with Typer's CliRunner in temporary folders, and Ctrl-C for real."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import pytest
from conftest import REPO, hpo_process, mnist_available, small_spec, wait_for, write_spec
from mlflow import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config import load_spec
from hpo.outcomes import count_finished, state_counts, was_interrupted
from hpo.reports.compare import summarise
from hpo.storage import GRACE_S

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], prog_name="hpo")
    return result.exit_code, result.output


def test_validate_ok(workdir):
    code, out = invoke("validate", REPO / "search_spaces" / "digits.yaml")
    assert code == 0 and "ok - study 'digits-mlp' on digits" in out


def test_validate_reports_each_problem_on_its_own_line_with_exit_2(workdir):
    spec = small_spec(study={"sampler": {"name": "tpe", "n_startup": 3}})
    spec["search_space"]["lr"] = {"type": "float", "low": 0.0, "high": 0.1, "log": True}
    spec["search_space"]["activation"] = "relux"
    code, out = invoke("validate", write_spec(workdir, spec))
    lines = out.strip().splitlines()
    assert code == 2 and "Traceback" not in out
    assert len(lines) == 2, out
    assert lines[0].startswith("error: ") and "search_space.lr.low: must be > 0.0 (got 0.0)" in out
    assert "search_space.activation: unknown activation 'relux'; did you mean 'relu'?" in out
    spec = small_spec(study={"sampler": {"name": "tpe", "n_startup": 3}})
    code, out = invoke("validate", write_spec(workdir, spec))
    assert code == 2 and "study.sampler.n_startup: not an option of the tpe sampler" in out


def test_run_with_bad_spec_creates_nothing(workdir):
    spec = small_spec(study={"metric": "val_rmse"})
    code, out = invoke("run", write_spec(workdir, spec))
    assert code == 2 and "study.metric" in out and "Traceback" not in out
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]


def test_run_with_a_bad_sampler_option_creates_nothing(workdir):
    spec = small_spec(study={"sampler": {"name": "tpe", "n_startup": 3}})
    code, out = invoke("run", write_spec(workdir, spec))
    assert code == 2 and "study.sampler.n_startup: not an option of the tpe sampler" in out
    assert "Traceback" not in out
    assert sorted(p.name for p in workdir.iterdir()) == ["spec.yaml"]


def run_help(columns: int) -> str:
    """`hpo run --help` as a terminal of that width shows it."""
    return subprocess.run(
        [sys.executable, "-m", "hpo", "run", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS=str(columns)),
    ).stdout


def test_run_help_shows_the_defaults_of_storage_and_tracking():
    out = " ".join(run_help(200).replace("│", " ").split())  # the help's box and line breaks
    assert "sqlite:///optuna.db (the default)" in out
    assert "[default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db]" in out


def test_run_help_fits_80_columns_with_its_brackets_and_no_type_on_flags():
    """Help text at 80 columns: no line wider, `hpo[ray]` shown (rich took `[ray]` for
    markup), no `<bool>` on --help, and no line break inside the docstring's sentences."""
    out = run_help(80)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "hpo[ray]" in out and "<bool>" not in out
    text = " ".join(out.split())
    assert "give them the same --storage (PostgreSQL across machines)" in text
    assert "give them the\n" not in out


def test_max_epochs_and_max_samples_give_a_quick_look(workdir):
    spec = small_spec(training={"max_epochs": 6, "early_stopping": {"patience": 6}})
    path = write_spec(workdir, spec)
    code, out = invoke("run", path, "--max-epochs", 2, "--max-samples", 300)
    assert code == 0, out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    assert {t.user_attrs["epochs_run"] for t in study.trials} == {2}
    assert study.user_attrs["data"]["n_train"] + study.user_attrs["data"]["n_val"] == 300
    assert "max_epochs: 2" in study.user_attrs["spec_yaml"]  # what trained, not the file
    code, out = invoke("run", path)  # the full run is another study: its hash differs
    assert code == 2 and "--study-name" in out


def test_validate_loads_the_data_or_warns_why_it_could_not(workdir, monkeypatch):
    monkeypatch.setenv("HPO_DATA_DIR", str(workdir / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / "cache"))
    monkeypatch.setenv("HPO_MNIST_MIRROR", "http://127.0.0.1:9/")  # nothing listens there
    code, out = invoke("validate", REPO / "search_spaces" / "mnist.yaml")
    # The spec is sound; the data is not here and cannot be fetched: validate says so plainly.
    assert code == 0 and "Traceback" not in out and "\n  data: " not in out
    assert "warning: data not checked: dataset.name: mnist files not found in" in out
    assert "the download from http://127.0.0.1:9/ failed" in out
    code, out = invoke("validate", REPO / "search_spaces" / "digits.yaml")
    assert code == 0 and "data: " in out and " test, 64 features, 10 classes" in out


@pytest.mark.skipif(not mnist_available(), reason="MNIST not in $HPO_DATA_DIR")
def test_validate_checks_the_mnist_files(workdir):
    code, out = invoke("validate", REPO / "search_spaces" / "mnist.yaml")
    assert code == 0, out
    assert "data: 54,000 train / 6,000 val / 10,000 test, 784 features, 10 classes" in out


def test_bf16_where_it_would_be_emulated_is_warned_about(workdir, mlflow_uri):
    """bf16 products on a CPU without AVX-512 BF16 or AMX units are emulated (18x slower
    than fp32 for a wide net on an AVX2 CPU): validate and run say so, and still run."""
    import torch

    from hpo.train import bf16_native

    emulated = not bf16_native(torch.device("cpu"))
    warning = "warning: training.precision: bf16 on a CPU without AVX-512 BF16 or AMX units"
    spec = small_spec(
        training={"precision": "bf16", "max_epochs": 1},
        study={"n_trials": 1},
        tracking={"uri": mlflow_uri, "experiment": "bf16-warning"},
    )
    code, out = invoke("validate", write_spec(workdir, spec))
    assert code == 0 and (warning in out) == emulated, out
    code, out = invoke("run", write_spec(workdir, spec))
    assert code == 0 and (warning in out) == emulated, out
    assert "study 'tiny': 1 complete, 0 pruned, 0 failed" in out, out
    code, out = invoke("validate", write_spec(workdir, small_spec()))  # auto: fp32 on a CPU
    assert code == 0 and "precision" not in out, out


def test_run_with_missing_spec_file_and_bad_device(workdir):
    code, out = invoke("run", workdir / "nope.yaml")
    assert code == 2 and "no such spec file" in out
    code, out = invoke("run", write_spec(workdir, small_spec()), "--device", "tpu")
    assert (
        code == 2 and "error: --device: must be auto, cpu, cuda, cuda:N or mps (got 'tpu')" in out
    )
    assert not (workdir / "optuna.db").exists()


def test_bad_command_lines_are_one_line_errors_naming_the_option(workdir):
    path = write_spec(workdir, small_spec())
    for args, expected in (
        (["run", path, "--n-trials", 0], "error: --n-trials: must be >= 1 (got 0)"),
        (["run", path, "--fused-trials", -1], "error: --fused-trials: must be >= 1 (got -1)"),
        (["run", path, "--max-epochs", 0], "error: --max-epochs: must be >= 1 (got 0)"),
        (["run", path, "--timeout", 0], "error: --timeout: must be > 0.0 (got 0.0)"),
        (["run", path, "--seed", -1], "error: --seed: must be from 0 to 4294967295 (got -1)"),
        (["run", path, "--n-trials", "x"], "error: hpo run: invalid value for '--n-trials': "),
        (["run", path, "--bogus"], "error: hpo run: no such option: --bogus (hpo run --help)"),
        (["run"], "error: hpo run: missing argument 'spec' (hpo run --help)"),
        (["bogus"], "error: hpo: no such command 'bogus' (hpo --help)"),
    ):
        code, out = invoke(*args)
        assert code == 2 and out.startswith(expected), (args, out)
        assert len(out.strip().splitlines()) == 1, (args, out)
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()
    code, out = invoke()  # `hpo` alone: its help, and nothing else
    assert code == 2 and "Usage: hpo" in out and "error:" not in out, out
    code, out = invoke("run", path, "--timeout", 0.5, "--n-trials", 1)  # any time > 0
    assert code == 0, out


def test_run_prints_progress_and_summary_then_studies_lists_it(workdir):
    path = write_spec(workdir, small_spec(tracking={"log_model": "best"}))
    code, out = invoke("run", path, "--n-trials", 2, "--study-name", "cli-study", "--seed", 3)
    assert code == 0, out
    assert "[1/2] trial 0" in out and "[2/2] trial 1" in out and "ETA" in out
    assert "study 'cli-study': " in out and "best trial #" in out
    fits = out.split("fit diagnosis: ")[1].split(" (trial user attribute")[0]
    counted = re.findall(r"(\d+) (good|overfit|underfit)(?: \(([#\d, ]+)\))?", fits)
    assert sum(int(n) for n, _, _ in counted) == 2, fits
    named = {label: re.findall(r"#(\d+)", numbers) for _, label, numbers in counted}
    assert sorted(int(x) for xs in named.values() for x in xs) == [0, 1], fits  # which ones
    study = optuna.load_study(study_name="cli-study", storage="sqlite:///optuna.db")
    for t in study.trials:
        assert str(t.number) in named[t.user_attrs["fit"]], (fits, t.user_attrs["fit"])
    assert "test split (used once, by trial #" in out and "hpo ui" in out
    assert (workdir / "optuna.db").is_file() and (workdir / "mlflow.db").is_file()
    # the best's settings that apply (Adam: no momentum), and where its model is
    best = out.split("best trial #")[1].splitlines()[1]
    assert "optimizer=adam" in best and "lr=" in best and "widths=[" in best, best
    assert not [k for k in ("momentum=", "nesterov=", " width=") if k in best], best
    uri = study.user_attrs["model_uri"]
    # no baseline to beat: the model is the registry's champion, and the summary names it so
    champion = "models:/cli-study@champion"
    assert study.user_attrs["champion"]["uri"] == champion
    assert (f"best model: {champion} in MLflow's model registry ({uri}; or: mlflow models "
            f"serve -m {champion})") in out  # fmt: skip
    steps = out.split("next steps:\n")[1].splitlines()
    assert " report cli-study " in steps[0] and "reports/cli-study/index.html" in steps[0]
    assert " ui " in steps[1] and "the runs in the MLflow UI" in steps[1]
    assert (
        " predict cli-study ROWS.csv " in steps[2] and "a row: 64 values, 8 x 8 pixel" in steps[2]
    )
    code, out = invoke("studies")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:4] == ["study", "complete", "pruned", "failed"]
    row = lines[1].split()
    assert (
        row[0] == "cli-study" and int(row[1]) + int(row[2]) == 2 and "test_accuracy=" in lines[1]
    )
    code, out = invoke("report", "cli-study")
    assert code == 0 and "reports/cli-study/index.html" in out, out
    assert (workdir / "reports" / "cli-study" / "report.md").is_file()
    code, out = invoke("run", path, "--n-trials", 2, "--study-name", "cli-other")
    assert code == 0, out
    code, out = invoke("compare", "cli-study", "cli-other")
    assert code == 0 and "reports/compare-cli-study-cli-other/index.html" in out, out
    assert "--reseed" in out  # the verdict line says how to weigh seed noise
    code, out = invoke("compare", "cli-study", "nope")
    assert code == 2 and "no study 'nope'" in out
    code, out = invoke("report", "no-such-study")
    assert code == 2 and "no study 'no-such-study'" in out and "Traceback" not in out


def test_studies_and_report_on_missing_storage_create_nothing(workdir):
    code, out = invoke("studies")
    assert code == 0 and "no studies" in out and not (workdir / "optuna.db").exists()
    code, out = invoke("report", "absent")
    assert code == 2 and "no study 'absent'" in out and not (workdir / "optuna.db").exists()


def test_python_dash_m_hpo_help():
    out = subprocess.run([sys.executable, "-m", "hpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("run", "validate", "studies", "ui"):
        assert command in out.stdout


def test_ctrl_c_stops_cleanly_and_rerun_continues(workdir):
    path = write_spec(workdir, small_spec(study={"n_trials": 200}, training={"max_epochs": 20}))
    proc = hpo_process(["run", path], workdir)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("[") and "/200] trial 1 " in line:  # two trials done
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "run the same command again to continue" in out

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert runs and "RUNNING" not in {r.info.status for r in runs}
    finished = sum(
        1 for r in runs if r.data.tags.get("hpo.state") in ("COMPLETE", "PRUNED", "FAIL")
    )
    assert finished >= 2
    # every epoch Optuna heard of reached the runs, the interrupted trials' too: the epochs
    # that waited to be sent went out as their runs were closed
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    for t in study.trials:
        if "mlflow_run_id" in t.user_attrs:
            curve = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_loss")
            assert len(curve) == len(t.intermediate_values), t.number

    proc = hpo_process(["run", path, "--n-trials", finished + 1], workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"{finished} of {finished + 1} trials already done" in out
    assert f"[{finished + 1}/{finished + 1}]" in out


def _running_with_heartbeat(db) -> int:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT count(*) FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id"
            " WHERE t.state = 'RUNNING'"
        ).fetchone()[0]


@pytest.mark.parametrize("where", ["this machine", "another machine"])
def test_a_killed_process_loses_only_its_running_trials(workdir, where):
    """SIGKILL (no chance to clean up): the next run fails its trials as interrupted (the one
    training and the one its worker held next), does not count them, and reaches the total. On
    this machine the next run sees that the process is gone at once; from another machine, it
    waits until the trials' heartbeats are older than the grace period."""
    long_trials = {"max_epochs": 200, "early_stopping": {"patience": 200}}  # seconds, not ms
    path = write_spec(workdir, small_spec(study={"n_trials": 200}, training=long_trials))
    proc = hpo_process(["run", path], workdir)
    db = workdir / "optuna.db"

    def one_done_and_one_training() -> bool:  # a state, not a number of seconds
        try:  # plain SQL: opening an Optuna storage here would race hpo to create the tables
            if _running_with_heartbeat(db) not in (1, 2):  # with the one held next
                return False
        except sqlite3.OperationalError:  # no tables yet
            return False
        study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        # a few epochs into its 200: far from its end, whatever the machine's speed
        epochs = [len(t.intermediate_values) for t in running if t.intermediate_values]
        return count_finished(study) >= 1 and len(epochs) == 1 and 1 <= epochs[0] <= 50

    wait_for(one_done_and_one_training, "a trial done and the next RUNNING")
    proc.kill()
    proc.communicate(timeout=60)
    dead_pid = proc.pid
    if where == "another machine":
        with sqlite3.connect(db) as con:
            con.execute(
                "UPDATE trial_user_attributes SET value_json = ? WHERE key = 'driver'",
                (json.dumps(f"elsewhere:{dead_pid}:1"),),
            )
            age = f"-{GRACE_S + 60} seconds"  # let the grace period pass
            con.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, ?)", (age,))

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    killed = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert len(killed) in (1, 2)
    finished = count_finished(study)
    assert finished >= 1
    # every epoch of a finished trial reached its MLflow run before the kill
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        curve = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_loss")
        assert [m.step for m in curve] == sorted(t.intermediate_values), t.number

    proc = hpo_process(["run", path, "--n-trials", finished + 1], workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    for lost in (study.trials[n] for n in killed):
        assert lost.state == TrialState.FAIL and was_interrupted(lost)
        if "driver" not in lost.user_attrs:  # killed as it asked for this one: see fail_orphans
            assert lost.user_attrs["lost"] == "its process died as it asked for it"
        elif where == "this machine":  # failed at once, not by the heartbeat's grace period
            assert lost.user_attrs["lost"].startswith(
                f"its hpo run {socket.gethostname()}:{dead_pid}:"
            )
        else:
            assert "lost" not in lost.user_attrs
    assert count_finished(study) == finished + 1
    counts = state_counts(study.trials)
    assert counts["INTERRUPTED"] == len(killed) and counts["RUNNING"] == 0
    assert counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"] == finished + 1
    assert f"{len(killed)} interrupted (not counted)" in out
    assert summarise(study).best_so_far[-1][0] == finished + 1  # compare skips it too
    code, table = invoke("studies")
    header, row = table.splitlines()[:2]
    assert code == 0 and row.split()[header.split().index("interrupted")] == str(len(killed))

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}


@pytest.mark.skipif(not mnist_available(), reason="MNIST not in $HPO_DATA_DIR")
def test_mnist_run_reads_shared_idx_files(workdir):
    spec = small_spec(
        name="mnist-quick",
        dataset={"name": "mnist", "max_samples": 4000},
        search_space={"n_layers": 1, "width": 64, "lr": 3e-3, "batch_size": 128},
        study={"n_trials": 1},
        training={"max_epochs": 3},
    )
    code, out = invoke("run", write_spec(workdir, spec))
    assert code == 0, out
    assert "mnist (classification), 3200 train / 800 val / 10000 test, 784 features" in out
    acc = float(out.split("test_accuracy = ")[1].split()[0])
    assert acc > 0.85


def test_ui_serves_the_mlflow_store_on_localhost(workdir):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = hpo_process(["ui", "--port", port], workdir, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
    try:
        # what it prints once the server answers (an empty store: no study to link to)
        wait_for(lambda: proc.poll() is not None or any("no hpo study in" in x for x in lines),
                 "hpo ui saying where to look", limit=240, every=0.2)  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.read().decode().strip() == "OK", lines
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert lines[0].startswith("MLflow UI for sqlite:///") and "starting at http://" in lines[0]
    at = lines.index(f"MLflow UI at http://127.0.0.1:{port}\n")  # the server's log between
    assert lines[at + 1].startswith("  no hpo study in sqlite:///"), lines
    assert "mlflow.db yet" in lines[at + 1]


def test_unusable_storage_url_is_a_clear_error(workdir):
    code, out = invoke("run", write_spec(workdir, small_spec()), "--storage", "nosuch://db")
    assert code == 2 and "storage: cannot open 'nosuch://db'" in out
    assert "Traceback" not in out
    for args in (["studies"], ["report", "x"], ["compare", "x", "y"]):
        code, out = invoke(*args, "--storage", "nosuch://db")
        assert code == 2 and "storage: cannot open 'nosuch://db'" in out, args
        assert "Traceback" not in out


def test_a_study_stored_when_1e_5_was_read_as_text_resumes(workdir):
    """Before hpo read YAML 1.2 numbers, `low: 1e-3` stayed the string '1e-3' in the search
    space, and so in the stored spec hash: such a study still resumes, and a changed spec is
    still refused."""
    import yaml

    spec = small_spec()
    spec["search_space"]["lr"] = {"type": "float", "low": "LOW", "high": 1.0e-2, "log": True}
    text = yaml.safe_dump(spec, sort_keys=False).replace("LOW", "1e-3")
    (workdir / "spec.yaml").write_text(text)
    code, out = invoke("run", workdir / "spec.yaml", "--n-trials", 1)
    assert code == 0, out
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    then = load_spec(workdir / "spec.yaml").fingerprint(yaml.safe_load(text)["search_space"])
    assert then != study.user_attrs["spec_hash"]
    study.set_user_attr("spec_hash", then)  # as that version of hpo stored it
    code, out = invoke("run", workdir / "spec.yaml", "--n-trials", 2)
    assert code == 0 and "1 of 2 trials already done" in out, out
    (workdir / "spec.yaml").write_text(text.replace("1e-3", "2e-3"))
    code, out = invoke("run", workdir / "spec.yaml", "--n-trials", 3)
    assert code == 2 and "was run with a different spec" in out, out


def test_any_key_is_set_from_the_command_line_as_a_dotted_key_and_a_yaml_value(workdir):
    path = write_spec(workdir, small_spec())
    code, out = invoke(
        "run", path, "study.n_trials=1", "training.max_epochs=1", "search_space.lr=1e-3",
        "study.sampler.name=tpe", "search_space.dropout={type: float, low: 0.1, high: 0.2}",
    )  # fmt: skip
    assert code == 0, out
    [trial] = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db").trials
    config = trial.user_attrs["config"]
    assert config["lr"] == 1e-3 and 0.1 <= config["dropout"] <= 0.2
    assert list(trial.intermediate_values) == [1]


def test_a_bad_override_names_its_key_and_what_is_allowed(workdir):
    path = write_spec(workdir, small_spec())
    code, out = invoke("run", path, "training.max_epoch=1", "study.n_trials=zero")
    assert code == 2 and out.splitlines() == [
        "error: command line: training.max_epoch: unknown key; did you mean 'max_epochs'? "
        "allowed: max_epochs, repeats, early_stopping, device, precision, max_params, "
        "memory_limit, stall_timeout",
        "error: command line: study.n_trials: must be an integer (got 'zero')",
    ]
    code, out = invoke("run", path, "epochs")
    assert code == 2 and out.startswith("error: command line: 'epochs': an override is KEY=VALUE")
    code, out = invoke("run", path, "training.max_epochs.x=1")  # a value, not a section
    assert code == 2 and out == (
        "error: command line: training.max_epochs.x: training.max_epochs is a value (3), not a "
        "section\n"
    )
    code, out = invoke("run", path, "--max-epochs", 0)
    assert code == 2 and out == "error: --max-epochs: must be >= 1 (got 0)\n"
    assert not (workdir / "optuna.db").exists()


def test_version_and_the_specs_json_schema(workdir):
    import json

    import jsonschema

    from hpo import __version__
    from hpo.config import read_yaml

    code, out = invoke("--version")
    assert (code, out) == (0, f"hpo {__version__}\n")
    code, out = invoke("schema")
    schema = json.loads(out)
    assert code == 0 and json.loads((REPO / "docs" / "spec.schema.json").read_text()) == schema, (
        "docs/spec.schema.json is stale: run `make docs`"
    )
    check = jsonschema.Draft202012Validator(schema)
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=../docs/spec.schema.json\n")
        assert list(check.iter_errors(read_yaml(text))) == [], path.name
    bad = {
        "unknown key": {"trainig": {}},
        "wrong type": {"training": {"max_epochs": "many"}},
        "unknown name": {"study": {"sampler": {"name": "tpee"}}},
        "out of range": {"search_space": {"dropout": {"type": "float", "low": 0, "high": 1}}},
        "unknown hyperparameter": {"search_space": {"lrr": 0.1}},
        "a distribution's key": {"search_space": {"lr": {"type": "float", "low": 0.1}}},
    }
    for what, change in bad.items():
        spec = small_spec(**change)
        assert list(check.iter_errors(spec)), what
