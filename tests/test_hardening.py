"""Bad input of every kind: one line per problem, exit 2, no traceback, nothing written."""

from __future__ import annotations

import gzip
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import small_spec, tmpfs, write_spec
from optuna.trial import TrialState
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

    def snapshot() -> set[str]:
        """The working folder, the folders beside it, and hpo's cache: what could be written.
        Beside it, the names only: inside earlier tests' folders their own leftovers may still
        write (a Chromium helper in its profile, SQLite folding a journal as a connection is
        collected), which is not this command's doing."""
        cache = Path.home() / ".cache" / "hpo"
        seen = {f"here/{p.relative_to(folder)}" for p in folder.rglob("*")}
        seen |= {f"around/{p.name}" for p in folder.parent.iterdir()}
        seen |= {f"cache/{p}" for p in cache.rglob("*")} if cache.exists() else set()
        return seen

    before = snapshot()
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    after = snapshot()
    assert (sorted(after - before), sorted(before - after)) == ([], []), "written, removed"
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
        ({"dataset": {"split": {"seed": -1}}}, "dataset.split.seed: must be >= 0 (got -1)"),
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


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_split_too_small_to_stratify_is_refused_before_anything_is_written(workdir, command):
    spec = write_spec(workdir, small_spec(dataset={"split": {"val": 0.001}}))
    out = refused(workdir, command, spec)
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


# ---------------------------------------------------------------- IDX files


def _write_idx(path, arr) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _idx_folder(root, fault: str):
    """Four small MNIST-shaped IDX files in ROOT/mnist, one of them broken as FAULT says."""
    folder = root / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = {p: (np.arange(n) % 10).astype(np.uint8) for p, n in (("train", 60), ("t10k", 30))}
    images = {p: rng.integers(0, 255, (len(y), 4, 4), dtype=np.uint8) for p, y in labels.items()}
    if fault == "count":
        labels["train"] = labels["train"][:55]
    if fault == "label":
        labels["t10k"][[3, 17]] = 200
    for p in ("train", "t10k"):
        _write_idx(folder / f"{p}-images-idx3-ubyte.gz", images[p])
        _write_idx(folder / f"{p}-labels-idx1-ubyte.gz", labels[p])
    target = folder / "train-images-idx3-ubyte.gz"
    if fault == "random":
        target.write_bytes(rng.integers(0, 255, 4000, dtype=np.uint8).tobytes())
    if fault == "truncated":
        target.write_bytes(target.read_bytes()[:-40])
    return folder


IDX_FAULTS = {
    "random": "train-images-idx3-ubyte.gz: not a gzip file; expected a gzip-compressed IDX file",
    "truncated": "train-images-idx3-ubyte.gz: cut short; expected a gzip-compressed IDX file",
    "count": "train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz: 60 images but 55 "
    "labels; the counts must agree",
    "label": "t10k-labels-idx1-ubyte.gz: 2 labels outside 0..9 (#3 = 200, #17 = 200)",
}


