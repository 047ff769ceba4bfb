"""Datasets: a registry of loaders, seeded splits, scaling fitted on train only, tensors on device.

The test split is held back: `Data.take_test()` hands it out once, for the final evaluation.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpo.config import Spec, SpecError
from hpo.redact import first_line
from hpo.registry import DATASETS
from hpo.tables import check_files, column_kind, infer_task


@dataclass
class RawData:
    """A dataset as loaded: features, targets, and an official test set when it has one."""

    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    classes: list[str] | None = None  # label names for classification, index = class id
    task: str = "classification"
    # What a deployed model takes (see hpo/serving.py), merged into `Data.prep`: for tables
    # {"kind": "table", "columns": [{"name", "type": double|string|boolean}], "encoded":
    # [one-hot column names], "target"}; for arrays {"kind": "array", "input": what a row is,
    # "input_divisor": what raw values were divided by when loaded (255 for IDX images)}.
    inputs: dict[str, Any] = field(default_factory=dict)
    frame: Any = None  # tables: pd.DataFrame of the training file's raw features, rows as in X
    class_values: list[Any] | None = None  # each class as in the data (classes are text)
    notes: list[str] = field(default_factory=list)  # what hpo did to the data, said at start
    test_dropped: int = 0  # test rows left out: labels the training file lacks


@dataclass
class Data:
    """Train and validation tensors on the training device; the test split held back."""

    task: str
    n_features: int
    n_outputs: int
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    info: dict[str, Any]
    # Regression targets are standardised; RMSE is reported in the original unit.
    y_scale: float = 1.0
    # What turns raw rows into the network's inputs and its outputs into answers (JSON),
    # and a few raw validation rows to show a deployed model's input.
    prep: dict[str, Any] = field(default_factory=dict)
    raw_example: Any = None
    _test: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # With `dataset.split.folds`: `train` is the whole training pool and `val` its first
    # fold; each fold is (training rows, validation rows), index tensors into `train`.
    folds: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def take_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The test split, handed out once: the final evaluation of the best model."""
        if self._test is None:
            raise RuntimeError("the test split was already used once")
        test, self._test = self._test, None
        return test


