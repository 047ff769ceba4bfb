"""hpo compare: summaries from real studies, seed statistics, the verdict, the written files."""

from __future__ import annotations

import math
import re

import optuna
import pytest
from conftest import REPO, chromium, rendered_dom, small_spec, study_run

from hpo.config import parse_spec
from hpo.outcomes import was_interrupted
from hpo.reports.compare import (
    SeedStats,
    best_so_far_figure,
    compare_data,
    metric_groups,
    seed_stats,
    summarise,
    verdict,
    write_compare,
)
from hpo.study import retrain_best


def test_seed_stats_mean_and_t_interval():
    s = seed_stats("a", "test_accuracy", [{"test_accuracy": v} for v in (0.90, 0.92, 0.94)])
    assert s.mean == pytest.approx(0.92)
    # t(0.975, 2) = 4.303; sd = 0.02; sem = 0.02 / sqrt(3)
    assert s.half_width == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)


def test_verdict_tells_signal_from_seed_noise():
    far = [
        SeedStats("a", "test_accuracy", [0.90, 0.91, 0.90], 0.9033, 0.0),
        SeedStats("b", "test_accuracy", [0.80, 0.81, 0.80], 0.8033, 0.0),
    ]
    assert "is larger than the seed noise" in verdict(far)
    near = [
        SeedStats("a", "test_accuracy", [0.90, 0.95, 0.85], 0.90, 0.0),
        SeedStats("b", "test_accuracy", [0.91, 0.86, 0.94], 0.9033, 0.0),
    ]
    assert "within the seed noise" in verdict(near)
    assert "--reseed" in verdict([])


@pytest.fixture
def two_studies(workdir, mlflow_uri):
    for name, sampler in (("cmp-random", "random"), ("cmp-tpe", "tpe")):
        spec = small_spec(
            name=name,
            study={"n_trials": 4, "sampler": {"name": sampler, "seed": 1}},
            tracking={"uri": mlflow_uri},
        )
        study_run(parse_spec(spec))
    return [
        optuna.load_study(study_name=n, storage="sqlite:///optuna.db")
        for n in ("cmp-random", "cmp-tpe")
    ]


def test_summary_counts_and_best_so_far(two_studies):
    s = summarise(two_studies[0])
    values = [t.value for t in two_studies[0].trials]
    assert s.best_value == max(values) and s.states["COMPLETE"] == 4
    assert s.trials_to_best == values.index(max(values)) + 1
    assert [p[2] for p in s.best_so_far] == [max(values[: i + 1]) for i in range(4)]
    assert sum(s.fit_counts.values()) == 4


def test_retrain_best_is_seeded_and_reports_val_and_test(two_studies):
    a = retrain_best(two_studies[0], seeds=[1, 2])
    b = retrain_best(two_studies[0], seeds=[1])
    assert a[0] == b[0] and a[0] != a[1]
    assert 0.5 < a[0]["test_accuracy"] <= 1 and 0.5 < a[0]["val_accuracy"] <= 1


def test_compare_writes_page_and_markdown_with_seed_noise(two_studies, workdir):
    out = write_compare(two_studies, workdir / "cmp", reseed=2)
    md = (out / "report.md").read_text()
    assert "| cmp-random |" in md and "| cmp-tpe |" in md and "best_so_far.png" in md
    assert md.count("test_accuracy") >= 2 and ("seed noise" in md.splitlines()[-1])
    page = (out / "index.html").read_text()
    assert page.count("Plotly.newPlot") == 1 and "mean ± 95% interval" in page


# ---------------------------------------------------------------- what the curves show


def _load(name):
    return optuna.load_study(study_name=name, storage="sqlite:///optuna.db")


@pytest.fixture
def single_and_interrupted(workdir, mlflow_uri):
    """A study with a single finished trial, and one whose third trial was cut short by Ctrl-C
    (a KeyboardInterrupt in the middle of its epochs, as a real Ctrl-C lands), with the fourth,
    if the driver had asked for it by then for its worker to hold, which never started."""
    study_run(
        parse_spec(small_spec(name="one", study={"n_trials": 1}, tracking={"uri": mlflow_uri}))
    )

    def ctrl_c(progress):
        if progress.number == 2 and progress.epoch == 2:
            raise KeyboardInterrupt

    spec = small_spec(
        name="cut", study={"n_trials": 4}, training={"max_epochs": 4}, tracking={"uri": mlflow_uri}
    )
    result = study_run(parse_spec(spec), on_epoch=ctrl_c)
    assert result.interrupted
    return _load("one"), _load("cut")


def test_a_single_finished_trial_is_drawn_as_a_point(single_and_interrupted):
    one, cut = single_and_interrupted
    d = compare_data([one, cut])
    assert len(d.studies[0].best_so_far) == 1
    fig = best_so_far_figure(d)
    single = [t for t in fig.data if t.name == "one"]
    assert len(single) == 2 and all(len(t.x) == 1 for t in single)
    assert all("markers" in t.mode for t in fig.data)  # a lone point is not an invisible line


