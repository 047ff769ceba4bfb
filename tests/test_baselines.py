"""Baselines: named fixed configurations that run first, once per study, as ordinary trials."""

from __future__ import annotations

import optuna
import pytest
import yaml
from conftest import small_spec, study_run, write_spec
from mlflow import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config import SpecError, parse_spec
from hpo.data import load_data
from hpo.params import TrialConfig
from hpo.search import enqueue_baselines, make_sampler
from hpo.tracking import tracker_for
from hpo.train import TrainConfig, evaluate
from hpo.trial import build_model

BASELINES = [
    {"name": "linear", "n_layers": 0},
    {"name": "mlp-32-16", "n_layers": 2, "width": [32, 16], "dropout": 0.2, "lr": 0.005},
]


def test_baselines_are_checked_like_the_search_space():
    bad = small_spec(
        baselines=[
            {"n_layers": 1},
            {"name": "a", "widht": 3},
            {"name": "a", "n_layers": 2, "width": [8, 8, 8]},
            {"name": "b", "lr": {"type": "float", "low": 0.1, "high": 1}},
            {"name": "../x", "activation": "relux"},
            "linear",
        ]
    )
    with pytest.raises(SpecError) as e:
        parse_spec(bad)
    assert e.value.problems == [
        "baselines[0].name: is required",
        widht := e.value.problems[1],
        "baselines[3].lr: must be a fixed value, not a distribution (got a mapping)",
        "baselines[4].name: must be 1 to 100 letters, digits, '-', '_' or '.', starting with a "
        "letter or digit (got '../x')",
        baselines_problem := e.value.problems[4],
        "baselines[5]: must be a mapping (got 'linear')",
        "baselines[2].name: 'a' is used by an earlier baseline",
        "baselines[2].width: 3 widths for n_layers 2; give one per layer",
    ]
    assert widht.startswith("baselines[1].widht: unknown hyperparameter; did you mean 'width'?")
    assert baselines_problem.startswith("baselines[4].activation: ")
    assert "relu" in baselines_problem


def test_a_baseline_config_is_the_defaults_the_fixed_values_and_its_own():
    spec = parse_spec(small_spec(baselines=BASELINES))
    mlp = spec.baseline_config("mlp-32-16")
    assert mlp.widths == (32, 16) and mlp.dropout == 0.2 and mlp.lr == 0.005
    assert mlp.batch_size == 64  # the search space's fixed value
    assert mlp.optimizer == "adam"  # the default
    assert spec.baseline_config("linear").widths == ()


def test_baselines_run_first_once_and_are_never_pruned(workdir, mlflow_uri):
    # "stuck" learns nothing: below the median of the trials before it from the first epoch,
    # a median pruner would stop it at once if it were not a baseline.
    stuck = {"name": "stuck", "n_layers": 1, "width": 8, "lr": 1e-7, "optimizer": "sgd"}
    raw = small_spec(
        baselines=[*BASELINES, stuck],
        study={"n_trials": 5, "pruner": {"name": "median", "n_startup_trials": 0}},
        tracking={"uri": mlflow_uri, "experiment": "baselines"},
    )
    spec = parse_spec(raw)
    result = study_run(spec)
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    first = study.trials[:3]
    assert [t.user_attrs.get("baseline") for t in first] == ["linear", "mlp-32-16", "stuck"]
    assert first[2].intermediate_values[1] < min(t.intermediate_values[1] for t in first[:2])
    for t in first:
        assert t.state == TrialState.COMPLETE and t.params == {}  # the sampler was not asked
        assert len(t.intermediate_values) == 3  # trained to max_epochs, never pruned
    assert first[1].user_attrs["config"]["widths"] == [32, 16]
    assert first[0].user_attrs["n_params"] == 64 * 10 + 10
    assert all("baseline" not in t.user_attrs and t.params for t in study.trials[3:])
    runs = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("baselines").experiment_id],
        filter_string="tags.hpo.baseline = 'mlp-32-16'",
    )
    assert len(runs) == 1 and runs[0].data.params["widths"] == "[32, 16]"
    c = result.baselines
    assert (c.name, c.number) in (("linear", 0), ("mlp-32-16", 1))
    assert c.value == max(t.value for t in first)

    # A multivariate sampler models the searched trials jointly: seen by it, the baselines'
    # empty parameter sets would leave it nothing in common to model.
    tpe = dict(raw["study"], sampler={"name": "tpe", "multivariate": True, "seed": 0})
    sampler = make_sampler(parse_spec(dict(raw, study=tpe)))
    assert {"lr", "width", "n_layers", "activation"} <= set(
        sampler.infer_relative_search_space(study, study.trials[-1])
    )
    plain = optuna.samplers.TPESampler(multivariate=True, seed=0)
    assert plain.infer_relative_search_space(study, study.trials[-1]) == {}

    # Again: queued once per study, however many processes or reruns start.
    assert enqueue_baselines(study, spec) == []
    more = parse_spec(dict(raw, study=dict(raw["study"], n_trials=6)))
    study_run(more)
    names = [t.user_attrs.get("baseline") for t in study.trials if "baseline" in t.user_attrs]
    assert names == ["linear", "mlp-32-16", "stuck"] and len(study.trials) == 6


