"""The docs tell the truth: their spec examples validate, their links resolve, and no tracked file
points outside the repository.

Convention for the ```yaml blocks of README.md and docs/*.md (each is run through `hpo validate`
in-process, in a fresh folder where `data` is search_spaces/data, so `data/wine.csv` resolves as
it does for the example specs):

- A ```yaml block directly followed by a ```text block whose first line is `$ hpo validate FILE`
  is written to FILE as it stands; the rest of the text block must be exactly what the command
  prints (stdout and stderr), and the exit status 2 when that holds `error:` lines, else 0. This
  is how the docs show a bad spec and its messages.
- Any other ```yaml block must validate. One with a top-level `name:` is a complete spec; any
  other is a fragment made of whole top-level sections (`dataset:`, `study:`, ...), merged into
  MINIMAL below (mappings merged key by key, anything else replaced) and then validated.
- Shell commands, their output, and anything else that is not a spec go in ```sh or ```text.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

from hpo import registry
from hpo.cli import app
from hpo.config import (
    PARAMS,
    PRECISIONS,
    Categorical,
    DatasetSpec,
    EarlyStoppingSpec,
    FloatRange,
    IntRange,
    PrunerSpec,
    SamplerSpec,
    Spec,
    SplitSpec,
    StudySpec,
    TrackingSpec,
    TrainingSpec,
    default_config,
    parse_spec,
)

MINIMAL: dict[str, Any] = {
    "name": "doc-example",
    "dataset": {"name": "digits"},
    "search_space": {},
}
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SPEC_DOC = REPO / "docs" / "spec.md"
FENCE = re.compile(r"^(\s*)(`{3,})(\S*)\s*$")


def fenced_blocks(path: Path) -> list[dict[str, Any]]:
    """Every fenced block of a Markdown file: its info string, text and first and last lines."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, info = m.groups()
        end = i + 1
        while end < len(lines) and not re.match(rf"^\s*{ticks}\s*$", lines[end]):
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        blocks.append(
            {"info": info, "text": "\n".join(body) + "\n", "start": i + 1, "end": end + 1}
        )
        i = end + 1
    return blocks


def yaml_examples() -> list[Any]:
    """For each ```yaml block: its text, the file name to validate it as, and the output the docs
    say `hpo validate` prints for it (None: it must simply validate); its id is FILE:LINE."""
    out = []
    for path in DOCS:
        blocks = fenced_blocks(path)
        lines = path.read_text().splitlines()
        for k, b in enumerate(blocks):
            if b["info"] not in ("yaml", "yml"):
                continue
            expected, filename = None, "spec.yaml"
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            between = lines[b["end"] : nxt["start"] - 1] if nxt else []
            if nxt and nxt["info"] == "text" and not any(s.strip() for s in between):
                first, *rest = nxt["text"].splitlines()
                m = re.fullmatch(r"\$ hpo validate (\S+)", first.strip())
                if m:
                    filename, expected = m.group(1), rest
            where = f"{path.relative_to(REPO)}:{b['start']}"
            out.append(pytest.param(b["text"], filename, expected, id=where))
    return out


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def as_spec(text: str) -> str:
    """A block as a whole spec: itself when it has a top-level name, else merged into MINIMAL."""
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), "a ```yaml block must be a mapping (a spec or whole sections)"
    if "name" in doc:
        return text
    return yaml.safe_dump(merged(MINIMAL, doc), sort_keys=False)


