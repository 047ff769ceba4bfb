"""Drawing a report: a self-contained HTML page (Optuna's plotly charts) and Markdown with PNGs."""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import optuna

from hpo.diagnose import FIT_LABELS, RULES
from hpo.objectives import primary
from hpo.objectives import show as show_quantity
from hpo.reports.data import (
    ADVICE_RULES,
    IMPORTANCE,
    ReportData,
    importance_study,
    parallel_studies,
)

COLUMN_PX = 1100  # the page's column (body max-width): no figure may be wider
SLICE_COLS = 3  # slice panels per row
TRIAL_COLOURS = ["#c6dbef", "#08306b"]  # slice markers, first trial to last: all visible

# Collects script errors on the page so that a headless browser check can read them off the DOM.
_ERROR_HOOK = """<script>
window.addEventListener('error', function (e) {
  var el = document.documentElement;
  var seen = el.getAttribute('data-script-errors') || '';
  el.setAttribute('data-script-errors', seen + e.message + '|');
});
</script>"""
_STYLE = """<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; box-sizing: border-box; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } code, pre { background: #f6f6f6; padding: 2px 4px; }
.overfit { color: #b03030; } .underfit { color: #a06000; } .good { color: #207020; }
.unstable { color: #7030a0; }
</style>"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _value(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if se is None else f"{v:.4f} ± {se:.4f}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
    )


def facts(d: ReportData) -> list[tuple[str, str]]:
    """The study at a glance, as (label, value) rows shared by both renderings."""
    o = d.overview
    sp = o.split
    if sp.get("folds"):
        split = (
            f"{sp['folds']}-fold cross-validation of {sp['n_train']} rows (about "
            f"{sp['n_val']} validation rows a fold) / {sp['n_test']} test"
        )
    else:
        split = f"{sp['n_train']} train / {sp['n_val']} validation / {sp['n_test']} test"
    rows = [
        ("Study", o.study),
        ("Dataset", f"{o.dataset} ({o.task}): {split}; test split {sp['test_source']}"),
        ("Split hash", str(sp["split_hash"])),
        ("Budget", f"{o.budget} trials" if o.budget else "?"),
        *([("Stopped before the budget", o.stopped_because)] if o.stopped_because else []),
        ("Trials", ", ".join(f"{n} {s.lower()}" for s, n in o.states.items())),
        (
            "Wall time",
            f"{_duration(o.wall_time_s)} (first start to last end; "
            f"{_duration(o.trial_time_s)} inside trials)",
        ),
    ]
    if o.members:
        rows.append(
            ("Each trial", f"the mean of {o.members} trained as one cohort, ± its standard error")
        )
    if o.best_number is not None:
        best = f"#{o.best_number}: {o.metric} = {_value(o.best_value, o.best_se)}"
        rows.append(("Best trial", best + (" (the best mean)" if o.best_se else "")))
        if o.best_se is not None:
            close = ", ".join(f"#{n} {_value(v, se)}" for n, v, se in o.close)
            rows.append((
                "Within one standard error of the best",
                f"{close}: the validation does not tell these apart from the best"
                if close else "none: the best leads every other trial by more than its "
                "standard error",
            ))  # fmt: skip
        config = {k: v for k, v in o.best_config.items() if k != "width"}
        rows.append(
            ("Best hyperparameters", ", ".join(f"{k}={_fmt(v)}" for k, v in config.items()))
        )
    if o.test_metrics:
        test = ", ".join(f"{k} = {v:.4f}" for k, v in o.test_metrics.items())
        rows.append(("Test metrics", test))
        rows.append(
            (
                "Use of the test split",
                f"once, after the search, by trial #{o.test_trial}, {o.test_model}"
                if o.test_model
                else f"once, after the search, by the kept weights of trial #{o.test_trial}",
            )
        )
    else:
        rows.append(("Use of the test split", "not used: no trial completed"))
    if e := o.ensemble:
        members = ", ".join(f"#{n} weight {w:.2g}" for n, w in e["members"].items())
        metric = o.metric.removeprefix("val_")
        rows.append((
            "Ensemble of the best trials",
            f"{members} ({e['size']} rounds of greedy selection with replacement from the best "
            f"{len(e['candidates'])}, on validation): val_{metric} = {e[f'val_{metric}']:.4f}, "
            f"test_{metric} = {e[f'test_{metric}']:.4f}; model {e['model_uri']}",
        ))  # fmt: skip
    if o.baselines:
        rows.append(("Against the baselines", "; ".join(o.baselines)))
    if d.front is not None:
        rows += _front_facts(d.front)
    return rows


class _Known(optuna.importance.BaseImportanceEvaluator):
    """Hands Optuna's importance charts the importances `report_data` already computed."""

    def __init__(self, values: dict[str, float]):
        self.values = values

    def evaluate(self, study, params=None, *, target=None) -> dict[str, float]:
        return dict(self.values)


