"""On a CUDA GPU: `device: auto` takes it, the data stays there, an epoch syncs with the host a
few times rather than once a step, and a member fused on the GPU follows its curve alone.

Skipped where there is no GPU (`make test` on a GPU machine runs them). Self-contained (no
conftest): they import only torch, NumPy, PyYAML and pydantic, and read scikit-learn's bundled
digits file, so they also run without the rest of the install:

    python -m pytest -c /dev/null --noconftest tests/test_cuda.py
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hpo.config import SpecError, parse_spec
from hpo.data import load_data, resolve_device
from hpo.fused import train_cohort
from hpo.model import build_mlp
from hpo.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

BATCH = 32  # digits: 45 steps an epoch, so a sync a step could not hide among the epoch's own


def _digits(dtype=torch.float32):
    spec = parse_spec({"name": "cuda", "dataset": {"name": "digits"}, "search_space": {}})
    data = load_data(spec, resolve_device("auto"))
    return [(X.to(dtype), y) for X, y in (data.train, data.val)]


def _host_syncs(fn):
    """What `fn` returns, and how many times it made the host wait for the GPU (torch's sync
    debug mode warns at each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in caught)


def test_auto_is_the_gpu_and_the_data_lives_there():
    assert resolve_device("auto").type == "cuda"
    (X, y), (Xv, yv) = _digits()
    assert {t.device.type for t in (X, y, Xv, yv)} == {"cuda"}


def test_a_gpu_the_machine_lacks_is_refused_by_name():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(SpecError) as refused:
        resolve_device(f"cuda:{count}")
    assert refused.value.problems == [
        f"training.device: 'cuda:{count}' asked for, but this machine has {count} CUDA GPU(s), "
        f"cuda:0 to cuda:{count - 1}"
    ]


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "adam"},
        {
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "l1": 1e-4,
            "grad_clip": 1.0,
        },
    ],
)
def test_an_epoch_waits_for_the_gpu_a_few_times_not_once_a_step(settings):
    train_data, val_data = _digits()
    torch.manual_seed(0)
    model = build_mlp(64, 10, [64, 64], "relu", 0.2, True).cuda()  # dropout, batch norm
    cfg = TrainConfig(batch_size=BATCH, max_epochs=2, **settings)
    steps = len(train_data[0]) // BATCH
    result, syncs = _host_syncs(lambda: train(model, train_data, val_data, cfg))
    assert len(result.history) == 2 and result.history[-1]["val_accuracy"] > 0.5
    assert syncs <= 10, f"{syncs} host syncs in 2 epochs of {steps} steps"


def test_a_cohort_waits_for_the_gpu_a_few_times_an_epoch():
    train_data, val_data = _digits()
    cfgs = [
        TrainConfig(batch_size=BATCH, max_epochs=2, lr=1e-3 * (1 + i), seed=i, shuffle_seed=0)
        for i in range(4)
    ]
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_mlp(64, 10, [64, 64]).cuda())
    results, syncs = _host_syncs(
        lambda: train_cohort(models, cfgs, [0.1] * 4, "relu", train_data, val_data)
    )
    assert [len(r.history) for r in results] == [2] * 4
    assert syncs <= 20, f"{syncs} host syncs in 2 epochs of {len(train_data[0]) // BATCH} steps"


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_a_member_fused_on_the_gpu_follows_its_curve_alone(optimizer):
    """As `test_fused.py` shows on a CPU, in float64 (where rounding is not amplified): on
    CUDA a cohort uses the update written over the whole stack, not torch's kernels."""
    data = _digits(torch.float64)
    members = [
        {"lr": 0.01, "weight_decay": 0.0, "momentum": 0.0},
        {"lr": 0.003, "weight_decay": 1e-3, "momentum": 0.9, "grad_clip": 0.5},
        {"lr": 0.001, "weight_decay": 1e-4, "momentum": 0.5},
    ]
    cfgs = [
        TrainConfig(
            optimizer=optimizer, batch_size=BATCH, max_epochs=3, seed=i, shuffle_seed=7, **hp
        )
        for i, hp in enumerate(members)
    ]

    def models():
        out = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)
            out.append(build_mlp(64, 10, [32, 16]).double().cuda())
        return out

    alone = [train(m, *data, c).history for m, c in zip(models(), cfgs, strict=True)]
    fused = [r.history for r in train_cohort(models(), cfgs, [0.0] * 3, "relu", *data)]
    for a, f in zip(alone, fused, strict=True):
        assert len(a) == len(f) == 3
        for ea, ef in zip(a, f, strict=True):
            for key in ("train_loss", "val_loss"):
                assert ef[key] == pytest.approx(ea[key], rel=1e-5), key