def resolve_device(device: str) -> torch.device:
    """auto = cuda, then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError([f"training.device: {device!r} asked for, but no CUDA GPU is available"])
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise SpecError(
            [f"training.device: {device!r} asked for, but this machine has {count} CUDA GPU(s), "
             f"cuda:0 to cuda:{count - 1}"]
        )  # fmt: skip
    return dev


def load_data(spec: Spec, device: str | torch.device = "cpu") -> Data:
    """Load, split, scale and move a spec's dataset to the device."""
    raw = DATASETS.load(spec.dataset.name)(spec)
    task = spec.task if spec.task != "auto" else raw.task
    sp = spec.dataset.split
    stratify = sp.stratify and task == "classification"
    n = len(raw.y)
    if raw.X_test is not None:
        pool = np.arange(n)
        test_idx = None
    else:
        pool, test_idx = _split(np.arange(n), raw.y, sp.test, sp.seed, stratify, "split.test")
    if spec.dataset.max_samples is not None and spec.dataset.max_samples < len(pool):
        keep = 1 - spec.dataset.max_samples / len(pool)
        pool, _ = _split(pool, raw.y, keep, sp.seed, stratify, "max_samples")
    folds = None
    if sp.folds is None:
        train_idx, val_idx = _split(pool, raw.y, sp.val, sp.seed + 1, stratify, "split.val")
    else:
        folds = _folds(raw.y[pool], sp.folds, sp.seed + 1, stratify)
        fewest = np.unique(raw.y[pool], return_counts=True)[1].min() if stratify else sp.folds
        if fewest < sp.folds:
            raw.notes.append(
                f"dataset.split.folds: the {sp.folds} folds are not stratified: a class has "
                f"{fewest} rows in the training pool, fewer than the folds"
            )
        train_idx, val_idx = pool, pool[folds[0][1]]  # the pool; its first fold's rows

    X_tr, X_va = raw.X[train_idx], raw.X[val_idx]
    if test_idx is None:
        X_te, y_te = raw.X_test, raw.y_test
    else:
        X_te, y_te = raw.X[test_idx], raw.y[test_idx]
    shift, scale = _fit_scaler(X_tr, spec.dataset.scale)
    y_tr, y_va = raw.y[train_idx], raw.y[val_idx]

    y_mean, y_std = 0.0, 1.0
    if task == "regression":
        y_mean, y_std = float(np.mean(y_tr)), float(np.std(y_tr)) or 1.0
        n_outputs = 1
    else:
        n_outputs = int(max(raw.y.max(), y_te.max() if len(y_te) else 0)) + 1

    dev = torch.device(device)

    def to_tensors(X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        X = np.nan_to_num((X.astype(np.float32) - shift) / scale)
        xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(dev)
        if task == "regression":
            yt = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32)).to(dev)
        else:
            yt = torch.from_numpy(y.astype(np.int64)).to(dev)
        return xt, yt

    h = hashlib.sha256()
    for idx in (train_idx, val_idx, test_idx if test_idx is not None else np.array([], int)):
        h.update(np.asarray(idx, dtype=np.int64).tobytes())
    for _, fold_val in folds or []:
        h.update(np.asarray(fold_val, dtype=np.int64).tobytes())
    prep: dict[str, Any] = {
        "task": task,
        "n_features": int(raw.X.shape[1]),
        "n_outputs": n_outputs,
        "shift": shift.tolist(),
        "scale": scale.tolist(),
        "y_mean": y_mean,
        "y_std": y_std,
    }
    if task == "classification":
        prep["classes"] = raw.class_values or raw.classes or list(range(n_outputs))
    example_rows = val_idx[:5]
    prep |= raw.inputs or {"kind": "array", "input": f"{raw.X.shape[1]} values a row"}
    if prep["kind"] == "table":
        example = raw.frame.iloc[example_rows].reset_index(drop=True)
        for column in prep["columns"]:  # numbers as double: an int column may hold a blank
            if column["type"] == "double":
                example[column["name"]] = example[column["name"]].astype(np.float64)
    else:
        divisor = prep.get("input_divisor", 1.0)  # raw values as the user has them
        example = raw.X[example_rows].astype(np.float32)
        if divisor != 1.0:
            example = np.rint(example * divisor)
    info = {
        "dataset": spec.dataset.name,
        "task": task,
        "n_features": int(raw.X.shape[1]),
        "n_classes": n_outputs if task == "classification" else None,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "folds": sp.folds,
        "n_test": len(y_te),
        "test_source": "official" if test_idx is None else f"split.test={sp.test}",
        "split_hash": h.hexdigest()[:16],
        "classes": raw.classes,
        "notes": raw.notes,
        "test_dropped": raw.test_dropped,
        "row": _row(prep),  # what `hpo predict` takes as one row
        # the training split's class frequencies: the fit diagnosis's chance level
        "class_counts": np.bincount(y_tr, minlength=n_outputs).tolist()
        if task == "classification"
        else None,
    }
    return Data(
        task=task,
        n_features=int(raw.X.shape[1]),
        n_outputs=n_outputs,
        train=to_tensors(X_tr, y_tr),
        val=to_tensors(X_va, y_va),
        info=info,
        y_scale=y_std,
        prep=prep,
        raw_example=example,
        _test=to_tensors(X_te, y_te),
        folds=None
        if folds is None
        else [(torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)) for a, b in folds],
    )


