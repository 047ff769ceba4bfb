"""What the study benchmarks share: a shipped spec as a dict that runs from any folder, and
writing a benchmark's rows (JSON) and its table (Markdown)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def shipped_spec(name: str) -> dict:
    """search_spaces/NAME as a dict, its data path made absolute."""
    path = ROOT / "search_spaces" / name
    spec = yaml.safe_load(path.read_text())
    if spec["dataset"].get("path"):  # relative to the shipped spec's folder
        spec["dataset"]["path"] = str((path.parent / spec["dataset"]["path"]).resolve())
    return spec


def write_results(out: str, stem: str, rows: list[dict], render: Callable[[list], str]) -> None:
    """OUT/STEM.json (the rows) and OUT/STEM.md (the table), and the table printed."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    (folder / f"{stem}.md").write_text(render(rows))
    print(render(rows))
