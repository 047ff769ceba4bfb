"""Fit diagnosis on synthetic curves with known answers, and on real short trainings."""

from __future__ import annotations

import math

import torch

from hpo.diagnose import chance_loss, diagnose_fit
from hpo.model import build_mlp
from hpo.train import TrainConfig, train

CHANCE = math.log(10)


def curves(train_loss, val_loss):
    return [{"train_loss": t, "val_loss": v} for t, v in zip(train_loss, val_loss, strict=True)]


U_SHAPE = curves(
    [1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01],
    [1.0, 0.6, 0.4, 0.35, 0.4, 0.5, 0.6, 0.7],
)


def test_chance_level():
    assert chance_loss("classification", 10) == CHANCE
    assert chance_loss("regression", None) == 1.0


def test_val_loss_rising_while_train_falls_is_overfit_with_evidence():
    fit = diagnose_fit(U_SHAPE, kept_epoch=None, chance=CHANCE)
    assert fit.label == "overfit"
    assert fit.evidence.startswith("val_loss bottomed at epoch 4 (0.35) and rose 100% by epoch 8")
    assert "train_loss fell to 0.01" in fit.evidence and "final gap 0.69" in fit.evidence


def test_early_stopping_rescue_is_labelled_by_kept_weights_with_the_rise_noted():
    fit = diagnose_fit(U_SHAPE, kept_epoch=4, chance=CHANCE, stopped_by="early_stopping")
    assert fit.label == "good"
    assert "early stopping kept epoch 4, after which val_loss rose 100% by epoch 8" in fit.evidence


def test_growing_gap_is_overfit():
    history = curves([0.5, 0.3, 0.15, 0.05, 0.01], [0.5, 0.45, 0.42, 0.42, 0.42])
    fit = diagnose_fit(history, chance=CHANCE)
    assert fit.label == "overfit" and fit.evidence.startswith("train/validation gap grew from 0")


def test_train_loss_stuck_near_chance_is_underfit():
    history = curves([2.3, 2.2, 2.1, 2.1, 2.1], [2.3, 2.2, 2.1, 2.1, 2.1])
    fit = diagnose_fit(history, chance=CHANCE, stopped_by="early_stopping")
    assert fit.label == "underfit" and fit.evidence.startswith("train_loss stayed high: 2.1")
    assert "91% of the chance level" in fit.evidence


def test_a_diverged_trial_is_underfit_not_overfit_whatever_its_gap():
    # seen on MNIST: a first epoch far worse on train than on validation, then stuck at chance
    history = curves([15.0, 3.40, 3.38], [6.5, 3.50, 3.62])
    fit = diagnose_fit(history, chance=CHANCE, stopped_by="pruned")
    assert fit.label == "underfit" and fit.evidence.startswith("train_loss stayed high: 3.38")


def test_train_loss_far_above_the_other_trials_is_underfit():
    history = curves([0.9, 0.6, 0.5, 0.5], [0.9, 0.6, 0.5, 0.5])
    fit = diagnose_fit(
        history, chance=CHANCE, peer_train_losses=[0.05, 0.08, 0.1], stopped_by="early_stopping"
    )
    assert fit.label == "underfit" and "6.2x the median of the other trials (0.08)" in fit.evidence
    assert diagnose_fit(history, chance=CHANCE, stopped_by="early_stopping").label == "good"


def test_still_improving_steeply_when_epochs_ran_out_is_underfit():
    history = curves([0.8, 0.6, 0.45, 0.34], [0.8, 0.6, 0.46, 0.36])
    fit = diagnose_fit(history, chance=CHANCE, stopped_by="max_epochs")
    assert fit.label == "underfit" and fit.evidence.startswith(
        "still improving when it ran out of epochs"
    )
    pruned = diagnose_fit(history, chance=CHANCE, stopped_by="pruned")
    assert "when it was pruned" in pruned.evidence


def test_converged_curves_are_good():
    history = curves([0.5, 0.2, 0.1, 0.09, 0.085, 0.084], [0.5, 0.22, 0.12, 0.11, 0.108, 0.107])
    fit = diagnose_fit(history, chance=CHANCE)
    assert fit.label == "good" and fit.evidence.startswith(
        "val_loss 0.107 and train_loss 0.084 at kept epoch 6"
    )


def test_real_training_made_to_overfit(blobs):
    """Noisy labels, 40 training rows, a wide net, no regularisation, last weights kept."""
    g = torch.Generator().manual_seed(0)
    (X, y), (Xv, yv) = blobs
    y_noisy = torch.where(
        torch.rand(len(y), generator=g) < 0.4, torch.randint(0, 3, y.shape, generator=g), y
    )
    torch.manual_seed(0)
    model = build_mlp(8, 3, widths=[256, 256])
    cfg = TrainConfig(max_epochs=150, batch_size=40, lr=3e-3, patience=10**6, restore_best=False)
    result = train(model, (X[:40], y_noisy[:40]), (Xv, yv), cfg)
    fit = diagnose_fit(result.history, result.best_epoch, chance_loss("classification", 3))
    assert fit.label == "overfit", fit.evidence


def test_real_training_made_to_underfit(blobs):
    """A tiny learning rate for three epochs: the model barely moves from chance."""
    torch.manual_seed(0)
    model = build_mlp(8, 3, widths=[16])
    cfg = TrainConfig(max_epochs=3, batch_size=32, lr=1e-5, optimizer="sgd")
    result = train(model, blobs[0], blobs[1], cfg)
    fit = diagnose_fit(result.history, result.best_epoch, chance_loss("classification", 3))
    assert fit.label == "underfit", fit.evidence
