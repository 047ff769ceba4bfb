"""Bad input of every kind: one line per problem, exit 2, no traceback, nothing written."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
import yaml
from conftest import small_spec, write_spec
from typer.testing import CliRunner

from hpo.cli import app

ALIAS_BOMB = """name: bomb
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
search_space: *h
"""
HUGE_GRID = {
    "study": {"sampler": {"name": "grid"}},
    "search_space": {"width": {"type": "int", "low": 1, "high": 100_000_000}},
}


def refused(folder, *args) -> str:
    """Run `hpo ARGS` in `folder`: exit 2, no traceback, nothing written there; the output."""
    before = sorted(p.name for p in folder.iterdir())
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert sorted(p.name for p in folder.iterdir()) == before
    return result.output


@pytest.mark.parametrize("command", ["validate", "run"])
def test_spec_files_that_are_not_sound_yaml(workdir, command):
    (workdir / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    out = refused(workdir, command, "latin1.yaml")
    assert (
        out.strip()
        == "error: latin1.yaml: not UTF-8 text (byte 0xe9 at offset 9); save it as UTF-8"
    )

    text = yaml.safe_dump(small_spec(), sort_keys=False)
    (workdir / "dup.yaml").write_text(text + "name: again\n")
    out = refused(workdir, command, "dup.yaml")
    assert "dup.yaml: line " in out and "duplicate key 'name' (first on line 1); keep one" in out

    (workdir / "bomb.yaml").write_text(ALIAS_BOMB)
    out = refused(workdir, command, "bomb.yaml")
    assert "expands to more than 100,000 values" in out

    (workdir / "folder.yaml").mkdir()
    assert "a folder, not a spec file" in refused(workdir, command, "folder.yaml")


def _peak_rss_mb(spec_path) -> float:
    """Peak memory of `hpo validate SPEC` in a child process, in MB."""
    code = (
        "import resource, sys\n"
        "from typer.testing import CliRunner\n"
        "from hpo.cli import app\n"
        f"r = CliRunner().invoke(app, ['validate', {str(spec_path)!r}])\n"
        "assert r.exit_code == 2, r.output\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # Linux: KiB


def test_an_alias_bomb_and_a_huge_grid_are_refused_in_little_memory(workdir):
    (workdir / "bomb.yaml").write_text(ALIAS_BOMB)
    grid = write_spec(workdir, small_spec(**HUGE_GRID), "grid.yaml")
    baseline = _peak_rss_mb(workdir / "missing.yaml")  # the interpreter and hpo's imports
    for path in (workdir / "bomb.yaml", grid):
        assert _peak_rss_mb(path) - baseline < 200
    assert resource.RLIMIT_AS  # the measure is the child's own peak (ru_maxrss), not a timing


def test_a_huge_grid_names_the_range_and_the_way_out(workdir):
    path = write_spec(workdir, small_spec(**HUGE_GRID))
    out = refused(workdir, "validate", path)
    assert "study.sampler: the grid has more than 100,000 points" in out
    assert "search_space.width alone has 100,000,000 values" in out and "step:" in out
    per_layer = small_spec(
        study={"sampler": {"name": "grid"}},
        search_space={
            "n_layers": 1_000_000,
            "width": {"type": "categorical", "choices": [8, 16], "per_layer": True},
        },
    )
    assert "the grid has more than" in refused(workdir, "validate", write_spec(workdir, per_layer))


@pytest.mark.parametrize(
    ("name", "shown"),
    [("../../x", "'../../x'"), ("/etc/x", "'/etc/x'"), ("a" * 3000, "(3,000 characters)")],
)
def test_study_names_that_could_write_elsewhere_are_refused(workdir, name, shown):
    out = refused(workdir, "validate", write_spec(workdir, small_spec(name=name)))
    assert "name: must be 1 to 100 letters, digits, '-', '_' or '.'" in out and shown in out
    out = refused(workdir, "run", write_spec(workdir, small_spec()), "--study-name", name)
    assert out.startswith("error: --study-name: must be 1 to 100 letters")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"dataset": {"split": {"seed": -1}}}, "dataset.split.seed: must be between 0 and"),
        (
            {"study": {"sampler": {"name": "tpe", "n_startup_trials": "abc"}}},
            "study.sampler.n_startup_trials: must be an integer (got 'abc')",
        ),
        (
            {"study": {"pruner": {"name": "hyperband", "max_resource": 0}}},
            "study.pruner.max_resource: must be >= 1 (got 0)",
        ),
        (
            {"study": {"pruner": {"name": "median", "n_warmup_steps": 2.5}}},
            "study.pruner.n_warmup_steps: must be an integer (got 2.5)",
        ),
    ],
)
def test_options_that_validate_used_to_pass_and_run_failed_on(workdir, override, expected):
    out = refused(workdir, "validate", write_spec(workdir, small_spec(**override)))
    assert expected in out


def test_a_split_too_small_to_stratify_is_refused_before_anything_is_written(workdir):
    spec = write_spec(workdir, small_spec(dataset={"split": {"val": 0.001}}))
    out = refused(workdir, "run", spec)
    assert "dataset.split.val: 0.001 of " in out
    assert "each side needs at least one row per class (10 classes)" in out


def _table(folder, rows: list[str], name: str = "t.csv"):
    (folder / name).write_text("\n".join(rows) + "\n")
    return small_spec(dataset={"name": "csv", "path": name, "target": "label"}, task="auto")


def test_tables_with_missing_targets_infinite_values_or_huge_one_hot(workdir):
    good = [f"{i % 7},{i * 0.5},{i % 3}" for i in range(60)]
    spec = _table(workdir, ["a,b,label", *good[:10], "1,2,", *good[10:], "3,4,"])
    out = refused(workdir, "validate", write_spec(workdir, spec))
    assert "dataset.target: 2 of 62 rows of t.csv have no 'label' value (lines 12, 63)" in out
    assert "dataset.drop_missing_target: true" in out
    spec["dataset"]["drop_missing_target"] = True
    ok = CliRunner().invoke(app, ["validate", str(write_spec(workdir, spec))])
    assert ok.exit_code == 0, ok.output

    spec = _table(workdir, ["a,b,label", *good[:5], "inf,1,1", *good[5:]])
    out = refused(workdir, "validate", write_spec(workdir, spec))
    assert "1 rows of t.csv have an infinite feature value (lines 7)" in out

    ids = [f"id-{i},{i},{i % 2}" for i in range(1500)]
    spec = _table(workdir, ["a,b,label", *ids])
    out = refused(workdir, "validate", write_spec(workdir, spec))
    assert "one-hot encode into 1,500 features (at most 1,000); column 'a'" in out


def test_a_data_path_that_is_not_a_table_is_named_without_its_contents(workdir):
    (workdir / "secret.txt").write_text("root:$6$hash-Sekrit:19000:0:99999:7:::\n")
    spec = small_spec(
        dataset={"name": "csv", "path": "secret.txt", "target": "label"}, task="auto"
    )
    out = refused(workdir, "validate", write_spec(workdir, spec))
    assert "reads as one column only: not a csv table with a target column" in out
    assert "Sekrit" not in out
    (workdir / "adir").mkdir()
    spec["dataset"]["path"] = "adir"
    out = refused(workdir, "validate", write_spec(workdir, spec))
    assert "dataset.path: a folder, not a file:" in out


@pytest.mark.parametrize("name", ["../../x", "/etc/cron.d", "..", "a/../../b", "", "ok-name"])
def test_report_folders_stay_inside_reports_whatever_the_stored_study_name(name):
    from pathlib import Path

    from hpo.config import folder_name

    folder = (Path("reports") / folder_name(name)).resolve()
    assert folder.parent == Path("reports").resolve()
    assert folder_name("ok-name") == "ok-name"
