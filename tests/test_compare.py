"""hpo compare: summaries from real studies, seed statistics, the verdict, the written files."""

from __future__ import annotations

import math

import optuna
import pytest
from conftest import small_spec, study_run

from hpo.config import parse_spec
from hpo.report.compare import SeedStats, seed_stats, summarise, verdict, write_compare
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