@pytest.fixture
def spec_folder(tmp_path, monkeypatch):
    """A fresh working folder with `data` -> search_spaces/data; validate's downloads go
    nowhere (a warning where $HPO_DATA_DIR lacks the files) and never into the real cache."""
    (tmp_path / "data").symlink_to(REPO / "search_spaces" / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for mirror in ("HPO_MNIST_MIRROR", "HPO_FASHION_MNIST_MIRROR"):
        monkeypatch.setenv(mirror, "http://127.0.0.1:9/")  # nothing listens there
    return tmp_path


@pytest.mark.parametrize(("text", "filename", "expected"), yaml_examples())
def test_yaml_block_validates_or_prints_what_the_docs_say(spec_folder, text, filename, expected):
    (spec_folder / filename).write_text(text if expected is not None else as_spec(text))
    result = CliRunner().invoke(app, ["validate", filename])
    got = result.output.rstrip("\n").splitlines()
    if expected is None:
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        return
    assert got == expected, "the docs' output differs from hpo validate's:\n" + result.output
    errors = any(line.startswith("error: ") for line in expected)
    assert result.exit_code == (2 if errors else 0), result.output


def test_docs_have_yaml_examples():
    ids = [p.id for p in yaml_examples()]
    assert any(i.startswith("README.md:") for i in ids)
    assert sum(i.startswith("docs/spec.md:") for i in ids) >= 10


def test_every_default_example_holds_the_real_defaults():
    [block] = [b for b in fenced_blocks(SPEC_DOC) if "name: every-default" in b["text"]]
    spec = parse_spec(yaml.safe_load(block["text"]))
    default = parse_spec({**MINIMAL, "name": "every-default"})
    for key in ("dataset", "task", "training", "study", "tracking", "baselines"):
        assert getattr(spec, key) == getattr(default, key), key
    assert spec.space == default_config()


def test_hyperparameter_table_is_the_one_hpo_params_writes(tmp_path):
    from hpo.params import STRUCTURAL, sync_doc

    copy = tmp_path / "spec.md"
    shutil.copy(SPEC_DOC, copy)
    assert not sync_doc(str(copy)), "docs/spec.md's hyperparameters are stale: run `make docs`"
    rows = re.findall(
        r"^\| `(\w+)` \| (?:int|real|bool|name) \| .*? \| `([^`]+)` \|", SPEC_DOC.read_text(), re.M
    )
    table = {name: yaml.safe_load(value) for name, value in rows}
    assert table == {name: p.default for name, p in PARAMS.items()}
    # and the parallel page's fused trials name the structural ones, each
    parallel = (REPO / "docs" / "parallel.md").read_text()
    fused = parallel[parallel.index("- **Fused trials**") :][:1500]
    assert [name for name in STRUCTURAL if f"`{name}`" not in fused] == []


def test_spec_reference_names_every_key_and_value():
    spans = re.findall(r"`([^`\n]+)`", SPEC_DOC.read_text())
    words = {w for s in spans for w in re.split(r"[^\w]+", s) if w}
    models = (Spec, DatasetSpec, SplitSpec, IntRange, FloatRange, Categorical, TrainingSpec)
    models += (EarlyStoppingSpec,)
    models += (StudySpec, SamplerSpec, PrunerSpec, TrackingSpec)
    keys = {f for model in models for f in model.model_fields} - {"source_dir", "raw_text"}
    names = {n for reg in registry.ALL.values() for n in reg}
    wanted = keys | set(PARAMS) | names | set(PRECISIONS)
    assert not wanted - words, f"docs/spec.md does not mention: {sorted(wanted - words)}"


def test_readme_links_the_one_spec_reference():
    assert "](docs/spec.md)" in (REPO / "README.md").read_text()
    assert not (REPO / "docs" / "spec-format.md").exists()  # one reference: merged into it


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_stay_inside_the_repository_and_resolve(path):
    text = re.sub(r"^\s*```.*?^\s*```", "", path.read_text(), flags=re.M | re.S)
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        if not file:
            assert anchor in anchors, f"{path.name}: no heading for #{anchor}"
            continue
        resolved = (path.parent / file).resolve()
        assert resolved.is_relative_to(REPO), f"{path.name}: {target} is outside the repository"
        assert resolved.exists(), f"{path.name}: {target} does not exist"


# MNIST is read from $HPO_DATA_DIR. Where the test data lies is the test harness's business: the
# Makefile's default for HPO_DATA_DIR (the team's data folder beside the checkout) is the one
# line allowed to name that folder (tests/conftest.py falls back to the same one, built from
# REPO.parent, for a bare `pytest`). User docs, code, benchmarks, deploy files and example specs
# must not name it, nor this checkout's absolute location: they say $HPO_DATA_DIR.
ALLOWED_OUTSIDE = {"Makefile": re.compile(r"^HPO_DATA_DIR \?= \$\(abspath \.\./shared/data\)$")}


def test_no_tracked_file_points_outside_the_repository():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    outside = [re.escape("../" + "shared")]  # split, so that this line does not match itself
    if len(REPO.parts) > 2:  # this checkout's own absolute location and its neighbours
        outside.append(r"(?<![\w./-])" + re.escape(str(REPO.parent)) + r"/")
    pattern = re.compile("|".join(outside))
    found = []
    for name in filter(None, (f.decode() for f in files)):
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the work tree, not yet in the index
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            allowed = ALLOWED_OUTSIDE.get(name)
            if pattern.search(line) and not (allowed and allowed.match(line)):
                found.append(f"{name}:{n}: {line.strip()}")
    assert not found, "tracked files point outside the repository:\n" + "\n".join(found)


def test_make_bench_writes_the_performance_page_figures_and_nothing_else(tmp_path):
    """docs/performance.md's figures are the benchmark report's: the suite replaces the section
    of its device kind and leaves the rest of the page as written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("suite", REPO / "benchmarks" / "suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    page = tmp_path / "performance.md"
    original = (REPO / "docs" / "performance.md").read_text()
    page.write_text(original)
    results = {
        "device": "CPU, 2 threads", "gpu": False, "torch": "2.13.0", "mode": "quick",
        "date": "2026-12-07 12:00", "target_cap_s": 45.0,
        "trainer": {"rows": []}, "fused": [], "overhead": [], "target": [],
        "options": [{"option": "l1", "epoch_s": 0.5, "ratio": 1.06}],
        "seconds": {"options": 3.0},
    }  # fmt: skip
    suite.write_docs(results, page)
    written = page.read_text()
    cpu = written.split("<!-- bench:cpu:begin -->")[1].split("<!-- bench:cpu:end -->")[0]
    assert "Device: **CPU, 2 threads**, torch 2.13.0, quick suite, 2026-12-07 12:00" in cpu
    assert "| l1 | 0.500 s | 1.06x |" in cpu and "\n### 5. What each option costs" in cpu
    outside = re.sub(r"<!-- bench:cpu:begin -->.*<!-- bench:cpu:end -->", "", written, flags=re.S)
    assert outside == re.sub(
        r"<!-- bench:cpu:begin -->.*<!-- bench:cpu:end -->", "", original, flags=re.S
    )
    suite.write_docs(results, page)  # again: the same page, not a second copy
    assert page.read_text() == written