@pytest.mark.parametrize("fault", list(IDX_FAULTS))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_broken_idx_files_are_named_with_the_problem(
    workdir, tmp_path_factory, monkeypatch, fault, command
):
    root = tmp_path_factory.mktemp("data")
    folder = _idx_folder(root, fault)
    monkeypatch.setenv("HPO_DATA_DIR", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    spec = write_spec(workdir, small_spec(dataset={"name": "mnist"}))
    out = refused(workdir, command, spec)
    assert out.strip() == f"error: {spec}: dataset: {folder}/{IDX_FAULTS[fault]}", out
    assert not (root / "cache").exists()  # nothing was downloaded over the broken files


def test_sound_idx_files_train(workdir, tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("data")
    _idx_folder(root, "none")
    monkeypatch.setenv("HPO_DATA_DIR", str(root))
    spec = write_spec(workdir, small_spec(dataset={"name": "mnist"}, study={"n_trials": 1}))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- models too large


@pytest.mark.parametrize(
    "space, needs",
    [
        (
            {"n_layers": 4, "width": 200_000},
            "(4 layers of 200,000 units, batch size 64) needs 2.9 TB",
        ),
        (
            {"n_layers": 1_000_000, "width": 128},
            "(1,000,000 layers of 128 units, batch size 64) needs 615.4 GB",
        ),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_model_too_large_for_the_machine_is_refused_with_the_numbers(
    workdir, space, needs, command
):
    spec = small_spec()
    spec["search_space"] = {**space, "batch_size": 64}
    out = refused(workdir, command, write_spec(workdir, spec))
    assert f"spec.yaml: search_space: its largest model {needs} (" in out, out
    assert "cpu has " in out and "available on this machine" in out
    assert "set training.max_params or training.memory_limit" in out
    assert len(out.strip().splitlines()) == 1


def test_the_estimate_bounds_the_real_model(workdir):
    """Parameters are counted as the model has them (an upper bound by batch norm's head)."""
    from hpo import resources
    from hpo.model import build_mlp, count_parameters

    shape = resources.Shape(n_features=64, n_outputs=10, n_rows=1797)
    model = build_mlp(64, 10, [300, 200, 100], batchnorm=True)
    fp = resources.footprint([(300, 1), (200, 1), (100, 1)], shape, 128)
    assert count_parameters(model) <= fp.params <= count_parameters(model) + 3 * 10
    assert fp.weights == 4 * fp.params * 6  # weights, grads, adam's 2, kept copy, CPU copy


def test_opting_in_fails_the_configurations_past_the_limit_as_trials(workdir):
    spec = small_spec(training={"max_params": 100_000}, study={"n_trials": 6})
    spec["search_space"] = {
        "n_layers": 2,
        "width": {"type": "categorical", "choices": [16, 200_000]},
        "batch_size": 64,
    }
    result = CliRunner().invoke(app, ["validate", str(write_spec(workdir, spec))])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["run", str(write_spec(workdir, spec))])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db").trials
    by_width = {t.number: t.params["width"] for t in trials}
    assert set(by_width.values()) == {16, 200_000}  # the sampler drew both
    for t in trials:
        if by_width[t.number] == 16:
            assert t.state == TrialState.COMPLETE
        else:
            assert t.state == TrialState.FAIL
            assert t.user_attrs["fail_reason"] == (
                "too large: 40,016,000,030 parameters > training.max_params 100,000"
            )


@pytest.mark.skipif(
    open("/proc/sys/vm/overcommit_memory").read().strip() == "1",
    reason="this kernel promises any allocation; a huge one would be OOM-killed instead",
)
def test_a_trial_that_runs_out_of_memory_fails_with_the_reason_and_the_study_goes_on(workdir):
    spec = small_spec(training={"max_params": 10**15}, study={"n_trials": 6})
    spec["search_space"] = {
        "n_layers": 1,
        "width": {"type": "categorical", "choices": [16, 10**11]},
        "batch_size": 64,
    }
    result = CliRunner().invoke(app, ["run", str(write_spec(workdir, spec))])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db").trials
    huge = [t for t in trials if t.params["width"] == 10**11]
    small = [t for t in trials if t.params["width"] == 16]
    assert huge and small
    assert all(t.state == TrialState.COMPLETE for t in small)
    for t in huge:
        assert t.state == TrialState.FAIL
        reason = t.user_attrs["fail_reason"]
        assert reason.startswith("out of memory (RuntimeError: "), reason
        assert "needs about 1745.2 TB (7,700,000,000,030 parameters: " in reason
        assert "cpu has " in reason


# ---------------------------------------------------------------- where hpo writes


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system holding a spec: even root cannot write there."""
    with tmpfs(tmp_path / "ro", "1m") as folder:
        write_spec(folder, small_spec(study={"n_trials": 1}))
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder


def test_a_read_only_working_folder_is_named_before_anything_is_written(
    read_only_folder, tmp_path, monkeypatch
):
    monkeypatch.chdir(read_only_folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    storage = f"sqlite:///{elsewhere / 'optuna.db'}"
    out = refused(elsewhere, "run", "spec.yaml", "--storage", storage)
    assert out.strip() == (
        f"error: spec.yaml: tracking.uri: cannot write mlflow.db in {read_only_folder} (on a "
        "read-only file system); run from a writable folder, or give --tracking-uri a store "
        "elsewhere"
    )
    out = refused(elsewhere, "run", "spec.yaml")
    assert f"spec.yaml: storage: cannot write optuna.db in {read_only_folder} (on a " in out

    # With both stores elsewhere, the study runs, and its artifacts go next to the tracking
    # store rather than into the read-only folder.
    tracking = f"sqlite:///{elsewhere / 'mlflow.db'}"
    result = CliRunner().invoke(
        app, ["run", "spec.yaml", "--storage", storage, "--tracking-uri", tracking]
    )
    assert result.exit_code == 0, result.output
    assert len(list((elsewhere / "mlruns" / "tiny").rglob("weights.pt"))) == 1  # the best's
    out = refused(elsewhere, "report", "tiny", "--storage", storage)
    assert out.strip() == (
        f"error: --out: cannot write the report in {read_only_folder} (on a read-only file "
        "system); give --out a writable folder"
    )
