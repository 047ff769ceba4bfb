"""What a user reads must be right: fit labels in a real study, the run's first lines and its
summary, the report's charts and advice, the compare page, help texts."""

from __future__ import annotations

import optuna
from conftest import small_spec, write_spec
from typer.testing import CliRunner

from hpo.cli import app

runner = CliRunner()

# make run's trial 23, trained at batch size 64: its training loss climbs within 8 epochs
UNSTABLE = {
    "n_layers": 3,
    "width": 206,
    "activation": "gelu",
    "dropout": 0.49,
    "optimizer": "adam",
    "lr": 0.025,
    "batch_size": 64,
}


def test_a_study_labels_a_too_large_learning_rate_unstable_everywhere(workdir):
    spec = small_spec(
        name="unst",
        search_space=UNSTABLE,
        training={"max_epochs": 8, "early_stopping": {"patience": 8}},
        study={"n_trials": 1},
    )
    result = runner.invoke(app, ["run", str(write_spec(workdir, spec))])
    assert result.exit_code == 0, result.output
    assert "fit diagnosis: 0 good, 0 overfit, 0 underfit, 1 unstable (#0)" in result.output
    [trial] = optuna.load_study(study_name="unst", storage="sqlite:///optuna.db").trials
    assert trial.user_attrs["fit"] == "unstable"
    evidence = trial.user_attrs["fit_evidence"]
    assert evidence.startswith("train_loss ") and "(lr 0.025 here)" in evidence
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("unst").experiment_id], "tags.hpo.trial_number = '0'"
    )
    assert run.data.tags["hpo.fit"] == "unstable"


# ---------------------------------------------------------------- the report


def test_a_digits_report_has_no_phantom_values_and_no_baseline_lines(workdir, mlflow_uri):
    """Baselines and a conditional parameter (momentum only for SGD): no chart has a None
    anywhere, the parallel coordinates draw only searched trials, each on the parameters it
    has, and momentum gets a chart of its own over the SGD trials."""
    import json

    from conftest import study_run

    from hpo.config import parse_spec
    from hpo.reports.data import report_data
    from hpo.reports.render import plotly_figures

    spec = small_spec(
        name="phantoms",
        search_space={
            "n_layers": {"type": "int", "low": 1, "high": 2},
            "width": {"type": "int", "low": 16, "high": 64, "log": True},
            "lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
            "momentum": {
                "type": "float",
                "low": 0.0,
                "high": 0.95,
                "when": {"optimizer": ["sgd"]},
            },
            "batch_size": 64,
        },
        baselines=[{"name": "linear", "n_layers": 0}, {"name": "small", "width": 16}],
        study={"n_trials": 12},
        tracking={"uri": mlflow_uri},
    )
    study_run(parse_spec(spec))
    study = optuna.load_study(study_name="phantoms", storage="sqlite:///optuna.db")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    searched = [t for t in complete if "baseline" not in t.user_attrs]
    sgd = [t for t in searched if "momentum" in t.params]
    assert len(complete) > len(searched) >= 2 and len(sgd) >= 2  # what the test is about
    figures = plotly_figures(study, report_data(study, mlflow_uri))
    for key, fig in figures.items():
        assert "None" not in json.dumps(fig.to_plotly_json(), default=str), key

    def lines_and_axes(fig):  # Optuna 5 draws each trial as a line over numbered axes
        lines = [t for t in fig.data if t.mode == "lines"]
        return lines, list(fig.layout.xaxis.ticktext)

    lines, axes = lines_and_axes(figures["parallel"])
    assert {"lr", "optimizer", "width"} <= set(axes) and "momentum" not in axes
    assert len(lines) == len(searched)  # no baseline line
    assert all(None not in t.y for t in lines)
    lines, axes = lines_and_axes(figures["parallel-momentum"])
    assert "momentum" in axes and len(lines) == len(sgd)


def test_no_report_advises_widening_a_parameter_it_says_barely_matters(workdir):
    """dropout sits at the top edge of its range in every trial (its importance is 0): the
    advice says nothing of widening it, and the flat list says why not."""
    import yaml

    from hpo.reports.data import report_data
    from hpo.reports.render import render_markdown

    space = {
        "n_layers": 1,
        "width": 32,
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    }
    study = optuna.create_study(
        study_name="flat", storage="sqlite:///flat.db", direction="maximize"
    )
    study.set_user_attr("spec_yaml", yaml.safe_dump(small_spec(name="flat", search_space=space)))
    study.set_user_attr("metric", "val_accuracy")
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    drop = optuna.distributions.FloatDistribution(0.0, 0.5)
    for i in range(20):
        params = {"lr": 1e-4 * 1000 ** (i / 20), "dropout": 0.49}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={"lr": lr, "dropout": drop},
                value=0.5 + 0.02 * i,
                user_attrs={"config": params, "n_params": 2410},
            )
        )
    d = report_data(study)
    assert "dropout" not in [a.param for a in d.advice]
    md = render_markdown(d, {})
    assert (
        "dropout (its best values sit at its high edge, but it barely matters here: widening "
        "is unlikely to help)" in md
    )
    assert "dropout:" not in md.split("## Search-space advice")[1]


def test_next_steps_never_print_a_masked_password_and_name_the_store_hpo_ui_needs(workdir, capsys):
    from types import SimpleNamespace

    from hpo.cli import _next_steps

    r = SimpleNamespace(
        study_name="s",
        storage="postgresql://hpo:***@db:5432/hpo?sslmode=require",
        tracking_uri="sqlite:////data/other/mlflow.db",
        model_uri="models:/m-1",
        data_info={"row": "64 values, 8 x 8 pixel values 0-16, row by row"},
    )
    _next_steps(r)
    out = capsys.readouterr().out
    assert '--storage "$HPO_STORAGE"' in out and "***" not in out
    assert " ui s --tracking-uri sqlite:////data/other/mlflow.db " in out
    assert "a row: 64 values, 8 x 8 pixel values 0-16, row by row" in out


def test_a_budget_the_baselines_use_up_is_said_before_training(workdir):
    spec = small_spec(
        name="budget",
        baselines=[{"name": "linear", "n_layers": 0}, {"name": "tiny", "width": 8}],
        study={"n_trials": 2},
    )
    result = runner.invoke(app, ["run", str(write_spec(workdir, spec))])
    assert result.exit_code == 0, result.output
    warning = (
        "warning: the 2 baselines use all 2 trials; the search runs none: raise --n-trials "
        "(to 12 for 10 searched trials)"
    )
    assert warning in result.output
    assert result.output.index(warning) < result.output.index("trial 0 ")  # before training
