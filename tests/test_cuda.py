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

from hpo import train as train_module
from hpo.config import SpecError, parse_spec
from hpo.data import load_data, resolve_device
from hpo.model import build_mlp
from hpo.train import StepGraph, TrainConfig, fit, train

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.filterwarnings("error:CUDA graph capture failed:RuntimeWarning"),  # no fallback
]

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
        models.append(build_mlp(64, 10, [64, 64], dropout=0.1).cuda())
    results, syncs = _host_syncs(lambda: fit(models, cfgs, train_data, val_data))
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
    fused = [r.history for r in fit(models(), cfgs, *data)]
    for a, f in zip(alone, fused, strict=True):
        assert len(a) == len(f) == 3
        for ea, ef in zip(a, f, strict=True):
            for key in ("train_loss", "val_loss"):
                assert ef[key] == pytest.approx(ea[key], rel=1e-5), key


@pytest.fixture
def replays(monkeypatch):
    """How many times a CUDA graph was replayed (torch's own replay, counted on its way)."""
    count = [0]
    replay = torch.cuda.CUDAGraph.replay

    def counted(self):
        count[0] += 1
        return replay(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)
    return count


def _both_ways(monkeypatch, replays, fn):
    """`fn()` with the steps replayed as CUDA graphs, then with every step launched alone
    (which replays none)."""
    monkeypatch.setenv("HPO_CUDA_GRAPHS", "1")
    graphed = fn()
    replayed = replays[0]
    monkeypatch.setenv("HPO_CUDA_GRAPHS", "0")
    alone = fn()
    assert replays[0] == replayed, "HPO_CUDA_GRAPHS=0 replayed graphs"
    return graphed, alone


def _same_curves(a, b, rel):
    assert len(a) == len(b)
    for ea, eb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert ea[key] == pytest.approx(eb[key], rel=rel), key


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "adam", "lr_schedule": "cosine"},  # a new rate each epoch: recaptured
        {"optimizer": "adamw", "weight_decay": 1e-2},
        {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "l1": 1e-4,
         "grad_clip": 1.0, "weight_decay": 1e-4},
        {"optimizer": "rmsprop", "momentum": 0.5, "lr_schedule": "plateau"},
        {"optimizer": "nadam"},
    ],
)  # fmt: skip
def test_a_step_replayed_as_a_cuda_graph_trains_as_the_step_launched_alone(
    monkeypatch, replays, settings
):
    """In float64, where both ways compute the same kernels on the same batches: the graph
    replays every full batch after the warm-up, the epoch's last (shorter) batch runs alone."""
    data = _digits(torch.float64)
    cfg = TrainConfig(batch_size=BATCH, max_epochs=4, patience=10, **settings)

    def run():
        torch.manual_seed(3)
        model = build_mlp(64, 10, [32, 16], "relu", 0.0, True).double().cuda()  # batch norm
        return train(model, *data, cfg).history

    graphed, alone = _both_ways(monkeypatch, replays, run)
    steps = len(data[0][0]) // BATCH  # full batches an epoch
    assert replays[0] == 4 * steps - 3  # all but the 3 warm-up steps
    # torch's NAdam keeps its step and product of momenta as float32 scalars, whatever the
    # weights' type, multiplied on the host without capture and on the device with it (seen
    # on an H100: 5e-7 apart after the first epoch).
    _same_curves(graphed, alone, 1e-5 if settings["optimizer"] == "nadam" else 1e-9)


def test_dropout_in_a_cuda_graph_draws_fresh_masks_each_step(monkeypatch, replays):
    """Dropout's masks come from the device's generator at each replay, not once at capture:
    the same masks as the steps launched alone draw, step for step."""
    data = _digits()

    def run():
        torch.manual_seed(5)
        model = build_mlp(64, 10, [64, 64], "relu", 0.3).cuda()
        return train(model, *data, TrainConfig(batch_size=BATCH, max_epochs=3)).history

    graphed, alone = _both_ways(monkeypatch, replays, run)
    assert replays[0] == 3 * (len(data[0][0]) // BATCH) - 3
    assert graphed[-1]["val_accuracy"] > 0.8
    _same_curves(graphed, alone, 1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "nadam", "sgd", "rmsprop", "adagrad"])
