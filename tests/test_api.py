"""hpo as a Python library: `hpo.run`, `hpo.load`, and the spec given as a path, text or dict."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import optuna
import pytest
from conftest import small_spec, wait_for, write_spec
from optuna.trial import TrialState

import hpo
from hpo.api import spec_of
from hpo.config import SpecError


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


def test_a_keyword_override_is_validated_as_the_file_is_and_nothing_is_written(workdir):
    with pytest.raises(SpecError) as e:
        hpo.run(small_spec(), training={"max_epoch": 3}, search_space={"dropout": 1.5})
    assert e.value.problems == [
        "search_space.dropout: must be < 1.0 (got 1.5)",
        "training.max_epoch: unknown key; did you mean 'max_epochs'? allowed: max_epochs, "
        "early_stopping, device, precision, max_params, memory_limit, stall_timeout",
    ]
    with pytest.raises(SpecError, match="no such spec file"):
        hpo.run(workdir / "missing.yaml")
    assert list(workdir.iterdir()) == []


def test_run_returns_the_study_its_best_model_and_calls_back_as_optuna_does(workdir):
    seen = []
    result = hpo.run(
        small_spec(tracking={"log_model": "best"}),
        n_trials=3,
        training={"max_epochs": 6},
        callbacks=[lambda study, trial: seen.append((study.study_name, trial.number))],
    )
    assert isinstance(result.study, optuna.Study)
    assert seen == [("tiny", 0), ("tiny", 1), ("tiny", 2)]
    best = result.best_trial
    assert best is not None and best.value == max(t.value for t in result.study.trials)
    assert set(result.test_metrics) >= {"test_accuracy", "test_loss"}

    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)  # raw pixels 0..16, as the data file has them
    labels = np.asarray(result.best_model().predict(X[:300]))
    assert labels.shape == (300,) and (labels == y[:300]).mean() > 0.5

    again = hpo.load("tiny")  # read back from ./optuna.db
    assert again.best_trial.number == best.number
    assert again.test_metrics == result.test_metrics


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

    def one_done_and_one_training():
        try:
            study = optuna.load_study(study_name="tiny", storage=storage)
        except KeyError:
            return None
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.is_finished()]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        return done and running

    wait_for(one_done_and_one_training, "a trial done and one training", process=proc)
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