def test_interrupted_trials_are_counted_and_the_page_says_why_they_are_left_out(
    single_and_interrupted, workdir
):
    _, cut = single_and_interrupted
    interrupted = [t.number for t in cut.trials if was_interrupted(t)]
    assert interrupted in ([2], [2, 3])  # the held fourth, when it had been asked for
    n = len(interrupted)
    s = summarise(cut)
    assert s.states["INTERRUPTED"] == n and s.states["COMPLETE"] == 2
    assert [p[0] for p in s.best_so_far] == [1, 2]  # the two finished trials, nothing else
    out = write_compare(list(single_and_interrupted), workdir / "cmp")
    md = (out / "report.md").read_text()
    assert "| cut |" in md and f" 2 / 0 / 0 / {n} |" in md and " 1 / 0 / 0 / 0 |" in md
    trials = "trials" if n > 1 else "trial"
    assert (
        f"cut: {n} interrupted {trials} (Ctrl-C, --timeout or a lost worker) left out of the "
        "curves and counts: they never finished, do not count toward n_trials, and hpo runs "
        "their configurations again." in md
    )
    assert "one: 0 interrupted" not in md
    assert "left out of the curves" in (out / "index.html").read_text()


@pytest.fixture
def accuracy_and_rmse(workdir, mlflow_uri):
    study_run(
        parse_spec(small_spec(name="acc", study={"n_trials": 2}, tracking={"uri": mlflow_uri}))
    )
    wine = {
        "name": "csv",
        "path": str(REPO / "search_spaces" / "data" / "wine.csv"),
        "target": "alcohol",
        "split": {"val": 0.2, "test": 0.2, "stratify": False, "seed": 0},
    }
    spec = small_spec(
        name="rmse",
        dataset=wine,
        task="regression",
        study={"n_trials": 2, "metric": "val_rmse"},
        tracking={"uri": mlflow_uri},
    )
    study_run(parse_spec(spec))
    return _load("acc"), _load("rmse")


def test_studies_with_different_metrics_get_a_row_of_panels_each(accuracy_and_rmse, workdir):
    d = compare_data(list(accuracy_and_rmse))
    assert [(m, [s.name for s in ss]) for m, ss in metric_groups(d)] == [
        ("val_accuracy", ["acc"]),
        ("val_rmse", ["rmse"]),
    ]
    fig = best_so_far_figure(d)
    axes_of = {name: {t.yaxis for t in fig.data if t.name == name} for name in ("acc", "rmse")}
    assert axes_of == {"acc": {"y", "y2"}, "rmse": {"y3", "y4"}}  # never on one axis
    assert fig.layout.yaxis.title.text == "best val_accuracy so far (higher is better)"
    assert fig.layout.yaxis3.title.text == "best val_rmse so far (lower is better)"
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [
        "val_accuracy: by finished trial",
        "val_accuracy: by wall time",
        "val_rmse: by finished trial",
        "val_rmse: by wall time",
    ]
    out = write_compare(list(accuracy_and_rmse), workdir / "cmp")
    sentence = (
        "The studies optimise different metrics, so each has its own row of panels: "
        "row 1: val_accuracy (acc); row 2: val_rmse (rmse)."
    )
    assert sentence in (out / "report.md").read_text()
    assert sentence in (out / "index.html").read_text()
    _different_data_is_said_and_reseed_not_suggested(accuracy_and_rmse, workdir)


def test_seed_noise_of_different_metrics_is_not_weighed():
    mixed = [
        SeedStats("a", "test_accuracy", [0.90, 0.91, 0.90], 0.9033, 0.0),
        SeedStats("b", "test_rmse", [0.80, 0.81, 0.80], 0.8033, 0.0),
    ]
    assert verdict(mixed) == (
        "a and b are measured on different metrics (test_accuracy, test_rmse): their "
        "retrainings cannot be weighed against each other."
    )


@pytest.mark.skipif(not chromium(), reason="chromium not installed")
def test_every_point_is_drawn_in_headless_chromium(single_and_interrupted, workdir):
    out = write_compare(list(single_and_interrupted), workdir / "cmp")
    dom = rendered_dom(out / "index.html", workdir / "chrome")
    assert "data-script-errors" not in re.search(r"<html[^>]*>", dom).group(0)
    d = compare_data(list(single_and_interrupted))
    points = 2 * sum(len(s.best_so_far) for s in d.studies)  # both panels
    assert dom.count('class="point"') == points == 2 * (1 + 2)


def _different_data_is_said_and_reseed_not_suggested(accuracy_and_rmse, workdir):
    """The same two studies (their fixture trains them: seconds): digits against a CSV."""
    from typer.testing import CliRunner

    from hpo.cli import app

    d = compare_data(list(accuracy_and_rmse), reseed=2)
    assert [s.data for s in d.studies] == [
        "digits (1149 train / 288 val / 360 test)",
        "csv (113 train / 29 val / 36 test)",
    ]
    assert d.reseed == []  # nothing retrained: it would not make them comparable
    assert d.verdict.startswith(
        "acc and rmse ran on different data (digits (1149 train / 288 val / 360 test); csv "
    )
    assert "measure different metrics (val_accuracy; val_rmse)" in d.verdict
    assert "are not comparable" in d.verdict and "Run with --reseed" not in d.verdict
    result = CliRunner().invoke(app, ["compare", "acc", "rmse", "--out", str(workdir / "c")])
    assert result.exit_code == 0, result.output
    assert "ran on different data" in result.output and "Run with --reseed" not in result.output
    assert (
        "| digits (1149 train / 288 val / 360 test) |" in (workdir / "c" / "report.md").read_text()
    )
