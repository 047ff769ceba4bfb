"""Study reports: the data step on known studies, then the written files."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import yaml
from conftest import chromium, rendered_dom, small_spec, study_run
from mlflow import MlflowClient

from hpo.config import parse_spec
from hpo.reports import write_report
from hpo.reports.data import param_importances, report_data, search_space_advice, yaml_float
from hpo.reports.render import NO_ADVICE, render_markdown


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


# ---------------------------------------------------------------- search-space advice

ADVICE_SPACE = {
    "n_layers": 1,
    "width": 32,
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}
N = 16
EVEN = [0.92 * i / (N - 1) for i in range(N)]  # positions in lr's range, on its log scale
DROPOUT = [0.5 * ((i * 7) % N) / N for i in range(N)]  # unrelated to lr and to the value
NOISE = [((i * 5) % N) / N - 0.5 for i in range(N)]  # in [-0.5, 0.5), unrelated to both


def stored_study(name, positions, values, run_ids=False):
    """A study in a real SQLite storage, as hpo stores one (the attributes the report reads),
    its trials made directly: lr at `positions` (0 to 1 on the log scale of [1e-4, 0.1])."""
    spec = small_spec(name=name, search_space=ADVICE_SPACE)
    storage = "sqlite:///advice.db"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study.set_user_attr("spec_yaml", yaml.safe_dump(spec, sort_keys=False))
    study.set_user_attr("spec_dir", ".")
    study.set_user_attr("metric", "val_accuracy")
    study.set_user_attr("data", {"dataset": "digits", "task": "classification"})
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    drop = optuna.distributions.FloatDistribution(0.0, 0.5)
    for i, (pos, value) in enumerate(zip(positions, values, strict=True)):
        params = {"lr": min(1e-4 * 1000**pos, 0.1), "dropout": DROPOUT[i]}
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={"lr": lr, "dropout": drop},
                value=value,
                user_attrs={
                    "config": {**params, "n_layers": 1, "width": 32},
                    "n_params": 2410,
                    **({"mlflow_run_id": f"run{i}"} if run_ids else {}),
                },
            )
        )
    return optuna.load_study(study_name=name, storage=storage)


def advice_of(study):
    d = report_data(study)
    md = render_markdown(d, {})
    return d.advice, md[md.index("## Search-space advice") :]


def test_advice_raises_the_upper_bound_when_the_metric_keeps_rising_toward_it(workdir):
    # accuracy rises steadily with lr right up to the top of its range; only 1 of the top 5
    # trials sits in the outermost tenth, so crowding alone would say nothing
    values = [0.5 + 0.4 * p + 0.05 * z for p, z in zip(EVEN, NOISE, strict=True)]
    advice, text = advice_of(stored_study("trend-up", EVEN, values))
    assert [(a.param, a.edge, a.reasons) for a in advice] == [("lr", "high", ("trend",))]
    a = advice[0]
    assert a.share == pytest.approx(1 / 5) and a.trend.n_trials == N and a.trend.rho > 0.95
    assert a.proposed == pytest.approx((1e-4, 1.0))
    assert a.snippet == "lr: {type: float, low: 1.0e-4, high: 1.0, log: true}"
    assert "lr: val_accuracy keeps improving toward the high edge of [0.0001, 0.1]" in text
    assert "raise the upper bound:" in text and a.snippet in text
    assert "hpo run NEW.yaml --warm-start trend-up " in text  # goes on from these trials
    assert "dropout" not in text.split("A peak inside the range")[1]  # only that advice
    # the snippet pastes into a spec that validates, with the wider range
    pasted = yaml.safe_load(a.snippet)["lr"]
    assert pasted["low"] == 1e-4 and pasted["high"] == 1.0
    spec = parse_spec(small_spec(search_space={**ADVICE_SPACE, "lr": pasted}))
    assert (spec.space["lr"].low, spec.space["lr"].high) == (1e-4, 1.0)


def test_advice_lowers_the_lower_bound_when_the_metric_keeps_rising_toward_it(workdir):
    down = [1 - p for p in EVEN]  # lr from the top of the range down to 0.08 of it
    values = [0.5 + 0.4 * p + 0.05 * z for p, z in zip(EVEN, NOISE, strict=True)]
    advice, text = advice_of(stored_study("trend-down", down, values))
    assert [(a.param, a.edge, a.reasons) for a in advice] == [("lr", "low", ("trend",))]
    assert advice[0].trend.rho < -0.95
    assert advice[0].snippet == "lr: {type: float, low: 1.0e-5, high: 0.1, log: true}"
    assert "toward the low edge" in text and "lower the lower bound:" in text
    assert "raise the upper bound" not in text


def test_advice_stays_silent_on_a_peak_inside_the_range(workdir):
    values = [0.9 - 1.2 * (p - 0.46) ** 2 + 0.05 * z for p, z in zip(EVEN, NOISE, strict=True)]
    advice, text = advice_of(stored_study("peak", EVEN, values))
    assert advice == [] and NO_ADVICE in text
    # a peak at three quarters of the range: rho is high, yet the metric falls past the peak
    values = [0.9 - 1.2 * (p - 0.75) ** 2 + 0.01 * z for p, z in zip(EVEN, NOISE, strict=True)]
    study = stored_study("late-peak", EVEN, values)
    assert (
        search_space_advice(study, parse_spec(small_spec(search_space=ADVICE_SPACE)).space) == []
    )


def test_advice_stays_silent_when_the_parameter_has_no_effect(workdir):
    values = [0.8 + 0.1 * z for z in NOISE]
    advice, text = advice_of(stored_study("no-effect", EVEN, values))
    assert advice == [] and NO_ADVICE in text


def test_advice_still_flags_a_range_whose_best_values_crowd_an_edge():
    # lr's best values pile up in its top tenth, though the metric has no trend elsewhere
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 8e-2, 9e-2, 9.5e-2, 2e-3, 5e-4]
    values = [0.5, 0.7, 0.6, 0.55, 0.65, 0.9, 0.92, 0.91, 0.52, 0.68]
    study = in_memory_study(list(zip(lrs, values, strict=True)))
    space = parse_spec(small_spec(search_space={"lr": ADVICE_SPACE["lr"]})).space
    advice = search_space_advice(study, space)
    assert [(a.param, a.edge) for a in advice] == [("lr", "high")]
    assert "crowd" in advice[0].reasons and advice[0].share == 0.6  # 3 of the top 5


def test_yaml_floats_read_back_as_floats():
    for v in (1e-4, 1e-5, 2.5e-6, 1.0, 0.5, 1e5, 123.4):
        text = yaml_float(v)
        assert isinstance(yaml.safe_load(text), float) and yaml.safe_load(text) == pytest.approx(v)
    assert yaml_float(1e-4) == "1.0e-4" and yaml_float(1e5) == "1.0e+5" and yaml_float(1) == "1.0"


def test_a_real_study_with_a_learning_rate_range_too_low_is_told_to_raise_it(workdir, mlflow_uri):
    """Plain SGD on digits for 3 epochs with lr in [1e-3, 1e-2]: every trial underfits and the
    higher the rate, the better (the best rates for this are near 0.1)."""
    spec = small_spec(
        name="lr-too-low",
        search_space={
            "n_layers": 1,
            "width": 64,
            "optimizer": "sgd",
            "batch_size": 32,
            "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        },
        training={"max_epochs": 3, "early_stopping": {"patience": 3}},
        study={"n_trials": 12},
        tracking={"uri": mlflow_uri},
    )
    study_run(parse_spec(spec))
    study = optuna.load_study(study_name="lr-too-low", storage="sqlite:///optuna.db")
    assert {t.user_attrs["fit"] for t in study.trials} == {"underfit"}
    out = write_report(study, workdir / "rep", mlflow_uri)
    data = json.loads((out / "report.json").read_text())
    [advice] = data["advice"]
    assert advice["param"] == "lr" and advice["edge"] == "high"
    assert advice["snippet"] == "lr: {type: float, low: 0.001, high: 0.1, log: true}"
    md = (out / "report.md").read_text()
    assert "lr: val_accuracy keeps improving toward the high edge of [0.001, 0.01]" in md
    assert "raise the upper bound:" in md


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


@pytest.mark.skipif(not chromium(), reason="chromium not installed")
def test_report_and_comparison_render_in_headless_chromium_without_script_errors(
    finished_study, workdir, mlflow_uri
):
    """Studies in a storage other than the default, reported from another working folder."""
    other = workdir / "elsewhere"
    other.mkdir()
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    again = optuna.load_study(study_name="reported", storage=storage)
    out = write_report(again, other / "rep", mlflow_uri)
    dom = rendered_dom(out / "index.html", workdir / "chrome")
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-script-errors" not in html_tag, html_tag  # the page's error hook saw nothing
    assert dom.count('class="main-svg"') >= 5  # every chart drew its SVG

    from hpo.reports.compare import write_compare

    cmp = write_compare([finished_study, again], other / "cmp")
    dom = rendered_dom(cmp / "index.html", workdir / "chrome")
    assert "data-script-errors" not in re.search(r"<html[^>]*>", dom).group(0)
    assert dom.count('class="main-svg"') >= 1


# ---------------------------------------------------------------- the page fits its column

WIDE_SPACE = {
    "n_layers": {"type": "int", "low": 1, "high": 2},
    "width": {"type": "int", "low": 16, "high": 64, "log": True},
    "activation": {"type": "categorical", "choices": ["relu", "tanh"]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.3},
    "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
    "batch_size": {"type": "categorical", "choices": [32, 64]},
    "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    "momentum": {"type": "float", "low": 0.0, "high": 0.9},
}


@pytest.fixture
def wide_study(workdir, mlflow_uri):
    """Nine searched hyperparameters: Optuna's slice chart would be 2,700 px wide."""
    spec = small_spec(
        name="wide",
        search_space=WIDE_SPACE,
        training={"max_epochs": 2},
        study={"n_trials": 4},
        tracking={"uri": mlflow_uri},
    )
    study_run(parse_spec(spec))
    return optuna.load_study(study_name="wide", storage="sqlite:///optuna.db")