def test_a_cohort_replayed_as_a_cuda_graph_trains_as_launched_alone(
    monkeypatch, replays, optimizer
):
    """Each member's curve is the same both ways, also after one is pruned (the stack shrinks
    and the step is captured again)."""
    data = _digits(torch.float64)
    cfgs = [
        TrainConfig(optimizer=optimizer, batch_size=BATCH, max_epochs=4, patience=10,
                    lr=0.002 * (1 + i), weight_decay=1e-4 * i, momentum=0.5,
                    l1=1e-5 if i == 1 else 0.0, grad_clip=1.0 if i == 2 else 0.0,
                    lr_schedule="cosine", seed=i, shuffle_seed=1)
        for i in range(3)
    ]  # fmt: skip

    def prune_1_after_2(metrics, epoch):
        return {m: "pruned" if m == 1 and epoch == 2 else None for m in metrics}

    def run():
        models = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)
            models.append(build_mlp(64, 10, [32, 16], "relu", 0.0, True).double().cuda())
        results = fit(models, cfgs, *data, on_epoch_end=prune_1_after_2)
        return [r.history for r in results]

    graphed, alone = _both_ways(monkeypatch, replays, run)
    # Every full batch after the warm-up: the rates change in place each epoch (cosine), the
    # stack shrinks after epoch 2 and is captured again.
    assert replays[0] == 4 * (len(data[0][0]) // BATCH) - 3
    assert [len(h) for h in graphed] == [4, 2, 4]
    assert graphed[0][0]["lr"] != graphed[0][1]["lr"]
    for g, a in zip(graphed, alone, strict=True):
        _same_curves(g, a, 1e-9)


def test_a_cohort_with_dropout_in_a_cuda_graph(monkeypatch, replays):
    """The members' masks come from the cohort's own generator, registered with the graph:
    the same masks both ways."""
    data = _digits()
    cfgs = [TrainConfig(batch_size=BATCH, max_epochs=3, seed=i, shuffle_seed=0) for i in range(4)]

    def run():
        models = []
        for cfg in cfgs:
            torch.manual_seed(cfg.seed)
            models.append(build_mlp(64, 10, [64], "relu", 0.2).cuda())
        return [r.history for r in fit(models, cfgs, *data)]

    graphed, alone = _both_ways(monkeypatch, replays, run)
    assert replays[0] == 3 * (len(data[0][0]) // BATCH) - 3
    for g, a in zip(graphed, alone, strict=True):
        assert g[-1]["val_accuracy"] > 0.8
        _same_curves(g, a, 1e-4)


def test_bf16_steps_replay_as_a_cuda_graph(monkeypatch, replays):
    data = _digits()

    def run():
        torch.manual_seed(0)
        model = build_mlp(64, 10, [64, 64]).cuda()
        cfg = TrainConfig(batch_size=BATCH, max_epochs=2, precision="bf16")
        return train(model, *data, cfg).history

    graphed, alone = _both_ways(monkeypatch, replays, run)
    assert replays[0] == 2 * (len(data[0][0]) // BATCH) - 3
    _same_curves(graphed, alone, 1e-3)


@pytest.mark.filterwarnings("default:CUDA graph capture failed:RuntimeWarning")
def test_a_capture_that_fails_leaves_training_as_usual(monkeypatch, replays):
    """A step that reads the device from the host cannot be captured: every call still runs
    the step once, later loops in the process train without graphs, and the allocator is
    left able to free its cache (the out-of-memory handler calls `empty_cache`). The net
    after it has no dropout: torch 2.11 leaves the device's generator mid-capture (see
    `StepGraph._release_pool`)."""
    monkeypatch.setattr(train_module, "_capture_failed", False)
    total = torch.zeros((), device="cuda")

    def step(idx):
        total.add_(idx.sum())
        total.item()  # a host read: refused while capturing

    graph = StepGraph(step, 4, torch.device("cuda"))
    idx = torch.arange(4, device="cuda")
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        for _ in range(6):
            graph(idx)
    assert total.item() == 6 * 6  # 3 warm-up steps, then 3 as usual: each ran once
    assert not graph.on and train_module._capture_failed
    torch.cuda.empty_cache()
    data = _digits()
    torch.manual_seed(0)
    model = build_mlp(64, 10, [64]).cuda()
    history = train(model, *data, TrainConfig(batch_size=BATCH, max_epochs=2)).history
    assert replays[0] == 0 and history[-1]["val_accuracy"] > 0.7
