"""Datasets: splits, scaling fitted on train only, the held-back test split, IDX files, tables."""

from __future__ import annotations

import gzip
import http.server
import shutil
import threading
from functools import partial

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, mnist_available, small_spec

from hpo.config import SpecError, load_spec, parse_spec
from hpo.data import IDX_FILES, find_idx_dir, load_data, read_idx


def test_digits_split_sizes_stratified_and_hash_stable():
    spec = parse_spec(small_spec())
    a, b = load_data(spec), load_data(spec)
    info = a.info
    assert info["n_train"] + info["n_val"] + info["n_test"] == 1797
    assert info["n_test"] == pytest.approx(0.2 * 1797, abs=1)
    assert info["split_hash"] == b.info["split_hash"]
    counts = torch.bincount(a.val[1], minlength=10).numpy()
    assert counts.min() >= counts.max() - 2  # stratified: classes balanced in validation
    other = parse_spec(small_spec(dataset={"split": {"seed": 1}}))
    assert load_data(other).info["split_hash"] != info["split_hash"]


def test_splits_are_the_ones_scikit_learn_makes():
    """hpo splits without importing scikit-learn; a study split by an earlier hpo (which
    called train_test_split) must get the very same rows, or it could not be resumed."""
    from sklearn.model_selection import train_test_split

    from hpo.data import _split

    rng = np.random.default_rng(0)
    cases = 0
    for n in (10, 37, 150, 1797):
        for frac in (0.1, 0.15, 0.2, 0.33, 0.5):
            for seed in (0, 1, 7, 123):
                for weights in (None, [0.5, 0.3, 0.2], [0.05] * 4 + [0.8]):
                    idx = np.sort(rng.choice(5 * n, size=n, replace=False))
                    y = np.zeros(5 * n, dtype=np.int64)
                    if weights is not None:
                        y[idx] = rng.choice(len(weights), size=n, p=weights)
                    try:
                        a, b = _split(idx, y, frac, seed, weights is not None, "split.val")
                    except SpecError:
                        continue  # a split that cannot be made: a clear error, not a split
                    strat = y[idx] if weights is not None else None
                    if strat is not None and np.unique(strat, return_counts=True)[1].min() < 2:
                        strat = None  # hpo's rule: a class of one row cannot be stratified
                    ea, eb = train_test_split(
                        idx, test_size=frac, random_state=seed, stratify=strat
                    )
                    assert a.tolist() == sorted(ea.tolist()), (n, frac, seed, weights)
                    assert b.tolist() == sorted(eb.tolist()), (n, frac, seed, weights)
                    cases += 1
    assert cases > 150


def test_digits_are_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    from hpo.data import DATASETS

    raw = DATASETS.load("digits")(parse_spec(small_spec()))
    d = load_digits()
    assert np.array_equal(raw.X, d.data.astype(np.float32))
    assert np.array_equal(raw.y, d.target)
    assert raw.classes == [str(c) for c in d.target_names]


def test_scaler_is_fitted_on_train_only():
    data = load_data(parse_spec(small_spec()))
    X_tr, X_va = data.train[0], data.val[0]
    varying = X_tr.std(0) > 0
    assert torch.allclose(X_tr.mean(0), torch.zeros(64), atol=1e-4)
    assert torch.allclose(
        X_tr.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-3
    )
    assert not torch.allclose(X_va.mean(0), torch.zeros(64), atol=1e-3)


def test_minmax_scaling_maps_train_to_unit_range():
    data = load_data(parse_spec(small_spec(dataset={"scale": "minmax"})))
    assert data.train[0].min().item() == 0.0 and data.train[0].max().item() == 1.0


def test_test_split_is_handed_out_once():
    data = load_data(parse_spec(small_spec()))
    X, y = data.take_test()
    assert len(X) == data.info["n_test"] and X.dtype == torch.float32 and y.dtype == torch.int64
    with pytest.raises(RuntimeError, match="already used"):
        data.take_test()


def test_max_samples_caps_the_training_pool():
    data = load_data(parse_spec(small_spec(dataset={"max_samples": 200})))
    assert data.info["n_train"] + data.info["n_val"] == 200


def test_csv_with_string_labels_and_test_file(tmp_path):
    rows = "".join(
        f"{i},{i % 7},{'cat' if i % 2 else 'dog'},{'yes' if i % 3 else 'no'}\n" for i in range(60)
    )
    (tmp_path / "train.csv").write_text("a,b,kind,label\n" + rows)
    (tmp_path / "test.csv").write_text("a,b,kind,label\n" + "".join(rows.splitlines(True)[:17]))
    spec = parse_spec(
        small_spec(
            dataset={
                "name": "csv",
                "path": "train.csv",
                "test_path": "test.csv",
                "target": "label",
            },
            task="auto",
        ),
        source_dir=tmp_path,
    )
    data = load_data(spec)
    assert data.task == "classification" and data.n_outputs == 2
    assert data.info["classes"] == ["no", "yes"]
    assert data.n_features == 4  # a, b, and kind one-hot encoded
    assert (
        data.info["test_source"] == "official" and data.info["n_train"] + data.info["n_val"] == 60
    )


