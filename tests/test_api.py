"""hpo as a Python library: `hpo.run`, `hpo.load`, and the spec given as a path, text or dict."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing

import numpy as np
import optuna
import pytest
from conftest import small_spec, wait_for, write_spec
from optuna.trial import TrialState

import hpo
from hpo.api import WORKER_IMPORTED_SCRIPT, spec_of
from hpo.config import SpecError
from hpo.results import STEPS


def test_a_spec_is_a_path_yaml_text_or_a_dict_with_sections_or_dotted_keys(tmp_path):
    path = write_spec(tmp_path, small_spec())
    text = path.read_text()
    by_path, by_text, by_dict = spec_of(path), spec_of(text), spec_of(small_spec())
    assert by_path.fingerprint() == by_text.fingerprint() == by_dict.fingerprint()
    assert spec_of(str(path)).source_dir == str(tmp_path)
    changed = spec_of(
        small_spec(),
        {"training": {"max_epochs": 7}, "search_space": {"lr": 0.01}, "study.n_trials": 9},
    )
    assert (changed.training.max_epochs, changed.space["lr"], changed.study.n_trials) == (
        7,
        0.01,
        9,
    )
    assert changed.space["width"] == by_dict.space["width"]  # the other entries stay
    # a distribution given by its dotted path replaces the entry whole, as in a section
    lr = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    by_path = spec_of(small_spec(), {"search_space.lr": lr})
    assert by_path.space["lr"] == spec_of(small_spec(), {"search_space": {"lr": lr}}).space["lr"]
    assert by_path.space["lr"].high == 1e-2


def test_a_keyword_override_is_validated_as_the_file_is_and_nothing_is_written(workdir):
    with pytest.raises(SpecError) as e:
        hpo.run(small_spec(), training={"max_epoch": 3}, search_space={"dropout": 1.5})
    assert e.value.problems == [
        "search_space.dropout: must be < 1.0 (got 1.5)",
        "training.max_epoch: unknown key; did you mean 'max_epochs'? allowed: max_epochs, "
        "repeats, early_stopping, device, precision, max_params, memory_limit, stall_timeout",
    ]
    # the options of `hpo run` are keywords here, validated as their keys
    with pytest.raises(SpecError) as e:
        hpo.run(small_spec(), max_epochs=0, timeout=-1, device="tpu", max_samples=0)
    assert [p.split(":")[0] for p in e.value.problems] == [
        "dataset.max_samples", "training.max_epochs", "training.device", "study.timeout"
    ]  # fmt: skip
    with pytest.raises(SpecError, match="no such spec file"):
        hpo.run(workdir / "missing.yaml")
    assert list(workdir.iterdir()) == []


def test_run_returns_the_study_its_best_model_and_calls_back_as_optuna_does(workdir):
    seen, journals = [], []

    def callback(study, trial):
        seen.append((study.study_name, trial.number))
        journals.append(_journal(workdir / "optuna.db"))

    result = hpo.run(
        small_spec(tracking={"log_model": "best"}),
        n_trials=3,
        training={"max_epochs": 6},
        callbacks=[callback],
    )
    assert isinstance(result.study, optuna.Study)
    assert seen == [("tiny", 0), ("tiny", 1), ("tiny", 2)]
    # The storage writes ahead while the study runs, and is one file again once it ends.
    assert journals == ["wal"] * 3
    assert _journal(workdir / "optuna.db") == "delete"
    assert not (workdir / "optuna.db-wal").exists()
    best = result.best_trial
    assert best is not None and best.value == max(t.value for t in result.study.trials)
    assert set(result.test_metrics) >= {"test_accuracy", "test_loss"}
    # where the driver's time went, step by step, beside what the worker trained
    book = result.summary.bookkeeping
    epochs = sum(len(t.intermediate_values) for t in result.study.trials)
    assert book["calls"]["ask"] >= 3 and book["calls"]["run end"] == 3  # and the budget checks
    assert book["calls"]["epoch decision"] == epochs and set(book["seconds"]) == set(STEPS)
    assert 0 < book["training_seconds"] < book["loop_seconds"]

    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)  # raw pixels 0..16, as the data file has them
    labels = np.asarray(result.best_model().predict(X[:300]))
    assert labels.shape == (300,) and (labels == y[:300]).mean() > 0.5

    again = hpo.load("tiny")  # read back from ./optuna.db
    assert again.best_trial.number == best.number
    assert again.test_metrics == result.test_metrics

    written = hpo.report("tiny")  # what `hpo report` writes, as files and values
    assert (written.folder / "index.html").is_file() and written.folder.name == "tiny"
    assert json.loads((written.folder / "report.json").read_text()) == written.data
    hpo.run(small_spec(), n_trials=2, study_name="tiny-b", progress=False)
    both = hpo.compare(["tiny", "tiny-b"])
    assert (both.folder / "report.md").is_file()
    assert [s.name for s in both.data.studies] == ["tiny", "tiny-b"]


def _journal(path) -> str:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("PRAGMA journal_mode").fetchone()[0]


def _one_done_and_one_training(storage: str):
    """A state of the study in `storage`: a trial finished and another one epochs into its
    training (so an interrupt lands mid-study, whatever the machine's speed)."""

    def seen():
        try:
            study = optuna.load_study(study_name="tiny", storage=storage)
        except KeyError:  # not created yet
            return None
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        return done and running

    return seen


def test_a_script_without_the_main_guard_is_told_what_to_do(tmp_path):
    """The trials train in a worker process, which imports the calling script: one that calls
    hpo.run at its top level would start a study in the worker too. The worker says why it
    stops, and the run does not start."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"import hpo\nhpo.run({small_spec()!r}, n_trials=1, progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert WORKER_IMPORTED_SCRIPT in done.stderr and "worker 0 died while starting" in done.stderr


def test_a_plain_python_process_runs_interrupts_and_continues_a_study(tmp_path):
    """A script, as a user writes one: a dict spec, keyword overrides, process workers under
    `if __name__ == "__main__"`. KeyboardInterrupt (SIGINT) mid-study leaves nothing RUNNING;
    the same call again continues the study to its budget."""
    spec = small_spec(training={"max_epochs": 20})
    script = tmp_path / "study.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            import hpo

            if __name__ == "__main__":
                result = hpo.run({spec!r}, n_trials=int(sys.argv[1]), workers=2)
                print(json.dumps({{"interrupted": result.summary.interrupted,
                                   "counts": result.summary.counts}}))
            """
        )
    )
    storage = f"sqlite:///{tmp_path}/optuna.db"

    def python(n_trials: int) -> subprocess.Popen:
        command = [sys.executable, str(script), str(n_trials)]
        return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)

    proc = python(200)

    seen = _one_done_and_one_training(storage)
    wait_for(seen, "a trial done and one training", process=proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert json.loads(out.splitlines()[-1])["interrupted"] is True
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    finished = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    assert finished >= 1

    proc = python(finished + 1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    counts = json.loads(out.splitlines()[-1])["counts"]
    assert counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"] == finished + 1


def _kernel_env(tmp_path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"PYTHONUNBUFFERED": "1", "HOME": os.environ.get("HOME", str(tmp_path))}


def test_a_notebook_runs_a_study_with_a_dict_spec_overrides_and_a_callback(tmp_path):
    """In a Jupyter kernel (nbclient runs the notebook): progress lines in the cell's output,
    the callback called per trial, the best model predicting raw rows, the study read back."""
    import nbformat
    from nbclient import NotebookClient

    spec = small_spec(tracking={"log_model": "best"})
    cells = [
        f"import hpo\nspec = {spec!r}\nseen = []",
        "result = hpo.run(spec, n_trials=3, training={'max_epochs': 4},\n"
        "                 callbacks=[lambda study, trial: seen.append(trial.number)])",
        "from sklearn.datasets import load_digits\n"
        "X, y = load_digits(return_X_y=True)\n"
        "labels = result.best_model().predict(X[:200])\n"
        "again = hpo.load('tiny')\n"
        "print(seen, again.best_trial.number == result.best_trial.number, len(labels),\n"
        "      sorted(result.test_metrics))",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=_kernel_env(tmp_path))
    run_output = "".join(o.get("text", "") for o in notebook.cells[1].outputs)
    assert "[3/3] trial 2" in run_output, run_output
    [printed] = [o["text"] for o in notebook.cells[2].outputs if o.get("name") == "stdout"]
    assert printed.startswith("[0, 1, 2] True 200 ['test_accuracy', 'test_loss']"), printed


def test_an_interrupted_kernel_leaves_nothing_running_and_the_same_call_continues(tmp_path):
    """The kernel's interrupt (Jupyter's stop button: SIGINT) mid-study: the call returns with
    `interrupted`, no trial is RUNNING, and running the cell again finishes the budget."""
    from jupyter_client.manager import start_new_kernel

    storage = f"sqlite:///{tmp_path}/optuna.db"
    spec = small_spec(training={"max_epochs": 20})
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=_kernel_env(tmp_path))
    try:
        printed: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])

        kc.execute_interactive(f"import hpo\nspec = {spec!r}", timeout=120)
        kc.execute("result = hpo.run(spec, n_trials=200)")

        seen = _one_done_and_one_training(storage)
        wait_for(seen, "a trial done and one training in the kernel")
        km.interrupt_kernel()
        kc.execute_interactive(
            "print(result.summary.interrupted, result.summary.counts['RUNNING'])",
            timeout=300,
            output_hook=hook,
        )
        assert "".join(printed).split()[-2:] == ["True", "0"], printed
        study = optuna.load_study(study_name="tiny", storage=storage)
        assert not study.get_trials(states=(TrialState.RUNNING,))
        finished = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))

        printed.clear()
        kc.execute_interactive(
            f"result = hpo.run(spec, n_trials={finished + 1}, progress=False)\n"
            "print(result.summary.interrupted, result.best_trial is not None)",
            timeout=600,
            output_hook=hook,
        )
        assert "".join(printed).split()[-2:] == ["False", "True"], printed
        study = optuna.load_study(study_name="tiny", storage=storage)
        assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == (
            finished + 1
        )
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_study_without_a_logged_model_says_why_it_has_none():
    study = optuna.create_study(study_name="bare")
    with pytest.raises(LookupError, match="study 'bare' has no logged model .tracking.log_model"):
        hpo.Result.of(study).best_model()
