"""Study reports: the data step on known studies, then the written files."""

from __future__ import annotations

import re
import shutil
import subprocess

import optuna
import pytest
from conftest import small_spec, study_run
from mlflow import MlflowClient

from hpo.config import parse_spec
from hpo.report import write_report
from hpo.report.data import param_importances, report_data, search_space_advice


def in_memory_study(lrs_and_values, direction="maximize"):
    study = optuna.create_study(direction=direction)
    dist = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    drop = optuna.distributions.FloatDistribution(0.0, 0.5)
    for i, (lr, value) in enumerate(lrs_and_values):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr, "dropout": 0.05 * (i % 10)},
                distributions={"lr": dist, "dropout": drop},
                value=value,
                user_attrs={"n_params": 1000 * (i + 1)},
            )
        )
    return study


def test_advice_flags_a_range_whose_best_values_crowd_an_edge():
    # the higher the learning rate, the better: the best trials sit at the top of the range
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 6e-2, 8e-2, 9e-2, 9.5e-2]
    study = in_memory_study([(lr, lr) for lr in lrs])
    space = parse_spec(
        small_spec(
            search_space={
                "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                "dropout": {"type": "float", "low": 0.0, "high": 0.5},
            }
        )
    ).space
    advice = search_space_advice(study, space)
    assert [(a.param, a.edge) for a in advice] == [("lr", "high")]
    assert advice[0].proposed == (1e-4, 1.0) and advice[0].share == 1.0
    assert advice[0].snippet == "lr: {type: float, low: 0.0001, high: 1, log: true}"


def test_advice_stays_silent_when_the_best_values_are_inside_the_range():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 6e-2, 8e-2, 9e-2, 9.5e-2]
    study = in_memory_study([(lr, -abs(lr - 3e-3)) for lr in lrs])
    space = parse_spec(
        small_spec(search_space={"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}})
    ).space
    assert search_space_advice(study, space) == []


def test_importances_include_the_parameter_count():
    study = in_memory_study([(1e-3 * (i + 1), float(i)) for i in range(8)])
    imp = param_importances(study)
    assert set(imp) == {"lr", "dropout", "n_params"}
    assert sum(imp.values()) == pytest.approx(1.0)


@pytest.fixture
def finished_study(workdir, mlflow_uri):
    spec = small_spec(name="reported", study={"n_trials": 6}, tracking={"uri": mlflow_uri})
    study_run(parse_spec(spec))
    return optuna.load_study(study_name="reported", storage="sqlite:///optuna.db")


def test_report_data_of_a_real_study(finished_study, mlflow_uri):
    d = report_data(finished_study, mlflow_uri)
    o = d.overview
    assert o.states["COMPLETE"] == 6 and o.budget == 6 and o.test_trial == o.best_number
    assert o.split["n_test"] == 360 and o.test_metrics["test_accuracy"] > 0.5
    assert len(d.fit_rows) == 6 and sum(d.fit_counts.values()) == 6
    assert "best" in d.curve_roles.values()
    best_curves = d.curves[o.best_number]
    epochs = finished_study.trials[o.best_number].user_attrs["epochs_run"]
    assert len(best_curves["val_loss"]) == len(best_curves["train_loss"]) == epochs


def test_report_files_are_self_contained_and_logged_to_mlflow(finished_study, workdir, mlflow_uri):
    out = write_report(finished_study, workdir / "rep", mlflow_uri)
    page = (out / "index.html").read_text()
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)  # nothing loaded from anywhere
    assert page.count("Plotly.newPlot") == 5  # history, importances, parallel, slice, curves
    assert "once, after the search, by the kept weights of trial #" in page
    md = (out / "report.md").read_text()
    for png in ("history.png", "importances.png", "parallel.png", "slice.png", "curves.png"):
        assert f"]({png})" in md and (out / png).stat().st_size > 1000
    assert md.count("\n| ") >= 6 + 6  # facts and the six trials of the fit table
    client = MlflowClient(mlflow_uri)
    parent = finished_study.user_attrs["mlflow_parent_run_id"]
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/index.html", "report/report.md", "report/curves.png"} <= logged


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered_dom(page, profile):
    """The page's DOM after headless Chromium ran its scripts (offline: no network flags)."""
    return subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout


@pytest.mark.skipif(not _chromium(), reason="chromium not installed")
def test_report_and_comparison_render_in_headless_chromium_without_script_errors(
    finished_study, workdir, mlflow_uri
):
    """Studies in a storage other than the default, reported from another working folder."""
    other = workdir / "elsewhere"
    other.mkdir()
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    again = optuna.load_study(study_name="reported", storage=storage)
    out = write_report(again, other / "rep", mlflow_uri)
    dom = _rendered_dom(out / "index.html", workdir / "chrome")
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-script-errors" not in html_tag, html_tag  # the page's error hook saw nothing
    assert dom.count('class="main-svg"') >= 5  # every chart drew its SVG

    from hpo.report.compare import write_compare

    cmp = write_compare([finished_study, again], other / "cmp")
    dom = _rendered_dom(cmp / "index.html", workdir / "chrome")
    assert "data-script-errors" not in re.search(r"<html[^>]*>", dom).group(0)
    assert dom.count('class="main-svg"') >= 1
