"""Comparing studies: the data (best values, cost to reach them, fit labels, seed noise), then
an HTML page and Markdown with a PNG."""

from __future__ import annotations

import html
import math
import statistics
from pathlib import Path
from typing import NamedTuple

import optuna
from optuna.trial import TrialState

from hpo.diagnose import FIT_LABELS
from hpo.objectives import primary


class StudySummary(NamedTuple):
    name: str
    data: str  # the dataset and its split, e.g. "digits (1149 train / 288 val / 360 test)"
    data_key: tuple  # what must be equal for two studies' values to compare: dataset, split
    metric: str
    maximize: bool
    best_value: float | None
    best_number: int | None
    test_metrics: dict[str, float]
    states: dict[str, int]
    fit_counts: dict[str, int]
    trials_to_best: int | None  # finished trials up to and including the best one
    time_to_best_s: float | None
    wall_time_s: float
    best_so_far: list[tuple[int, float, float]]  # (finished trial index, elapsed s, best value)


class SeedStats(NamedTuple):
    name: str
    key: str  # the metric summarised, e.g. test_accuracy
    values: list[float]
    mean: float
    half_width: float  # of the 95% interval (Student's t)
    source: str = "seeds"  # "seeds": retrained with --reseed; "members": the best's repeats/folds


class CompareData(NamedTuple):
    studies: list[StudySummary]
    reseed: list[SeedStats]  # empty unless --reseed
    verdict: str


def summarise(study: optuna.Study) -> StudySummary:
    """One study's side of the comparison.

    Interrupted trials (Ctrl-C, --timeout, a lost worker) are left out of the curves and the
    counts, as they are out of n_trials: they never finished, and hpo runs their configurations
    again. Only their number is kept, for the page to say so.
    """
    from hpo.outcomes import best_or_none, state_counts, was_interrupted

    maximize = study.directions[0].name == "MAXIMIZE"
    trials = study.get_trials(deepcopy=False)
    finished = sorted(
        (
            t
            for t in trials
            if t.state.is_finished() and t.datetime_complete and not was_interrupted(t)
        ),  # the trials that count toward n_trials, in the order they finished
        key=lambda t: t.datetime_complete,
    )
    start = min((t.datetime_start for t in finished if t.datetime_start), default=None)
    best_so_far: list[tuple[int, float, float]] = []
    best_value, best_at = None, None
    for i, t in enumerate(finished, start=1):
        if t.state == TrialState.COMPLETE and (
            best_value is None
            or (primary(t) > best_value if maximize else primary(t) < best_value)
        ):
            best_value, best_at = primary(t), (i, (t.datetime_complete - start).total_seconds())
        if best_value is not None:
            best_so_far.append((i, (t.datetime_complete - start).total_seconds(), best_value))
    fits = [t.user_attrs.get("fit") for t in finished]
    best = best_or_none(study)
    info = study.user_attrs.get("data", {})
    sizes = " / ".join(
        f"{info[f'n_{k}']} {k}" for k in ("train", "val", "test") if f"n_{k}" in info
    )
    return StudySummary(
        name=study.study_name,
        data=f"{info.get('dataset', '?')} ({sizes})" if sizes else str(info.get("dataset", "?")),
        data_key=(info.get("dataset"), info.get("split_hash")),
        metric=study.user_attrs.get("metric", "value"),
        maximize=maximize,
        best_value=best_value,
        best_number=best.number if best else None,
        test_metrics=study.user_attrs.get("test_metrics", {}),
        states=state_counts(trials),  # INTERRUPTED apart
        fit_counts={k: fits.count(k) for k in FIT_LABELS},
        trials_to_best=best_at[0] if best_at else None,
        time_to_best_s=best_at[1] if best_at else None,
        wall_time_s=best_so_far[-1][1] if best_so_far else 0.0,
        best_so_far=best_so_far,
    )


def seed_stats(
    name: str, key: str, rows: list[dict[str, float]], source: str = "seeds"
) -> SeedStats:
    """Mean and 95% interval of one metric over reseeded retrainings (or members)."""
    from scipy import stats

    values = [r[key] for r in rows if key in r]
    mean = statistics.fmean(values) if values else math.nan
    if len(values) > 1:
        sem = statistics.stdev(values) / math.sqrt(len(values))
        half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    else:
        half = math.nan
    return SeedStats(name, key, values, mean, half, source)