def optuna_charts(study: optuna.Study, d: ReportData, vis: Any) -> dict[str, Callable[[], Any]]:
    """Optuna's charts for the study, each a call that draws it with `vis`: the plotly module
    `optuna.visualization` or its `matplotlib` twin (same functions, same arguments)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    target = d.overview.metric
    charts: dict[str, Callable[[], Any]] = {}
    if not complete:
        return charts
    several = len(study.directions) > 1  # Optuna's charts then plot the `target` given
    one = {"target": primary, "target_name": target} if several else {"target_name": target}
    charts["history"] = partial(vis.plot_optimization_history, study, **one)
    if several and len(study.directions) <= 3:
        charts["front"] = partial(_front_chart, vis, study, d)
    derived = importance_study(study) if d.importances else None
    if derived is not None:
        known = _Known(d.importances)
        charts["importances"] = partial(vis.plot_param_importances, derived, evaluator=known)
    for key, _title, trials in parallel_studies(study):
        charts[key] = partial(vis.plot_parallel_coordinate, trials, **one)
    return charts


def _front_chart(vis: Any, study: optuna.Study, d: ReportData) -> Any:
    """Optuna's Pareto-front chart (every complete trial, the front and the infeasible ones
    told apart), with the study's model marked: a plotly figure, or matplotlib axes."""
    names = [n for n, _ in d.front["objectives"]] if d.front else None
    drawn = vis.plot_pareto_front(study, target_names=names, include_dominated_trials=True)
    chosen = d.overview.best_number
    if chosen is None or len(study.directions) != 2:
        return drawn
    x, y = study.trials[chosen].values[:2]
    label = f"the study's model (#{chosen})"
    if hasattr(drawn, "add_trace"):  # plotly
        import plotly.graph_objects as go

        star = {"symbol": "star", "size": 16, "color": "black"}
        drawn.add_trace(go.Scatter(x=[x], y=[y], mode="markers", name=label, marker=star))
    else:
        drawn.scatter([x], [y], marker="*", s=250, color="black", label=label, zorder=5)
        drawn.legend()
    return drawn


def front_rows(d: ReportData) -> tuple[list[str], list[list[str]]]:
    """The front as a table: each trial on it, its objectives' values, the model marked."""
    assert d.front is not None
    names = list(d.front["front"][0]["values"]) if d.front["front"] else []
    rows = [
        [f"{r['number']}", *(show_quantity(r["values"].get(n)) for n in names),
         "the study's model" if r["number"] == d.front["chosen"] else ""]
        for r in d.front["front"]
    ]  # fmt: skip
    return ["trial", *names, ""], rows


def _front_facts(front: dict[str, Any]) -> list[tuple[str, str]]:
    names = ", ".join(
        f"{n} ({'max' if d == 'maximize' else 'min'})" for n, d in front["objectives"]
    )
    on = ", ".join(f"#{r['number']}" for r in front["front"])
    out = [
        ("Objectives", names),
        ("Pareto front" if len(front["objectives"]) > 1 else "Best feasible",
         f"{len(front['front'])} of {front['complete']} complete trials: {on}"),
        ("The study's model", f"#{front['chosen']}, {front['rule']}"
         if front["chosen"] is not None else "none: no feasible trial completed"),
    ]  # fmt: skip
    if front["infeasible"]:
        bad = "; ".join(f"#{n}: {', '.join(w)}" for n, w in front["infeasible"].items())
        out.append(("Infeasible (study.constraints)", f"{len(front['infeasible'])}: {bad}"))
    return out