def test_shipped_wine_csv_loads():
    data = load_data(load_spec(REPO / "search_spaces" / "wine_csv.yaml"))
    assert data.n_features == 13 and data.n_outputs == 3
    assert data.info["n_train"] + data.info["n_val"] + data.info["n_test"] == 178


def test_parquet_regression_standardises_targets(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x1": rng.normal(size=100), "x2": rng.normal(size=100)})
    frame["price"] = 50 + 10 * frame.x1 + rng.normal(size=100) * 0.1
    frame.to_parquet(tmp_path / "d.parquet")
    spec = parse_spec(
        small_spec(
            dataset={"name": "parquet", "path": "d.parquet", "target": "price"},
            task="auto",
            study={"metric": "val_rmse"},
            training={"early_stopping": {"monitor": "val_rmse"}},
        ),
        source_dir=tmp_path,
    )
    data = load_data(spec)
    assert data.task == "regression" and data.n_outputs == 1
    assert abs(data.train[1].mean().item()) < 1e-5
    assert data.y_scale == pytest.approx(
        float(np.std(frame.price.iloc[: len(data.train[1])])), rel=0.3
    )


def _fake_idx(folder, n=20):
    folder.mkdir(parents=True)
    images = np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for key, fname in IDX_FILES.items():
        arr = images if "images" in key else labels
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in arr.shape
        )
        with gzip.open(folder / fname, "wb") as f:
            f.write(header + arr.tobytes())
    return images, labels


def test_read_idx_roundtrip(tmp_path):
    images, labels = _fake_idx(tmp_path / "mnist")
    assert np.array_equal(read_idx(tmp_path / "mnist" / IDX_FILES["train_images"]), images)
    assert np.array_equal(read_idx(tmp_path / "mnist" / IDX_FILES["test_labels"]), labels)


def test_idx_found_in_hpo_data_dir_first(tmp_path, monkeypatch):
    _fake_idx(tmp_path / "data" / "mnist")
    monkeypatch.setenv("HPO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert find_idx_dir("mnist") == tmp_path / "data" / "mnist"


def test_offline_without_files_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HPO_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HPO_FASHION_MNIST_MIRROR", "http://127.0.0.1:9/")  # nothing listens there
    with pytest.raises(SpecError) as info:
        load_data(parse_spec(small_spec(dataset={"name": "fashion_mnist"})))
    msg = info.value.problems[0]
    assert "fashion_mnist files not found" in msg and "download" in msg
    assert str(tmp_path / "cache" / "hpo" / "fashion_mnist") in msg
    assert not any((tmp_path / "cache" / "hpo" / "fashion_mnist").glob("*.gz"))


@pytest.mark.skipif(not mnist_available(), reason="MNIST not in $HPO_DATA_DIR")
def test_download_verifies_checksums_into_cache(tmp_path, monkeypatch):
    """Serve the shared MNIST files on loopback: the download lands in the cache, verified."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(SHARED_DATA / "mnist"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HPO_DATA_DIR", str(tmp_path / "empty"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setenv("HPO_MNIST_MIRROR", f"http://127.0.0.1:{server.server_port}/")
        folder = find_idx_dir("mnist")
        assert folder == tmp_path / "cache" / "hpo" / "mnist"
        assert sorted(p.name for p in folder.iterdir()) == sorted(IDX_FILES.values())
        # A corrupted file on the mirror is refused and nothing is left under its name.
        shutil.rmtree(folder)
        bad = tmp_path / "bad"
        shutil.copytree(SHARED_DATA / "mnist", bad)
        (bad / IDX_FILES["train_labels"]).write_bytes(gzip.compress(b"\0" * 100))
        server.RequestHandlerClass = partial(
            http.server.SimpleHTTPRequestHandler, directory=str(bad)
        )
        with pytest.raises(SpecError, match="checksum mismatch"):
            find_idx_dir("mnist")
        assert not (folder / IDX_FILES["train_labels"]).exists()
    finally:
        server.shutdown()


@pytest.mark.skipif(not mnist_available(), reason="MNIST not in $HPO_DATA_DIR")
def test_mnist_keeps_official_test_set():
    data = load_data(parse_spec(small_spec(dataset={"name": "mnist"})))
    assert data.info["n_test"] == 10_000 and data.info["test_source"] == "official"
    assert data.info["n_train"] + data.info["n_val"] == 60_000
    assert data.n_features == 784 and data.n_outputs == 10
    y_test = data.take_test()[1]
    assert torch.bincount(y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_openml_is_fetched_into_the_cache_or_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = parse_spec(small_spec(dataset={"name": "openml", "openml": 61}, task="auto"))
    try:
        data = load_data(spec)
    except SpecError as e:  # no network here: the message says what is needed
        assert e.problems[0].startswith("dataset.openml: cannot fetch 61")
        assert "network is needed the first time" in e.problems[0]
    else:  # online: iris, 150 rows, 4 features, 3 classes
        assert data.n_features == 4 and data.n_outputs == 3
        assert (tmp_path / "cache" / "hpo" / "openml").is_dir()