def differences(studies: list[StudySummary]) -> str:
    """'' when the studies ran on the same data and split with the same metric; else what
    differs, in one sentence: then their values do not compare, reseeded or not."""
    a = studies[0]
    said = []
    for s in studies[1:]:
        known = a.data_key[0] is not None and s.data_key[0] is not None  # older studies: ?
        if known and s.data_key != a.data_key:
            said.append(f"{a.name} and {s.name} ran on different data ({a.data}; {s.data})")
        if s.metric != a.metric:
            said.append(
                f"{a.name} and {s.name} measure different metrics ({a.metric}; {s.metric})"
            )
    if not said:
        return ""
    return (
        "; ".join(said) + ": their values are not comparable, and retraining with new seeds "
        "(--reseed) would not make them so."
    )


def verdict(reseed: list[SeedStats], differ: str = "") -> str:
    """Whether the difference between the first two studies is larger than the seed noise."""
    if differ:
        return differ
    if len(reseed) < 2:
        return "Run with --reseed K (K >= 2) to weigh the difference against seed noise."
    from scipy import stats

    a, b = reseed[0], reseed[1]
    if a.key != b.key:
        return (
            f"{a.name} and {b.name} are measured on different metrics ({a.key}, {b.key}): "
            "their retrainings cannot be weighed against each other."
        )
    if len(a.values) < 2 or len(b.values) < 2:
        return "Too few successful retrainings to estimate the seed noise."
    diff = a.mean - b.mean
    if a.source == "members":  # measured in the search itself: nothing was retrained
        how = f"{len(a.values)} and {len(b.values)} members of the best trials (repeats, folds)"
        if float(
            stats.ttest_ind(a.values, b.values, equal_var=False).pvalue
        ) < 0.05:  # fmt: skip
            return (
                f"{a.key}: {a.name} {a.mean:.4f} vs {b.name} {b.mean:.4f} (difference "
                f"{diff:+.4f}) is larger than the spread of {how} (Welch's t-test p < 0.05)."
            )
        return (
            f"{a.key}: {a.name} {a.mean:.4f} vs {b.name} {b.mean:.4f} (difference {diff:+.4f}) "
            f"is within the spread of {how} (Welch's t-test): the best configurations cannot "
            "be told apart."
        )
    t = stats.ttest_ind(a.values, b.values, equal_var=False)
    p = float(t.pvalue) if not math.isnan(t.pvalue) else 1.0
    if p < 0.05:
        return (
            f"{a.key}: {a.name} {a.mean:.4f} vs {b.name} {b.mean:.4f} (difference {diff:+.4f}) "
            f"is larger than the seed noise (Welch's t-test p = {p:.3g}, {len(a.values)} and "
            f"{len(b.values)} seeds)."
        )
    return (
        f"{a.key}: {a.name} {a.mean:.4f} vs {b.name} {b.mean:.4f} (difference {diff:+.4f}) is "
        f"within the seed noise (Welch's t-test p = {p:.3g}, {len(a.values)} and {len(b.values)} "
        f"seeds): the retrained best configurations cannot be told apart."
    )


def compare_data(studies: list[optuna.Study], reseed: int = 0) -> CompareData:
    """Everything `hpo compare` shows, retraining each best configuration `reseed` times."""
    from hpo.study import retrain_best

    summaries = [summarise(s) for s in studies]
    differ = differences(summaries)
    stats_rows: list[SeedStats] = []
    if reseed > 0 and not differ:  # retraining would not make them comparable
        for study, summary in zip(studies, summaries, strict=True):
            if summary.best_number is None:
                continue
            rows = retrain_best(study, seeds=[10_000 + i for i in range(reseed)])
            key = "test_accuracy" if any("test_accuracy" in r for r in rows) else "test_rmse"
            stats_rows.append(seed_stats(study.study_name, key, rows))
            val_key = "val_" + key[len("test_") :]
            stats_rows.append(seed_stats(study.study_name, val_key, rows))
    tests = [s for s in stats_rows if s.key.startswith("test_")]
    if not stats_rows and not differ:
        # The spread the search measured: each best trial's members (repeats, folds), on
        # validation; no retraining needed.
        for study, summary in zip(studies, summaries, strict=True):
            best = study.trials[summary.best_number] if summary.best_number is not None else None
            members = best.user_attrs.get("members", []) if best else []
            values = [{summary.metric: m["value"]} for m in members if m["value"] is not None]
            if len(values) > 1:
                stats_rows.append(seed_stats(study.study_name, summary.metric, values, "members"))
        tests = stats_rows if len(stats_rows) == len(studies) else []
        if not tests:
            stats_rows = []
    return CompareData(summaries, stats_rows, verdict(tests, differ))