def slice_data(study: optuna.Study, d: ReportData) -> list[tuple[str, str, list[Any]]]:
    """What the slice chart shows: (parameter, axis "linear" | "log" | "category", complete
    trials that have it), parameters by importance. Baselines are left out (no params)."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.params and primary(t) is not None
    ]
    if len(complete) < 2:
        return []
    names = sorted({k for t in complete for k in t.params})
    rank = {k: i for i, k in enumerate(d.importances)}
    names.sort(key=lambda k: (rank.get(k, len(rank)), k))
    out = []
    for name in names:
        have = [t for t in complete if name in t.params]
        dist = have[0].distributions[name]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            axis = "category"
        else:
            axis = "log" if getattr(dist, "log", False) else "linear"
        out.append((name, axis, have))
    return out


def _slice_x(axis: str, trials: list[Any], name: str) -> list[Any]:
    return [str(t.params[name]) if axis == "category" else t.params[name] for t in trials]


def slice_figure(study: optuna.Study, d: ReportData) -> Any | None:
    """The metric against each parameter, one small panel each, SLICE_COLS to a row, as wide
    as the page's column and no wider (Optuna's own puts them all in one row, 300 px each)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = slice_data(study, d)
    if not panels:
        return None
    cols = min(SLICE_COLS, len(panels))
    rows = math.ceil(len(panels) / cols)
    numbers = [t.number for _, _, trials in panels for t in trials]
    span = max(numbers) - min(numbers)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[name for name, _, _ in panels],
        horizontal_spacing=0.08,
        vertical_spacing=min(0.3 / rows, 0.12) if rows > 1 else 0.1,
    )
    for i, (name, axis, trials) in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        fig.add_trace(
            go.Scatter(
                x=_slice_x(axis, trials, name),
                y=[primary(t) for t in trials],
                mode="markers",
                marker={
                    "color": [t.number for t in trials],
                    "coloraxis": "coloraxis",
                    "size": 7,
                    "line": {"width": 0.5, "color": "grey"},
                },
                customdata=[t.number for t in trials],
                hovertemplate=f"trial #%{{customdata}}<br>{name} = %{{x}}<br>"
                f"{d.overview.metric} = %{{y:.4g}}<extra></extra>",
                showlegend=False,
            ),
            row,
            col,
        )
        fig.update_xaxes(type=axis, row=row, col=col, tickfont={"size": 10})
    fig.update_yaxes(title_text=d.overview.metric, col=1, tickfont={"size": 10})
    fig.update_layout(
        title=f"{d.overview.metric} against each parameter (colour: trial number)",
        height=110 + 250 * rows,
        coloraxis={
            "colorscale": [[0, TRIAL_COLOURS[0]], [1, TRIAL_COLOURS[1]]],
            # trial numbers: whole ones, about 6 of them
            "colorbar": {"title": {"text": "trial"}, "tick0": 0, "dtick": max(1, span // 6)},
        },
        margin={"l": 60, "r": 20, "t": 80, "b": 40},
    )
    fig.update_annotations(font_size=12)
    return fig


def plotly_figures(study: optuna.Study, d: ReportData) -> dict[str, Any]:
    """Optuna's own plotly charts, plus the learning curves."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    figs: dict[str, Any] = {key: draw() for key, draw in optuna_charts(study, d, vis).items()}
    sliced = slice_figure(study, d)
    if sliced is not None:
        figs["slice"] = sliced
    if d.curves:
        fig = go.Figure()
        for number, curves in d.curves.items():
            role = d.curve_roles.get(number, "")
            for key, dash in (("train_loss", "dot"), ("val_loss", "solid")):
                ys = curves.get(key, [])
                fig.add_trace(
                    go.Scatter(
                        x=list(range(1, len(ys) + 1)),
                        y=ys,
                        mode="lines",
                        line={"dash": dash},
                        name=f"#{number} {role} {key}",
                    )
                )
        fig.update_layout(
            title="Learning curves (dotted: train, solid: validation)",
            xaxis_title="epoch",
            yaxis_title="loss",
            yaxis_type="log",
        )
        figs["curves"] = fig
    return figs


def _parallel_html(study: optuna.Study, chart: Callable[[str], str]) -> list[str]:
    """The parallel-coordinates charts: every searched trial on the parameters they all have,
    then one per conditional parameter over the trials it applies to."""
    panels = parallel_studies(study)
    if not panels:
        return [chart("parallel")]
    out = []
    for i, (key, title, _) in enumerate(panels):
        if i == 1:
            out.append("<p>Parameters that apply to some trials only, over those trials:</p>")
        out += [f"<p class='panel'>{html.escape(title.capitalize())}</p>", chart(key)]
    return out


def render_html(study: optuna.Study, d: ReportData) -> str:
    """A page that opens offline from disk: plotly.js is inlined, nothing is fetched."""
    from plotly.offline import get_plotlyjs

    figs = plotly_figures(study, d)

    def chart(key: str) -> str:
        if key not in figs:
            return "<p><em>Not enough complete trials for this chart.</em></p>"
        return figs[key].to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{key}",
            config={"responsive": True},
        )

    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>hpo report: {e(d.overview.study)}</title>",
        _ERROR_HOOK,
        _STYLE,
        f"<script>{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>Study {e(d.overview.study)}</h1>",
        "<h2>At a glance</h2><table>",
        *[f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts(d)],
        "</table>",
        *_baselines_html(d),
        *_front_html(d, chart),
        "<h2>Optimisation history</h2>",
        chart("history"),
        "<h2>What mattered</h2>",
        f"<p>{IMPORTANCE}; <code>n_params</code> is the model's "
        "parameter count, derived from depth and widths.</p>",
        chart("importances"),
        "<h3>Parallel coordinates</h3>",
        *_parallel_html(study, chart),
        "<h3>Slices</h3>",
        chart("slice"),
        "<h2>Fit diagnosis</h2>",
        f"<p>{e(_fit_sentence(d))}</p>",
        f"<p class='rules'>{e(RULES)}</p>",
        chart("curves"),
        "<table><tr><th>trial</th><th>state</th><th>value</th><th>fit</th><th>evidence</th></tr>",
        *[
            f"<tr><td>{r.number}</td><td>{r.state}</td><td>{_value(r.value, r.se)}</td>"
            f"<td class='{r.label}'>{r.label}</td><td>{e(r.evidence)}</td></tr>"
            for r in d.fit_rows
        ],
        "</table>",
        "<h2>Search-space advice</h2>",
        *_advice_html(d),
        "</body></html>",
    ]
    return "\n".join(parts)


def _front_html(d: ReportData, chart: Callable[[str], str]) -> list[str]:
    if d.front is None or len(d.front["objectives"]) < 2:
        return []
    e = html.escape
    header, rows = front_rows(d)
    return [
        "<h2>Pareto front</h2>",
        f"<p>The study's model (the star) is {e(d.front['rule'])}. Every complete trial is "
        "drawn; Optuna marks the front as its best trials, and the trials that break "
        "study.constraints as infeasible.</p>",
        chart("front"),
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>",
        *["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows],
        "</table>",
    ]


def _fit_sentence(d: ReportData) -> str:
    c = d.fit_counts
    return ", ".join(f"{c[label]} {label}" for label in FIT_LABELS) + "."


def _baseline_model(config: dict[str, Any]) -> str:
    widths = config.get("widths") or []
    if not widths:
        model = "depth 0, the perceptron: no hidden layer (a linear model)"
    else:
        model = f"hidden layers {'x'.join(str(w) for w in widths)} ({config.get('activation')})"
    return f"{model}; {config.get('optimizer')}, lr {_fmt(config.get('lr'))}"


def baseline_table(d: ReportData) -> tuple[list[str], list[list[str]]]:
    """The baselines, one row each: header and cells."""
    header = ["baseline", "trial", "model", d.overview.metric, "fit"]
    rows = [
        [
            b.name,
            f"#{b.number}",
            _baseline_model(b.config),
            f"{b.value:.4f}" if b.state == "COMPLETE" and b.value is not None else b.state.lower(),
            f"{b.fit}: {b.evidence}" if b.fit else "-",
        ]
        for b in d.baselines
    ]
    return header, rows


def _baselines_html(d: ReportData) -> list[str]:
    if not d.baselines:
        return []
    e = html.escape
    header, rows = baseline_table(d)
    return [
        "<h3>Baselines</h3>",
        "<p>Fixed configurations trained first, the reference points the search has to beat.</p>",
        "<table id='baselines'><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>",
        *[
            f"<tr><td>{e(r[0])}</td><td>{e(r[1])}</td><td>{e(r[2])}</td><td>{e(r[3])}</td>"
            f"<td class='{e(b.fit or '')}'>{e(r[4])}</td></tr>"
            for r, b in zip(rows, d.baselines, strict=True)
        ],
        "</table>",
    ]


def _advice_lines(d: ReportData) -> list[str]:
    lines = []
    for a in d.advice:
        where = f"[{_fmt(a.current[0])}, {_fmt(a.current[1])}]"
        parts = []
        if a.trend is not None:
            t = a.trend
            parts.append(
                f"{a.metric} keeps improving toward the {a.edge} edge of {where} (Spearman "
                f"rho = {t.rho:+.2f} over {t.n_trials} trials, p = {t.p_value:.2g}; the best "
                f"trial has {a.param} = {_fmt(t.best_at)})"
            )
        if "crowd" in a.reasons:
            parts.append(
                f"{a.share:.0%} of the best trials sit at the {a.edge} edge"
                + ("" if parts else f" of {where}")
            )
        todo = "raise the upper bound" if a.edge == "high" else "lower the lower bound"
        lines.append(f"{a.param}: {'; '.join(parts)}; {todo}:")
    return lines


def continue_line(d: ReportData) -> str:
    """How to go on from this study with the advised ranges, without starting over."""
    name = d.overview.study
    return (
        "Paste the ranges into a copy of the spec under a new name (NEW.yaml), then continue "
        f"from this study's trials: hpo run NEW.yaml --warm-start {name} (its trials that fit "
        "the new space are added, not counted in the new budget)."
    )


NO_ADVICE = "No numeric range has its best values crowded against an edge or a metric still "
NO_ADVICE += "improving toward one."


def _advice_html(d: ReportData) -> list[str]:
    e = html.escape
    out = [f"<p class='rules'>{e(ADVICE_RULES)}</p>"]
    if not d.advice:
        out.append(f"<p>{NO_ADVICE}</p>")
    for line, a in zip(_advice_lines(d), d.advice, strict=True):
        out.append(f"<p>{e(line)}</p><pre>{e(a.snippet)}</pre>")
    if d.advice:
        out.append(f"<p>{e(continue_line(d))}</p>")
    if d.flat:
        out.append(f"<p>Barely matter here (importance under 5%): {e(', '.join(d.flat))}.</p>")
    return out


def render_markdown(d: ReportData, images: dict[str, str]) -> str:
    """The same report as Markdown, with the PNG figures beside it."""
    lines = [f"# Study {d.overview.study}", "", "## At a glance", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in facts(d)]
    if d.baselines:
        header, rows = baseline_table(d)
        lines += ["", "### Baselines", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    if d.front is not None and len(d.front["objectives"]) > 1:
        header, rows = front_rows(d)
        lines += ["", "## Pareto front", "", f"The study's model is {d.front['rule']}.", ""]
        if "front" in images:
            lines += [f"![Pareto front]({images['front']})", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    for title, key in (
        ("Optimisation history", "history"),
        ("What mattered", "importances"),
        ("Parallel coordinates", "parallel"),
        ("Slices", "slice"),
    ):
        lines += ["", f"## {title}", ""]
        lines.append(
            f"![{title}]({images[key]})" if key in images else "_Not enough complete trials._"
        )
        if key == "parallel":  # then one per conditional parameter, over its trials
            for extra in (k for k in images if k.startswith("parallel-")):
                what = f"Trials with {extra.removeprefix('parallel-')}"
                lines += ["", f"{what}:", "", f"![{what}]({images[extra]})"]
    if d.importances:
        lines += ["", IMPORTANCE + ".", "", "| parameter | importance |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in d.importances.items()]
    lines += ["", "## Fit diagnosis", "", _fit_sentence(d), "", RULES, ""]
    if "curves" in images:
        lines += [f"![Learning curves]({images['curves']})", ""]
    lines += ["| trial | state | value | fit | evidence |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r.number} | {r.state} | {_value(r.value, r.se)} | {r.label} | {r.evidence} |"
        for r in d.fit_rows
    ]
    lines += ["", "## Search-space advice", "", ADVICE_RULES, ""]
    if not d.advice:
        lines.append(NO_ADVICE)
    for line, a in zip(_advice_lines(d), d.advice, strict=True):
        lines += [line, "", "```yaml", a.snippet, "```", ""]
    if d.advice:
        lines += [continue_line(d), ""]
    if d.flat:
        lines.append(f"Barely matter here (importance under 5%): {', '.join(d.flat)}.")
    return "\n".join(lines) + "\n"


def write_pngs(study: optuna.Study, d: ReportData, out: Path) -> dict[str, str]:
    """Optuna's matplotlib charts and the learning curves as PNGs; returns key -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as mvis

    made: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    draws = optuna_charts(study, d, mvis)
    n_params = len({k for t in complete for k in t.params})
    for key, draw in draws.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            draw()
            wide = key.startswith("parallel") and n_params > 4
            plt.gcf().set_size_inches(max(10, 2.4 * n_params) if wide else 10, 5)
            plt.tight_layout()
            plt.savefig(out / f"{key}.png", dpi=80)
        plt.close("all")
        made[key] = f"{key}.png"
    if _slice_png(study, d, out / "slice.png"):
        made["slice"] = "slice.png"
    if d.curves:
        fig, ax = plt.subplots(figsize=(10, 5))
        for number, curves in d.curves.items():
            role = d.curve_roles.get(number, "")
            for key, style in (("train_loss", ":"), ("val_loss", "-")):
                ys = curves.get(key, [])
                ax.plot(range(1, len(ys) + 1), ys, style, label=f"#{number} {role} {key}")
        ax.set(
            xlabel="epoch",
            ylabel="loss",
            yscale="log",
            title="Learning curves (dotted: train, solid: validation)",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=80)
        plt.close("all")
        made["curves"] = "curves.png"
    return made


def _log_ticks(xs: list[Any]) -> tuple[list[float], Callable[[float], str]]:
    """Up to four ticks spread evenly on a log axis over `xs`, and their labels: whole
    numbers for an integer parameter (widths 117 to 140: 117, 124, 132, 140, not 1.2e+02
    twice), else as few significant digits as keep the labels apart."""
    lo, hi = min(xs), max(xs)
    spread = [lo] if lo == hi else [lo * (hi / lo) ** (i / 3) for i in range(4)]
    if all(isinstance(x, int) for x in xs):
        ticks = sorted({round(t) for t in spread})
        return [float(t) for t in ticks], lambda v: f"{round(v)}"
    for digits in (2, 3, 4, 6):
        if len({f"{t:.{digits}g}" for t in spread}) == len(spread):
            break
    return spread, lambda v: f"{v:.{digits}g}"


def _slice_png(study: optuna.Study, d: ReportData, path: Path) -> bool:
    """The slice chart as a PNG: SLICE_COLS panels to a row, 800 px wide."""
    import matplotlib.pyplot as plt

    panels = slice_data(study, d)
    if not panels:
        return False
    cols = min(SLICE_COLS, len(panels))
    rows = math.ceil(len(panels) / cols)
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, NullLocator

    fig, axes = plt.subplots(rows, cols, figsize=(10, 0.6 + 2.8 * rows), squeeze=False)
    numbers = [t.number for _, _, ts in panels for t in ts]
    norm = plt.Normalize(min(numbers), max(numbers))
    cmap = LinearSegmentedColormap.from_list("trials", TRIAL_COLOURS)
    dots = None
    for ax, (name, axis, trials) in zip(axes.flat, panels, strict=False):
        xs = _slice_x(axis, trials, name)
        dots = ax.scatter(
            xs,
            [primary(t) for t in trials],
            c=[t.number for t in trials],
            cmap=cmap,
            norm=norm,
            edgecolors="grey",
            linewidths=0.5,
        )
        if axis == "log":  # four labelled ticks, none of matplotlib's crowded minor labels
            ax.set_xscale("log")
            ticks, label = _log_ticks(xs)
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(lambda v, _, label=label: label(v))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
        elif axis == "linear" and all(isinstance(x, int) for x in xs):
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(d.overview.metric, fontsize=9)
    fig.suptitle(f"{d.overview.metric} against each parameter (colour: trial number)")
    fig.tight_layout()
    if dots is not None:
        bar = fig.colorbar(dots, ax=axes.ravel().tolist(), label="trial", shrink=0.8)
        bar.locator = MaxNLocator(integer=True)  # trial numbers: no 2.5
        bar.update_ticks()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def to_json(d: ReportData) -> str:
    """The report data as JSON, for scripts: named tuples become objects with their names."""

    def plain(o: Any) -> Any:
        if hasattr(o, "_asdict"):
            return {k: plain(v) for k, v in o._asdict().items()}
        if isinstance(o, dict):
            return {str(k): plain(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [plain(v) for v in o]
        return o

    return json.dumps(plain(d), default=str, indent=1)