def test_every_figure_fits_the_column_and_slices_wrap_into_rows(wide_study, workdir, mlflow_uri):
    from PIL import Image

    from hpo.reports.render import COLUMN_PX, SLICE_COLS, plotly_figures

    d = report_data(wide_study, mlflow_uri)
    figs = plotly_figures(wide_study, d)
    assert {"history", "parallel", "slice", "curves"} <= set(figs)
    for key, fig in figs.items():
        assert fig.layout.width is None or fig.layout.width <= COLUMN_PX, key
    sliced = figs["slice"]
    panels = [a for a in sliced.layout if a.startswith("xaxis")]
    assert len(panels) == 9  # one per hyperparameter
    starts = {round(sliced.layout[a].domain[0], 3) for a in panels}
    tops = {round(sliced.layout["y" + a[1:]].domain[1], 3) for a in panels}
    assert len(starts) == SLICE_COLS == 3 and len(tops) == 3  # three rows of three
    titles = {a.text for a in sliced.layout.annotations}
    assert set(WIDE_SPACE) <= titles  # each panel names its parameter
    out = write_report(wide_study, workdir / "rep", mlflow_uri)
    with Image.open(out / "slice.png") as png:
        assert png.width <= COLUMN_PX and png.height > png.width / 2  # rows, not one strip