# ---------------------------------------------------------------- drawing


def _table(d: CompareData) -> tuple[list[str], list[list[str]]]:
    header = [
        "study",
        "data",
        "best value",
        "test",
        "trials to best",
        "time to best",
        "wall time",
        "complete / pruned / failed / interrupted",
        " / ".join(FIT_LABELS),
    ]
    rows = []
    for s in d.studies:
        test = ", ".join(f"{k} {v:.4f}" for k, v in s.test_metrics.items() if "loss" not in k)
        rows.append(
            [
                s.name,
                s.data,
                f"{s.metric} {s.best_value:.4f}" if s.best_value is not None else "-",
                test or "-",
                str(s.trials_to_best or "-"),
                f"{s.time_to_best_s:.0f}s" if s.time_to_best_s is not None else "-",
                f"{s.wall_time_s:.0f}s",
                " / ".join(
                    str(s.states[k]) for k in ("COMPLETE", "PRUNED", "FAIL", "INTERRUPTED")
                ),
                " / ".join(str(s.fit_counts[k]) for k in FIT_LABELS),
            ]
        )
    return header, rows


def _seed_rows(d: CompareData) -> list[list[str]]:
    return [
        [
            s.name,
            s.key,
            f"{s.mean:.4f} ± {s.half_width:.4f}",
            str(len(s.values)),
            ", ".join(f"{v:.4f}" for v in s.values),
        ]
        for s in d.reseed
    ]


def metric_groups(d: CompareData) -> list[tuple[str, list[StudySummary]]]:
    """The studies by the metric they optimise, in order of first appearance: one row of
    panels each, as accuracy and RMSE cannot share an axis."""
    groups: dict[str, list[StudySummary]] = {}
    for s in d.studies:
        groups.setdefault(s.metric, []).append(s)
    return list(groups.items())


def _axis_title(metric: str, studies: list[StudySummary]) -> str:
    better = "higher" if studies[0].maximize else "lower"
    return f"best {metric} so far ({better} is better)"


def notes(d: CompareData) -> list[str]:
    """What the page says about its curves: which metric each row shows, what was left out."""
    groups = metric_groups(d)
    if len(groups) > 1:
        rows = "; ".join(
            f"row {i}: {m} ({', '.join(s.name for s in ss)})"
            for i, (m, ss) in enumerate(groups, 1)
        )
        out = [
            f"The studies optimise different metrics, so each has its own row of panels: {rows}."
        ]
    else:
        out = [f"Both panels show the best {groups[0][0]} so far." if groups else ""]
    out += [
        f"{s.name}: {n} interrupted trial{'s' if n != 1 else ''} "
        "(Ctrl-C, --timeout or a lost worker) left out of the curves and counts: they never "
        "finished, do not count toward n_trials, and hpo runs their configurations again."
        for s in d.studies
        if (n := s.states["INTERRUPTED"])
    ]
    return [line for line in out if line]


def best_so_far_figure(d: CompareData):
    """Best value so far by finished trial and by wall time: one row of two panels per metric,
    a marker on every finished trial (a study with one finished trial is one point)."""
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS as COLORS
    from plotly.subplots import make_subplots

    groups = metric_groups(d)
    titles = [f"{m}: {by}" for m, _ in groups for by in ("by finished trial", "by wall time")]
    fig = make_subplots(
        rows=max(len(groups), 1), cols=2, subplot_titles=titles, vertical_spacing=0.15
    )
    colour = {s.name: COLORS[i % len(COLORS)] for i, s in enumerate(d.studies)}
    for row, (metric, studies) in enumerate(groups, start=1):
        for s in studies:
            xs = [p[0] for p in s.best_so_far]
            ts = [p[1] for p in s.best_so_far]
            ys = [p[2] for p in s.best_so_far]
            common = {
                "mode": "lines+markers",
                "name": s.name,
                "legendgroup": s.name,
                "line": {"color": colour[s.name]},
                "marker": {"size": 7},
            }
            fig.add_trace(go.Scatter(x=xs, y=ys, **common), row, 1)
            fig.add_trace(go.Scatter(x=ts, y=ys, showlegend=False, **common), row, 2)
        fig.update_yaxes(title_text=_axis_title(metric, studies), row=row, col=1)
        most = max((len(s.best_so_far) for s in studies), default=1)
        step = max(1, math.ceil(most / 10))  # whole trials only
        fig.update_xaxes(title_text="finished trial", dtick=step, row=row, col=1)
        fig.update_xaxes(title_text="wall time (s)", row=row, col=2)
    fig.update_layout(title="Best value so far", height=150 + 330 * max(len(groups), 1))
    return fig