def _folds(
    y: np.ndarray, k: int, seed: int, stratify: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of the pool, shuffled with `seed` (stratified for classification, where every
    class has at least K rows): (training positions, validation positions) per fold."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if len(y) < 2 * k:
        raise SpecError(
            [f"dataset.split.folds: {k} folds of {len(y)} rows leave too few to train on; "
             f"at most {max(len(y) // 2, 2)}"]
        )  # fmt: skip
    if stratify and np.unique(y, return_counts=True)[1].min() >= k:
        splitter: Any = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    return [
        (a.astype(np.int64), b.astype(np.int64)) for a, b in splitter.split(np.zeros(len(y)), y)
    ]


def _row(prep: dict[str, Any]) -> str:
    """What one row of `hpo predict`'s input holds, in words."""
    if prep["kind"] == "table":
        names = [c["name"] for c in prep["columns"]]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        return f"a CSV with a header and the data file's feature columns ({shown})"
    if prep["input"].startswith(str(prep["n_features"])):
        return prep["input"]
    return f"{prep['n_features']} values, {prep['input']}"


def _split(
    idx: np.ndarray, y: np.ndarray, frac: float, seed: int, stratify: bool, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split off `frac` of `idx` (stratified when asked); a split that cannot be made is a
    `SpecError` naming `dataset.KEY` and the counts."""
    strat = y[idx] if stratify else None
    if strat is not None and np.min(np.unique(strat, return_counts=True)[1]) < 2:
        strat = None  # a class with a single sample cannot be stratified
    n_out = int(np.ceil(frac * len(idx)))
    n_classes = len(np.unique(strat)) if strat is not None else 1
    if min(n_out, len(idx) - n_out) < n_classes:
        need = "row" if strat is None else f"row per class ({n_classes} classes)"
        raise SpecError(
            [
                f"dataset.{key}: {frac:g} of {len(idx):,} rows leaves {n_out:,} on one side and "
                f"{len(idx) - n_out:,} on the other; each side needs at least one {need}"
            ]
        )
    a, b = _shuffle_split(len(idx), n_out, seed, strat)
    return np.sort(idx[a]), np.sort(idx[b])


def _shuffle_split(
    n: int, n_test: int, seed: int, strat: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions, the very ones scikit-learn's `train_test_split(...,
    test_size=frac, random_state=seed, stratify=strat)` picks, so a study's split stays what it
    was, without importing scikit-learn (2 s of every `hpo run`'s start on a small CPU);
    tests/test_data.py holds the two to the same output."""
    rng = np.random.RandomState(seed)
    if strat is None:  # ShuffleSplit
        perm = rng.permutation(n)
        return perm[n_test:], perm[:n_test]
    # StratifiedShuffleSplit: each class's share drawn by the approximate hypergeometric mode
    _, y_indices, counts = np.unique(strat, return_inverse=True, return_counts=True)
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(counts)[:-1])
    n_i = _approximate_mode(counts, n - n_test, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(counts)):
        perm = class_indices[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(perm[: n_i[i]])
        test.extend(perm[n_i[i] : n_i[i] + t_i[i]])
    return np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """scikit-learn's `_approximate_mode`: draws per class, ties broken by `rng`."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def _fit_scaler(X: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Shift and scale from the training split only; constant features are left unscaled."""
    X = X.astype(np.float64)
    seen = ~np.isnan(X)
    n = np.maximum(seen.sum(axis=0), 1)  # an all-empty column (said at load) stays at 0
    if how == "standard":
        shift = np.where(seen, X, 0.0).sum(axis=0) / n
        scale = np.sqrt(np.where(seen, (X - shift) ** 2, 0.0).sum(axis=0) / n)
    elif how == "minmax":
        shift = np.where(seen, X, np.inf).min(axis=0, initial=np.inf)
        scale = np.where(seen, X, -np.inf).max(axis=0, initial=-np.inf) - shift
        shift = np.where(np.isfinite(shift), shift, 0.0)
    else:
        shift, scale = np.zeros(X.shape[1]), np.ones(X.shape[1])
    scale = np.where((scale > 1e-12) & np.isfinite(scale), scale, 1.0)
    shift = np.nan_to_num(shift)
    return shift.astype(np.float32), scale.astype(np.float32)


# ---------------------------------------------------------------- built-in datasets


def load_digits(spec: Spec) -> RawData:
    """scikit-learn's bundled 8x8 digits, read from its file the way `load_digits` reads it
    (without importing scikit-learn, which takes seconds)."""
    package = importlib.util.find_spec("sklearn")  # found, not run
    if package is None or not package.submodule_search_locations:
        raise SpecError(["dataset.name: digits needs scikit-learn: pip install scikit-learn"])
    folder = Path(list(package.submodule_search_locations)[0])
    path = folder / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    classes = list(range(10))
    return RawData(
        X=data[:, :-1].astype(np.float32),
        y=data[:, -1].astype(np.int64),
        classes=[str(c) for c in classes],
        inputs={"kind": "array", "input": "8 x 8 pixel values 0-16, row by row"},
        class_values=classes,
    )


# Standard IDX files; md5 of the uncompressed bytes (MNIST) or of the .gz files as served.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MAX_IDX_BYTES = 2_000_000_000  # uncompressed; MNIST's largest file is 47 MB
MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": {
            "6bbc9ace898e44ae57da46a324031adb",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        },
        "train-labels-idx1-ubyte.gz": {
            "a25bea736e30d166cdddb491f175f624",
            "d53e105ee54ea40749a09fcbcd1e9432",
        },
        "t10k-images-idx3-ubyte.gz": {
            "2646ac647ad5339dbf082846283269ea",
            "9fb629c4189551a2d022fa330f9573f3",
        },
        "t10k-labels-idx1-ubyte.gz": {
            "27ae3e4e09519cfbb04c329615203637",
            "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": {"8d4fb7e6c68d591d4c3dfef9ec88bf0d"},
        "train-labels-idx1-ubyte.gz": {"25c81989df183df01b3e8a0aad5dffbe"},
        "t10k-images-idx3-ubyte.gz": {"bef4ecab320f06d8554ea6380940ec79"},
        "t10k-labels-idx1-ubyte.gz": {"bb300cfdad3c16e7a12a480ee83cd310"},
    },
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def cache_dir() -> Path:
    """Where downloaded datasets are kept: $XDG_CACHE_HOME/hpo, else ~/.cache/hpo."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hpo"


class NotDownloaded(SpecError):
    """A dataset that is not on this machine and could not be downloaded (no network): `hpo
    run` fails with it, `hpo validate` warns that the data was not checked."""


def find_idx_dir(name: str) -> Path:
    """The folder holding a dataset's four IDX files: $HPO_DATA_DIR/<name>/, then the cache,
    downloading into the cache when a network is there."""
    candidates = []
    if os.environ.get("HPO_DATA_DIR"):
        candidates.append(Path(os.environ["HPO_DATA_DIR"]) / name)
    cached = cache_dir() / name
    candidates.append(cached)
    for folder in candidates:
        if all((folder / f).is_file() for f in IDX_FILES.values()):
            return folder
    mirror = os.environ.get(f"HPO_{name.upper()}_MIRROR", MIRRORS[name])
    try:
        _download(name, mirror, cached)
    except OSError as e:
        where = " or ".join(str(c) for c in candidates)
        raise NotDownloaded(
            [
                f"dataset.name: {name} files not found in {where}, and the download from {mirror} "
                f"failed ({e}); put the four IDX .gz files ({', '.join(IDX_FILES.values())}) in "
                f"$HPO_DATA_DIR/{name}/ or {cached}/"
            ]
        ) from None
    return cached


def _download(name: str, mirror: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for fname in IDX_FILES.values():
        target = dest / fname
        if target.is_file():
            continue
        with urllib.request.urlopen(mirror + fname, timeout=30) as r:
            blob = r.read()
        if not _checksum_ok(name, fname, blob):
            raise OSError(f"checksum mismatch for {fname}")
        tmp = target.with_suffix(".part")
        tmp.write_bytes(blob)
        tmp.replace(target)  # never leave a half-written file under the real name


def _checksum_ok(name: str, fname: str, gz_blob: bytes) -> bool:
    known = CHECKSUMS[name][fname]
    if hashlib.md5(gz_blob).hexdigest() in known:
        return True
    try:
        return hashlib.md5(gzip.decompress(gz_blob)).hexdigest() in known
    except OSError:
        return False


def read_idx(path: Path) -> np.ndarray:
    """Read one gzip-compressed IDX file (unsigned bytes) into an array of its shape.

    A file that is not gzip, is cut short or is not an unsigned-byte IDX file is a `SpecError`
    naming the file; its bytes are never echoed."""
    try:
        with gzip.open(path, "rb") as f:
            blob = f.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as e:
        why = "cut short" if isinstance(e, EOFError) else "not a gzip file"
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.strerror:
            why = e.strerror
        raise SpecError([f"dataset: {path}: {why}; expected a gzip-compressed IDX file"]) from None
    if len(blob) > MAX_IDX_BYTES:
        raise SpecError([f"dataset: {path}: more than {MAX_IDX_BYTES:,} bytes uncompressed"])
    if len(blob) < 4:
        raise SpecError([f"dataset: {path}: {len(blob)} bytes; not an IDX file"])
    zero, dtype, ndim = struct.unpack(">HBB", blob[:4])
    if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 3 or len(blob) < 4 + 4 * ndim:
        raise SpecError([f"dataset: {path} is not an unsigned-byte IDX file"])
    shape = struct.unpack(f">{ndim}I", blob[4 : 4 + 4 * ndim])
    data = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(shape))
    if data.size != expected:
        raise SpecError(
            [f"dataset: {path} holds {data.size:,} values; its header says {expected:,}"]
        )
    return data.reshape(shape)


PIXEL_MAX = 255.0  # IDX images are stored 0-255 and trained on as value / 255


def _load_idx_dataset(name: str, classes: list[str], class_values: list[Any]) -> RawData:
    folder = find_idx_dir(name)
    arr = {k: read_idx(folder / f) for k, f in IDX_FILES.items()}
    problems = []
    for part in ("train", "test"):
        images, labels = arr[f"{part}_images"], arr[f"{part}_labels"]
        files = f"{IDX_FILES[part + '_images']} and {IDX_FILES[part + '_labels']}"
        if images.ndim != 3 or labels.ndim != 1:
            problems.append(
                f"dataset: {folder}/{files}: expected images of shape (n, rows, cols) and labels "
                f"of shape (n,), got {images.shape} and {labels.shape}"
            )
        elif len(images) != len(labels):
            problems.append(
                f"dataset: {folder}/{files}: {len(images):,} images but {len(labels):,} labels; "
                "the counts must agree"
            )
        else:
            bad = np.flatnonzero(labels >= len(classes))
            if len(bad):
                first = ", ".join(f"#{i} = {labels[i]}" for i in bad[:5])
                problems.append(
                    f"dataset: {folder}/{IDX_FILES[part + '_labels']}: {len(bad):,} labels "
                    f"outside 0..{len(classes) - 1} ({first}{', ...' if len(bad) > 5 else ''})"
                )
    if not problems and arr["train_images"].shape[1:] != arr["test_images"].shape[1:]:
        problems.append(
            f"dataset: {folder}: train images are {arr['train_images'].shape[1:]}, test images "
            f"{arr['test_images'].shape[1:]}; they must be the same size"
        )
    if problems:
        raise SpecError(problems)
    flat = lambda a: a.reshape(len(a), -1).astype(np.float32) / PIXEL_MAX  # noqa: E731
    rows, cols = arr["train_images"].shape[1:]
    return RawData(
        X=flat(arr["train_images"]),
        y=arr["train_labels"].astype(np.int64),
        X_test=flat(arr["test_images"]),
        y_test=arr["test_labels"].astype(np.int64),
        classes=classes,
        inputs={
            "kind": "array",
            "input": f"{rows} x {cols} pixel values 0-255, row by row",
            "input_divisor": PIXEL_MAX,
        },
        class_values=class_values,
    )


def load_mnist(spec: Spec) -> RawData:
    """MNIST from the IDX files (see `_load_idx_dataset` for where they are looked for)."""
    return _load_idx_dataset("mnist", [str(i) for i in range(10)], list(range(10)))


def load_fashion_mnist(spec: Spec) -> RawData:
    """Fashion-MNIST from the IDX files."""
    return _load_idx_dataset("fashion_mnist", FASHION_CLASSES, FASHION_CLASSES)


# ---------------------------------------------------------------- tables


def _from_frame(frame, target: str, task: str, test=None, unseen: str = "error") -> RawData:
    """Features and labels of a table; with a `test` table, everything learned (one-hot
    categories, classes) comes from the training rows only, as `hpo predict` sees new rows."""
    import pandas as pd

    frame = frame[frame[target].notna()]  # only with drop_missing_target (checked)
    if task == "auto":
        task = infer_task(frame[target])
    raw_feats = frame.drop(columns=[target])
    feats = pd.get_dummies(raw_feats, dtype=np.float32)
    notes = [
        f"column {str(c)!r} is empty in every training row: it carries nothing (read as 0)"
        for c in raw_feats.columns
        if raw_feats[c].isna().all()
    ]
    classes, class_values, code = None, None, None
    if task == "classification":
        text = frame[target].astype(str).to_numpy()
        classes_arr, codes = np.unique(text, return_inverse=True)
        classes = [str(c) for c in classes_arr]
        original = dict(zip(text, frame[target].tolist(), strict=True))  # "3" -> 3
        class_values = [original[c] for c in classes]
        y = codes.astype(np.int64)
        # test labels are matched by value: 3.0 in one file is 3 in the other
        code = dict(zip(_label_keys(frame[target]), y.tolist(), strict=True))
    else:
        y = frame[target].to_numpy(dtype=np.float64)
    raw = RawData(
        X=feats.to_numpy(dtype=np.float32),
        y=y,
        classes=classes,
        task=task,
        inputs={
            "kind": "table",
            "columns": [{"name": str(c), "type": column_kind(raw_feats[c])} for c in raw_feats],
            "encoded": [str(c) for c in feats.columns],
            "target": str(target),
        },
        frame=raw_feats,
        class_values=class_values,
        notes=notes,
    )
    if test is not None:
        test = test[test[target].notna()]
        if code is not None:
            labels = _label_keys(test[target])
            new = labels.index[~labels.isin(list(code))]
            if len(new) and unseen != "drop":
                raise SpecError([_unseen_labels_problem(labels, new, classes or [])])
            if len(new):
                names = ", ".join(repr(v) for v in sorted(set(labels[new]))[:5])
                notes.append(
                    f"{len(new):,} test rows dropped: their labels ({names}) are not in the "
                    "training file (dataset.test_unseen_labels: drop)"
                )
                test, raw.test_dropped = test.drop(index=new), len(new)
        test_feats = test.drop(columns=[target])
        notes += _unseen_categories(raw_feats, test_feats)
        encoded = pd.get_dummies(test_feats, dtype=np.float32)
        raw.X_test = encoded.reindex(columns=feats.columns, fill_value=0.0).to_numpy(
            dtype=np.float32
        )
        if code is not None:
            raw.y_test = np.array([code[t] for t in _label_keys(test[target])], dtype=np.int64)
        else:
            raw.y_test = test[target].to_numpy(dtype=np.float64)
    return raw


def _unseen_labels_problem(labels: Any, rows: Any, classes: list[str]) -> str:
    """The one line for test rows whose label the training file lacks (rows: their index)."""
    names = ", ".join(repr(v) for v in sorted(set(labels[rows]))[:5])
    first = ", ".join(str(int(i) + 2) for i in list(rows[:5])) + (", ..." if len(rows) > 5 else "")
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return (
        f"dataset.test_path: {len(rows):,} rows have a label the training file does not have "
        f"({names}; lines {first}); the classes are {shown}. Fix the file, or set "
        "dataset.test_unseen_labels: drop to leave those rows out (they are counted)"
    )


def _label_keys(labels: Any) -> Any:
    """Class labels as text to compare across files: 3 and 3.0 are one class (a column with a
    blank cell reads as floats in one file and integers in the other)."""
    import pandas as pd

    labels = pd.Series(labels)
    if pd.api.types.is_numeric_dtype(labels) and not pd.api.types.is_bool_dtype(labels):
        whole = labels.dropna()
        if (whole == whole.round()).all():
            return labels.map(lambda v: str(int(v)) if pd.notna(v) else v)
    return labels.astype(str)


def _unseen_categories(train, test) -> list[str]:  # frames of raw features
    """A note per text column whose test rows hold categories training never saw: they are
    encoded as unknown (all of that column's one-hot inputs 0), as `hpo predict` does."""
    notes = []
    for c in train.columns:
        if column_kind(train[c]) != "string" or c not in test.columns:
            continue
        known = set(train[c].dropna().astype(str))
        values = test[c].dropna().astype(str)
        new = values[~values.isin(known)]
        if len(new):
            names = ", ".join(repr(v) for v in sorted(set(new))[:3])
            notes.append(
                f"{len(new):,} test rows have a {str(c)!r} the training file never has "
                f"({names}): encoded as unknown, as hpo predict does"
            )
    return notes


def load_table(spec: Spec) -> RawData:
    """A CSV or Parquet file with a target column, and its own test file if given; the files
    checked first (`hpo.tables.check_files`: every problem, one line each)."""
    frames = check_files(spec)  # read once, checked, then used
    frame, test = frames["path"], frames.get("test_path")
    return _from_frame(
        frame, spec.dataset.target, spec.task, test, spec.dataset.test_unseen_labels
    )


def load_openml(spec: Spec) -> RawData:
    """An OpenML dataset by name or id, through scikit-learn's cache."""
    from sklearn.datasets import fetch_openml

    ds = spec.dataset
    key = {"data_id": int(ds.openml)} if str(ds.openml).isdigit() else {"name": ds.openml}
    try:
        bunch = fetch_openml(
            **key,
            as_frame=True,
            data_home=str(cache_dir() / "openml"),
            parser="auto",
            n_retries=2,
            delay=0.5,
        )
    except OSError as e:  # offline, or OpenML's server away: not the spec's fault
        raise NotDownloaded(
            [
                f"dataset.openml: cannot fetch {ds.openml!r} ({e}); "
                "it is downloaded once into the cache, so a network is needed the first time"
            ]
        ) from None
    except Exception as e:  # noqa: BLE001 - an unknown name or id, a dataset without a target
        raise SpecError([f"dataset.openml: {ds.openml!r}: {first_line(e)}"]) from None
    frame = bunch.frame
    target = ds.target or bunch.target_names[0]
    if target not in frame.columns:
        raise SpecError([f"dataset.target: no column {target!r} in openml {ds.openml!r}"])
    return _from_frame(frame, target, spec.task)
