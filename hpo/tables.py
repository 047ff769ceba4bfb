"""A csv or parquet dataset's files, checked before a run: each file readable, the target
column there and varying, no missing targets or infinite features unsaid, one-hot encoding
bounded, a test file with the training file's columns; and the task its target implies
against the study's metric.

Reading files is not parsing: `hpo.config.parse_spec` reads none, so a stored spec whose data
has moved still parses (`hpo report`, `hpo compare`); `hpo validate`, `hpo run` and
`run_study` call `check_files` before they load the data.
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd

from hpo.config import MAX_ONE_HOT, Spec, SpecError, metric_problems
from hpo.registry import DATASETS, did_you_mean


def check_files(spec: Spec) -> dict[str, pd.DataFrame]:
    """A csv or parquet spec's tables as read ("path", and "test_path" when given), or
    `SpecError` with every problem of its files; nothing for the other datasets."""
    entry = DATASETS.get(spec.dataset.name)
    if entry is None or entry.task is not None or "path" not in entry.requires:
        return {}
    detected, frames, problems = _check_table(spec)
    if spec.task == "auto" and detected is not None:
        problems += metric_problems(spec, detected)
    if problems:
        raise SpecError(problems)
    return frames


def _check_table(spec: Spec) -> tuple[str | None, dict[str, Any], list[str]]:
    """Check csv/parquet files and the target column: the task the target implies, the
    tables read, the problems."""

    problems: list[str] = []
    ds = spec.dataset
    detected = None
    frames: dict[str, Any] = {}
    for key in ("path", "test_path"):
        path = spec.data_path(key)  # type: ignore[arg-type]
        if path is None:
            continue
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "file not found"
            problems.append(f"dataset.{key}: {what}: {path}")
            continue
        if ds.target is None:
            continue
        try:
            if ds.name == "csv":
                frame = pd.read_csv(path)
            else:
                frame = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            # The error's words only, never the file's: it may be anything (a key, a password).
            why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else type(e).__name__
            problems.append(f"dataset.{key}: cannot read {path} as a {ds.name} table ({why})")
            continue
        if ds.target not in frame.columns:
            if len(frame.columns) < 2:
                problems.append(
                    f"dataset.{key}: {path} reads as one column only: not a {ds.name} table "
                    "with a target column"
                )
            else:
                cols = [str(c)[:40] for c in frame.columns[:50]]
                problems.append(
                    f"dataset.target: no column {ds.target!r} in {path.name}; "
                    f"{did_you_mean(ds.target, cols)}"
                )
            continue
        problems += _check_rows(frame, ds.target, key, path.name, ds.drop_missing_target)
        frames[key] = frame
        y = frame[ds.target].dropna()
        if key == "path":
            if y.nunique() < 2:
                problems.append(
                    f"dataset.target: column {ds.target!r} in {path.name} is constant "
                    f"(got {y.nunique()} distinct value); it must vary"
                )
            detected = infer_task(y)
    if len(frames) == 2:
        problems += _check_test_table(frames["path"], frames["test_path"], spec)
    return detected, frames, problems


def _check_test_table(train: Any, test: Any, spec: Spec) -> list[str]:
    """A test file has the training file's feature columns, of the same kinds, in any order
    (its labels are checked where they are encoded: `hpo.data`)."""
    ds = spec.dataset
    names = (spec.data_path("path").name, spec.data_path("test_path").name)  # type: ignore[union-attr]
    a = [c for c in train.columns if c != ds.target]
    b = [c for c in test.columns if c != ds.target]
    missing = [str(c) for c in a if c not in b]
    extra = [str(c) for c in b if c not in a]
    problems = []
    if missing or extra:
        said = [f"missing {', '.join(map(repr, missing[:10]))}"] if missing else []
        said += [f"extra {', '.join(map(repr, extra[:10]))}"] if extra else []
        problems.append(
            f"dataset.test_path: {names[1]} must have the feature columns of {names[0]} "
            f"(in any order): {'; '.join(said)}"
        )
    kinds = {"double": "numbers", "string": "text", "boolean": "true/false"}
    for c in a:
        if c in b and not test[c].isna().all() and not train[c].isna().all():
            k1, k2 = column_kind(train[c]), column_kind(test[c])
            if k1 != k2:
                problems.append(
                    f"dataset.test_path: column {str(c)!r} holds {kinds[k2]} in {names[1]} "
                    f"but {kinds[k1]} in {names[0]}; both files must hold the same kind"
                )
    return problems


def _rows(index: Any) -> str:
    """The first few offending rows, as line numbers of the file (its header is line 1)."""
    lines = [str(int(i) + 2) for i in list(index[:5])]
    return ", ".join(lines) + (", ..." if len(index) > 5 else "")


def _check_rows(frame: Any, target: str, key: str, name: str, drop_missing: bool) -> list[str]:
    """Missing targets, non-finite features and one-hot blow-ups, said out loud."""
    import numpy as np

    problems = []
    missing = frame.index[frame[target].isna()]
    if len(missing) and not drop_missing:
        problems.append(
            f"dataset.target: {len(missing):,} of {len(frame):,} rows of {name} have no "
            f"{target!r} value (lines {_rows(missing)}); fill them in, or set "
            "dataset.drop_missing_target: true to drop those rows"
        )
    features = frame.drop(columns=[target])
    numeric = features.select_dtypes(include="number")
    bad = numeric.index[np.isinf(numeric.to_numpy(dtype=float)).any(axis=1)]
    if len(bad):
        problems.append(
            f"dataset.{key}: {len(bad):,} rows of {name} have an infinite feature value "
            f"(lines {_rows(bad)}); fix or remove them (empty cells are fine: they become "
            "the training mean)"
        )
    text = features.drop(columns=numeric.columns)
    levels = {str(c): int(text[c].nunique()) for c in text.columns}
    if sum(levels.values()) > MAX_ONE_HOT:
        worst = max(levels, key=lambda c: levels[c])
        problems.append(
            f"dataset.{key}: the text columns of {name} one-hot encode into "
            f"{sum(levels.values()):,} features (at most {MAX_ONE_HOT:,}); column {worst!r} "
            f"alone has {levels[worst]:,} distinct values: drop it, or encode it as numbers"
        )
    return problems


def column_kind(column) -> str:  # column: pd.Series
    """How a deployed model takes a raw feature column: as get_dummies saw it in training."""
    if pd.api.types.is_bool_dtype(column):
        return "boolean"
    if pd.api.types.is_numeric_dtype(column) and not isinstance(column.dtype, pd.CategoricalDtype):
        return "double"
    return "string"


def infer_task(y: Any) -> Literal["classification", "regression"]:
    """Regression for floats with fractional values or many levels, else classification."""
    y = pd.Series(y).dropna()
    if pd.api.types.is_float_dtype(y):
        fractional = bool((y != y.round()).any())
        if fractional or y.nunique() > 20:
            return "regression"
        return "classification"
    if pd.api.types.is_integer_dtype(y) and y.nunique() > 20:
        return "regression"
    return "classification"