@pytest.mark.skipif(not chromium(), reason="chromium not installed")
def test_report_page_has_no_horizontal_scroll_in_headless_chromium(
    wide_study, workdir, mlflow_uri
):
    out = write_report(wide_study, workdir / "rep", mlflow_uri)
    page = (out / "index.html").read_text()
    measure = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var el = document.documentElement;
  el.setAttribute('data-scroll-width', String(el.scrollWidth));
  el.setAttribute('data-inner-width', String(window.innerWidth));
  var widest = 0;
  document.querySelectorAll('.main-svg').forEach(function (svg) {
    widest = Math.max(widest, svg.getBoundingClientRect().width); });
  el.setAttribute('data-widest-chart', String(widest));
}, 2000); });
</script></body>"""
    measured = out / "measured.html"
    measured.write_text(page.replace("</body>", measure))
    for window in ((1280, 900), (1000, 800)):
        dom = rendered_dom(measured, workdir / "chrome", window)
        html_tag = re.search(r"<html[^>]*>", dom).group(0)
        assert "data-script-errors" not in html_tag, html_tag
        scroll = int(re.search(r'data-scroll-width="(\d+)"', html_tag).group(1))
        inner = int(re.search(r'data-inner-width="(\d+)"', html_tag).group(1))
        widest = float(re.search(r'data-widest-chart="([\d.]+)"', html_tag).group(1))
        assert inner == window[0] and scroll <= inner, (window, scroll, inner)
        assert 0 < widest <= min(1100, inner), (window, widest)


def test_a_study_tracked_at_a_redacted_url_is_reported_without_connecting_to_it(workdir):
    """A password is never stored: a study tracked at postgresql://u:***@... cannot be
    reached from its record, so the report is written without its curves."""
    from conftest import _free_port

    study = stored_study("redacted", EVEN, [0.5 + 0.4 * p for p in EVEN], run_ids=True)
    study.set_user_attr("tracking_uri", f"postgresql://hpo:***@127.0.0.1:{_free_port()}/mlflow")
    assert report_data(study).curves == {}
    out = write_report(study, workdir / "out")
    assert (out / "index.html").is_file() and (out / "report.md").is_file()


def test_baselines_are_left_out_of_the_importances(workdir):
    """A baseline has no sampled parameters: counted in, it would leave none common to all."""
    from hpo.reports.data import importance_study

    study = stored_study("with-baseline", EVEN, [0.5 + 0.4 * p for p in EVEN])
    study.add_trial(
        optuna.trial.create_trial(
            params={}, distributions={}, value=0.99, user_attrs={"baseline": "b", "n_params": 9}
        )
    )
    derived = importance_study(study)
    assert len(derived.trials) == N
    assert {"lr", "dropout"} <= set(derived.trials[0].params)
    assert param_importances(study)["lr"] > param_importances(study)["dropout"]


def test_fanova_finds_the_one_parameter_that_matters_where_ped_anova_credits_a_constant():
    """Why the report uses fANOVA, not Optuna's default (the README says so): 20 trials whose
    value only lr decides, and a parameter count that never varies."""
    import warnings

    study = optuna.create_study(direction="maximize")
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
    }
    for i in range(20):
        study.add_trial(
            optuna.trial.create_trial(
                params={
                    "lr": 1e-4 * 1000 ** (i / 20),
                    "dropout": 0.45 + 0.05 * ((i * 7) % 20) / 20,
                },
                distributions=dists,
                value=0.5 + 0.02 * i,
                user_attrs={"n_params": 2410},
            )
        )
    ours = param_importances(study)
    assert ours["lr"] > 0.8 and ours["n_params"] < 0.01
    from hpo.reports.data import importance_study

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ped = optuna.importance.get_param_importances(
            importance_study(study), evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        )
    assert ped["lr"] < 0.8 and ped["n_params"] > 0.1  # a constant credited