def render_compare_html(d: CompareData) -> str:
    """A self-contained page: the table, best-so-far curves by trial and by time, seed noise."""
    from plotly.offline import get_plotlyjs

    from hpo.reports.render import _ERROR_HOOK, _STYLE

    fig = best_so_far_figure(d)
    e = html.escape
    header, rows = _table(d)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>hpo compare</title>",
        _ERROR_HOOK,
        _STYLE,
        f"<script>{get_plotlyjs()}</script></head><body>",
        f"<h1>Comparing {e(', '.join(s.name for s in d.studies))}</h1>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>",
        *["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows],
        "</table>",
        *[f"<p class='note'>{e(line)}</p>" for line in notes(d)],
        fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id="chart-best-so-far",
            config={"responsive": True},
        ),
        "<h2>Seed noise</h2>",
    ]
    if d.reseed:
        parts += [
            "<table><tr><th>study</th><th>metric</th><th>mean ± 95% interval</th>"
            "<th>seeds</th><th>values</th></tr>"
        ]
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in _seed_rows(d)]
        parts.append("</table>")
    parts += [f"<p>{e(d.verdict)}</p>", "</body></html>"]
    return "\n".join(parts)


def render_compare_markdown(d: CompareData, image: str | None) -> str:
    """The comparison as Markdown."""
    header, rows = _table(d)
    lines = [
        f"# Comparing {', '.join(s.name for s in d.studies)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *notes(d)]
    if image:
        lines += ["", f"![Best value so far]({image})"]
    lines += ["", "## Seed noise", ""]
    if d.reseed:
        lines += [
            "| study | metric | mean ± 95% interval | seeds | values |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in _seed_rows(d)]
        lines.append("")
    lines.append(d.verdict)
    return "\n".join(lines) + "\n"


def write_compare(
    studies: list[optuna.Study], out: Path, reseed: int = 0, data: CompareData | None = None
) -> Path:
    """Write index.html, report.md and best_so_far.png comparing the studies (`data`: their
    `compare_data`, when already made); return the folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = data if data is not None else compare_data(studies, reseed)
    out.mkdir(parents=True, exist_ok=True)
    groups = metric_groups(d)
    fig, axes = plt.subplots(
        max(len(groups), 1), 2, figsize=(11, 0.5 + 3.5 * max(len(groups), 1)), squeeze=False
    )
    from matplotlib.ticker import MaxNLocator

    colour = {s.name: f"C{i % 10}" for i, s in enumerate(d.studies)}  # the same in every row
    for (metric, members), (a1, a2) in zip(groups, axes, strict=False):
        a1.xaxis.set_major_locator(MaxNLocator(integer=True))
        for s in members:
            ys = [p[2] for p in s.best_so_far]
            style = {"marker": "o", "markersize": 4, "label": s.name, "color": colour[s.name]}
            a1.plot([p[0] for p in s.best_so_far], ys, **style)
            a2.plot([p[1] for p in s.best_so_far], ys, **style)
        a1.set(xlabel="finished trial", ylabel=_axis_title(metric, members), title=metric)
        a2.set(xlabel="wall time (s)", title=metric)
        a1.legend()
    fig.tight_layout()
    fig.savefig(out / "best_so_far.png", dpi=80)
    plt.close("all")
    (out / "report.md").write_text(render_compare_markdown(d, "best_so_far.png"))
    tmp = out / "index.html.part"
    tmp.write_text(render_compare_html(d))
    tmp.replace(out / "index.html")
    return out
