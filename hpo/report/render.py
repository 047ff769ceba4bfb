"""Drawing a report: a self-contained HTML page (Optuna's plotly charts) and Markdown with PNGs."""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from hpo.report.data import ReportData, importance_study

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
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } code, pre { background: #f6f6f6; padding: 2px 4px; }
.overfit { color: #b03030; } .underfit { color: #a06000; } .good { color: #207020; }
</style>"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _value(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


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
    rows = [
        ("Study", o.study),
        (
            "Dataset",
            f"{o.dataset} ({o.task}): {sp['n_train']} train / {sp['n_val']} validation / "
            f"{sp['n_test']} test; test split {sp['test_source']}",
        ),
        ("Split hash", str(sp["split_hash"])),
        ("Budget", f"{o.budget} trials" if o.budget else "?"),
        ("Trials", ", ".join(f"{n} {s.lower()}" for s, n in o.states.items())),
        (
            "Wall time",
            f"{_duration(o.wall_time_s)} (first start to last end; "
            f"{_duration(o.trial_time_s)} inside trials)",
        ),
    ]
    if o.best_number is not None:
        rows.append(("Best trial", f"#{o.best_number}: {o.metric} = {o.best_value:.4f}"))
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
                f"once, after the search, by the kept weights of trial #{o.test_trial}",
            )
        )
    else:
        rows.append(("Use of the test split", "not used: no trial completed"))
    if o.baselines:
        rows.append(("Against the baselines", "; ".join(o.baselines)))
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
    charts["history"] = lambda: vis.plot_optimization_history(study, target_name=target)
    derived = importance_study(study) if d.importances else None
    if derived is not None:
        known = _Known(d.importances)
        charts["importances"] = lambda: vis.plot_param_importances(derived, evaluator=known)
    if len(complete) >= 2:
        charts["parallel"] = lambda: vis.plot_parallel_coordinate(study, target_name=target)
        charts["slice"] = lambda: vis.plot_slice(study, target_name=target)
    return charts


def plotly_figures(study: optuna.Study, d: ReportData) -> dict[str, Any]:
    """Optuna's own plotly charts, plus the learning curves."""
    import plotly.graph_objects as go
    from optuna import visualization as vis

    figs: dict[str, Any] = {key: draw() for key, draw in optuna_charts(study, d, vis).items()}
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


def render_html(study: optuna.Study, d: ReportData) -> str:
    """A page that opens offline from disk: plotly.js is inlined, nothing is fetched."""
    from plotly.offline import get_plotlyjs

    figs = plotly_figures(study, d)

    def chart(key: str) -> str:
        if key not in figs:
            return "<p><em>Not enough complete trials for this chart.</em></p>"
        return figs[key].to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{key}")

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
        "<h2>Optimisation history</h2>",
        chart("history"),
        "<h2>What mattered</h2>",
        "<p>fANOVA importances over the complete trials; <code>n_params</code> is the model's "
        "parameter count, derived from depth and widths.</p>",
        chart("importances"),
        "<h3>Parallel coordinates</h3>",
        chart("parallel"),
        "<h3>Slices</h3>",
        chart("slice"),
        "<h2>Fit diagnosis</h2>",
        f"<p>{e(_fit_sentence(d))}</p>",
        chart("curves"),
        "<table><tr><th>trial</th><th>state</th><th>value</th><th>fit</th><th>evidence</th></tr>",
        *[
            f"<tr><td>{r.number}</td><td>{r.state}</td><td>{_value(r.value)}</td>"
            f"<td class='{r.label}'>{r.label}</td><td>{e(r.evidence)}</td></tr>"
            for r in d.fit_rows
        ],
        "</table>",
        "<h2>Search-space advice</h2>",
        *_advice_html(d),
        "</body></html>",
    ]
    return "\n".join(parts)


def _fit_sentence(d: ReportData) -> str:
    c = d.fit_counts
    return f"{c['good']} good, {c['overfit']} overfit, {c['underfit']} underfit (rules: README)."


def _advice_lines(d: ReportData) -> list[str]:
    lines = []
    for a in d.advice:
        lines.append(
            f"{a.param}: {a.share:.0%} of the best trials sit at the {a.edge} edge of "
            f"[{_fmt(a.current[0])}, {_fmt(a.current[1])}]; try a wider range:"
        )
    return lines


def _advice_html(d: ReportData) -> list[str]:
    e = html.escape
    out = []
    if not d.advice:
        out.append("<p>No numeric range has its best values crowded against an edge.</p>")
    for line, a in zip(_advice_lines(d), d.advice, strict=True):
        out.append(f"<p>{e(line)}</p><pre>{e(a.snippet)}</pre>")
    if d.flat:
        out.append(f"<p>Barely matter here (importance under 5%): {e(', '.join(d.flat))}.</p>")
    return out


def render_markdown(d: ReportData, images: dict[str, str]) -> str:
    """The same report as Markdown, with the PNG figures beside it."""
    lines = [f"# Study {d.overview.study}", "", "## At a glance", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in facts(d)]
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
    if d.importances:
        lines += ["", "| parameter | importance |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in d.importances.items()]
    lines += ["", "## Fit diagnosis", "", _fit_sentence(d), ""]
    if "curves" in images:
        lines += [f"![Learning curves]({images['curves']})", ""]
    lines += ["| trial | state | value | fit | evidence |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {r.number} | {r.state} | {_value(r.value)} | {r.label} | {r.evidence} |"
        for r in d.fit_rows
    ]
    lines += ["", "## Search-space advice", ""]
    if not d.advice:
        lines.append("No numeric range has its best values crowded against an edge.")
    for line, a in zip(_advice_lines(d), d.advice, strict=True):
        lines += [line, "", "```yaml", a.snippet, "```", ""]
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
            wide = key in ("slice", "parallel") and n_params > 4
            plt.gcf().set_size_inches(max(10, 2.4 * n_params) if wide else 10, 5)
            plt.tight_layout()
            plt.savefig(out / f"{key}.png", dpi=80)
        plt.close("all")
        made[key] = f"{key}.png"
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


def to_json(d: ReportData) -> str:
    """The report data as JSON, for scripts."""
    return json.dumps(
        d._asdict(), default=lambda o: o._asdict() if hasattr(o, "_asdict") else str(o), indent=1
    )