def test_the_summary_compares_the_search_with_the_best_baseline(workdir):
    spec = write_spec(workdir, small_spec(baselines=BASELINES[:1], study={"n_trials": 3}))
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db")
    base = study.trials[0]
    best = max((t for t in study.trials[1:]), key=lambda t: t.value)
    line = next(x for x in result.output.splitlines() if x.startswith("best baseline"))
    expected = f"best baseline 'linear' (trial #0): val_accuracy = {base.value:.4f}; "
    expected += f"the search's best (trial #{best.number}, {best.value:.4f}) "
    if best.value > base.value:
        expected += f"beats it by {best.value - base.value:.4f}"
    elif best.value < base.value:
        expected += f"falls short of it by {base.value - best.value:.4f}"
    else:
        expected += "ties it"
    assert line == expected

    # After the search, the best baseline's kept weights are measured on test beside the best
    # trial's: the stored figure is what its checkpoint scores there.
    tested = study.user_attrs["baseline_test_metrics"]
    assert study.user_attrs["baseline_test_trial"] == 0
    loaded = parse_spec(yaml.safe_load(spec.read_text()))
    data = load_data(loaded, "cpu")
    weights = tracker_for(loaded).load_checkpoint(base.user_attrs["mlflow_run_id"])
    model = build_model(TrialConfig.of(base.user_attrs["config"]), data, "cpu")
    model.load_state_dict(weights)
    again = evaluate(model, data.take_test(), TrainConfig())
    assert tested["test_accuracy"] == pytest.approx(again["accuracy"], abs=1e-9)
    test_line = next(x for x in result.output.splitlines() if x.startswith("on the test split"))
    if study.best_trial.number == best.number:
        ours = study.user_attrs["test_metrics"]["test_accuracy"]
        assert test_line.startswith(
            f"on the test split: test_accuracy {ours:.4f} (trial #{best.number}) against "
            f"{tested['test_accuracy']:.4f} (baseline 'linear'): "
        )
    else:
        assert "the baseline 'linear' is the study's best" in test_line


def test_the_report_says_how_the_search_did_against_the_best_baseline(workdir):
    spec = write_spec(workdir, small_spec(baselines=BASELINES[:1], study={"n_trials": 3}))
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    summary = [x for x in result.output.splitlines() if x.startswith(("best baseline", "on the"))]
    assert len(summary) == 2
    out = workdir / "out"
    result = CliRunner().invoke(app, ["report", "tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.md").read_text()
    row = next(line for line in page.splitlines() if "Against the baselines" in line)
    assert summary[0] in row and summary[1] in row  # the same words as the summary's


@pytest.mark.parametrize("example", ["mnist.yaml", "fashion_mnist.yaml"])
def test_the_image_examples_start_from_textbook_mlps_and_the_perceptron(example):
    from conftest import REPO

    from hpo.config import load_spec

    spec = load_spec(REPO / "search_spaces" / example)
    assert [b.name for b in spec.baselines] == [
        "mlp-784-128-64-10",
        "keras-784-1000-10",
        "perceptron",
    ]
    assert spec.baseline_config("perceptron").widths == ()  # depth 0: a linear model
    assert spec.baseline_config("keras-784-1000-10").batch_size == 1024
