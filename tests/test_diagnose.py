"""Fit diagnosis on synthetic curves with known answers, and on real short trainings."""

from __future__ import annotations

import math

import pytest
import torch

from hpo.diagnose import RULES, _change, chance_loss, diagnose_fit
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
    assert fit.evidence == (
        "val_loss 0.35 at epoch 4 → 0.7 at epoch 8 (+100%) while train_loss fell 0.2 → 0.01"
    )


def test_early_stopping_rescue_is_labelled_by_kept_weights_with_the_rise_noted():
    fit = diagnose_fit(U_SHAPE, kept_epoch=4, chance=CHANCE, stopped_by="early_stopping")
    assert fit.label == "good"
    assert fit.evidence.endswith(
        "; early stopping kept epoch 4 of 8: val_loss 0.35 at epoch 4 → 0.7 at epoch 8 (+100%)"
    )


def test_evidence_never_reads_zero_percent():
    # val_loss 0.4% above the kept epoch's: said as such, or as "within 1%", never "rose 0%"
    history = curves([1.0, 0.5, 0.3, 0.25, 0.24, 0.23], [1.0, 0.5, 0.3, 0.301, 0.3012, 0.3012])
    fit = diagnose_fit(history, kept_epoch=3, chance=CHANCE, stopped_by="early_stopping")
    assert fit.label == "good" and "0%" not in fit.evidence.replace("100%", "")
    assert fit.evidence.endswith(
        "early stopping kept epoch 3 of 6 (val_loss 0.3), within 1% of it at epoch 6"
    )
    assert _change(0.30, 0.3012) == "+0.4%" and _change(0.31, 0.45) == "+45%"
    assert _change(0.5, 0.5) == "unchanged" and _change(0.6, 0.36) == "-40%"


def test_growing_gap_after_val_loss_stopped_improving_is_overfit():
    history = curves([0.5, 0.3, 0.15, 0.05, 0.01], [0.5, 0.45, 0.42, 0.42, 0.42])
    fit = diagnose_fit(history, chance=CHANCE)
    assert fit.label == "overfit"
    assert fit.evidence == (
        "train/validation gap 0 at epoch 1 → 0.41 at epoch 5 (train_loss 0.01, val_loss 0.42), "
        "while val_loss had stopped improving at epoch 3 (0.42)"
    )
    # the same weights kept at the lowest val_loss (epoch 3): stopping earlier would not help
    kept = diagnose_fit(history, kept_epoch=3, chance=CHANCE, stopped_by="early_stopping")
    assert kept.label == "good"


def test_val_loss_stuck_near_chance_is_underfit():
    history = curves([2.3, 2.2, 2.1, 2.1, 2.1], [2.3, 2.2, 2.1, 2.1, 2.1])
    fit = diagnose_fit(history, chance=CHANCE, stopped_by="early_stopping")
    assert fit.label == "underfit"
    assert fit.evidence == (
        "learned little: val_loss 2.1 at epoch 5 is 91% of chance (2.3); train_loss 2.1"
    )


def test_a_diverged_trial_is_underfit_not_overfit_whatever_its_gap():
    # seen on MNIST: a first epoch far worse on train than on validation, then stuck at chance
    history = curves([15.0, 3.40, 3.38], [6.5, 3.50, 3.62])
    fit = diagnose_fit(history, chance=CHANCE, stopped_by="pruned")
    # a pruned trial keeps no weights: it is read at its lowest val_loss, and says so
    assert fit.label == "underfit" and fit.evidence.startswith("learned little: val_loss 3.5 ")
    assert fit.evidence.endswith("(pruned at epoch 3; read at its lowest val_loss, epoch 2)")


def test_high_val_loss_is_underfit_only_where_an_earlier_trial_shows_the_data_allows_better():
    history = curves([1.2, 1.0, 0.9, 0.9], [1.2, 1.0, 0.9, 0.9])  # 39% of chance, no gap
    fit = diagnose_fit(
        history, chance=CHANCE, peer_val_losses=[0.1, 0.2, 0.25], stopped_by="early_stopping"
    )
    assert fit.label == "underfit"
    assert fit.evidence == (
        "val_loss 0.9 at epoch 4 is 39% of chance (2.3) and train_loss 0.9, while an earlier "
        "trial reached val_loss 0.1: the data allows better"
    )
    # noisy data: the others reached only 0.5 on unseen data, and a third of 0.9 is 0.3
    noisy = diagnose_fit(
        history, chance=CHANCE, peer_val_losses=[0.5, 0.6], stopped_by="early_stopping"
    )
    assert noisy.label == "good" and "the data may allow little better" in noisy.evidence
    first = diagnose_fit(history, chance=CHANCE, stopped_by="early_stopping")
    assert first.label == "good" and "with no earlier trial to show" in first.evidence


def test_a_peer_that_memorised_its_training_data_does_not_make_others_underfit():
    """Only a peer's loss on unseen data says what the data allows: an earlier trial's training
    loss near zero (memorised) is no evidence, and a trial that fits its own training data
    below the best peer's val_loss is not underfit either."""
    history = curves([1.2, 1.0, 0.9, 0.9], [1.2, 1.0, 0.9, 0.9])
    memorised = diagnose_fit(
        history, chance=CHANCE, peer_val_losses=[0.85], stopped_by="early_stopping"
    )
    assert memorised.label == "good"
    fits_train = curves([1.0, 0.5, 0.2, 0.05], [1.2, 1.0, 0.9, 0.9])
    fit = diagnose_fit(
        fits_train, chance=CHANCE, peer_val_losses=[0.1], stopped_by="early_stopping"
    )
    assert fit.label != "underfit", fit


def test_chance_is_the_entropy_of_the_class_frequencies():
    assert chance_loss("classification", 2, [50, 50]) == pytest.approx(math.log(2))
    assert chance_loss("classification", 2, [95, 5]) == pytest.approx(0.1985, abs=1e-4)
    assert chance_loss("classification", 10) == pytest.approx(math.log(10))
    # A model that only predicts the prior on 95/5 data learned nothing: underfit.
    prior = curves([0.2, 0.199, 0.199], [0.2, 0.199, 0.199])
    fit = diagnose_fit(prior, chance=chance_loss("classification", 2, [95, 5]))
    assert fit.label == "underfit" and fit.evidence.startswith("learned little")


def test_twins_with_the_same_val_loss_get_the_same_label_whatever_their_dropout():
    """The dropout twin's train_loss (averaged with dropout on) is above 35% of chance, its
    twin's below: the old rule called one underfit and the other good."""
    val = [1.6, 1.3, 1.15, 1.07, 1.06, 1.065]
    plain = curves([1.9, 1.2, 0.9, 0.75, 0.69, 0.66], val)
    dropout = curves([2.0, 1.4, 1.1, 0.95, 0.88, 0.84], val)
    assert plain[4]["train_loss"] < 0.35 * CHANCE < dropout[4]["train_loss"]
    fits = [
        diagnose_fit(h, kept_epoch=5, chance=CHANCE, peer_val_losses=peers, stopped_by=s)
        for h in (plain, dropout)
        for peers in ((), (0.69,))
        for s in ("early_stopping", "max_epochs")
    ]
    assert {f.label for f in fits} == {"good"}, fits


def test_real_twins_on_noisy_labels_get_the_same_label():
    """Digits with 15% of the labels replaced at random: the same net with and without dropout
    reaches the same validation accuracy; their train_loss differs by what dropout adds."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    y = torch.tensor(y)
    noisy = torch.where(
        torch.rand(len(y), generator=g) < 0.15, torch.randint(0, 10, y.shape, generator=g), y
    )
    X = torch.tensor((X - X.mean(0)) / (X.std(0) + 1e-8), dtype=torch.float32)
    train_data, val_data = (X[:1200], noisy[:1200]), (X[1200:], noisy[1200:])
    results, peers = [], []
    for dropout in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_mlp(64, 10, widths=[128, 128], dropout=dropout)
        cfg = TrainConfig(max_epochs=60, batch_size=64, lr=1e-3, patience=8)
        result = train(model, train_data, val_data, cfg)
        kept = result.history[result.best_epoch - 1]
        fit = diagnose_fit(result.history, result.best_epoch, CHANCE, peers, result.stopped_by)
        results.append((kept, fit))
        peers.append(kept["val_loss"])
    (a, fit_a), (b, fit_b) = results
    assert abs(a["val_accuracy"] - b["val_accuracy"]) < 0.03
    assert b["train_loss"] - a["train_loss"] > 0.05 * CHANCE  # what dropout adds to train_loss
    assert a["train_loss"] < 0.35 * CHANCE < b["train_loss"]  # the old rule split them here
    assert fit_a.label == fit_b.label == "good", (fit_a, fit_b)


def test_still_improving_steeply_when_epochs_ran_out_is_underfit():
    history = curves([0.8, 0.6, 0.45, 0.34], [0.8, 0.6, 0.46, 0.36])
    fit = diagnose_fit(history, chance=CHANCE, stopped_by="max_epochs")
    assert fit.label == "underfit" and fit.evidence == (
        "still improving when it ran out of epochs: val_loss 0.6 at epoch 2 → 0.36 at epoch 4 "
        "(-40%), 20% per epoch"
    )
    pruned = diagnose_fit(history, chance=CHANCE, stopped_by="pruned")
    assert "when it was pruned" in pruned.evidence


def test_converged_curves_are_good():
    history = curves([0.5, 0.2, 0.1, 0.09, 0.085, 0.084], [0.5, 0.22, 0.12, 0.11, 0.108, 0.107])
    fit = diagnose_fit(history, chance=CHANCE)
    assert fit.label == "good" and fit.evidence == (
        "val_loss 0.107 and train_loss 0.084 at kept epoch 6, gap 0.023"
    )


def test_rules_sentence_names_the_thresholds():
    assert "val_loss above 70% of chance" in RULES and "above 35% of chance" in RULES
    assert "under 1/3 of it" in RULES and "dropout" in RULES


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


def unstable_history(train_loss, val_accuracy, val_loss):
    return [
        {"train_loss": t, "val_loss": v, "val_accuracy": a}
        for t, v, a in zip(train_loss, val_loss, val_accuracy, strict=True)
    ]


# make run's digits study, trial 23: 3x206 GELU, Adam at lr 0.025, dropout 0.49, pruned at
# epoch 5; it was labelled good ("gap -1.56") while its training loss rose every epoch
TRIAL_23 = unstable_history(
    [1.35, 1.61, 1.69, 1.85, 1.98],
    [0.948, 0.93, 0.91, 0.88, 0.852],
    [0.30, 0.33, 0.36, 0.39, 0.417],
)


def test_training_loss_that_rises_at_the_end_is_unstable_with_its_numbers_and_cause():
    fit = diagnose_fit(TRIAL_23, chance=CHANCE, stopped_by="pruned", lr=0.025)
    assert fit.label == "unstable"
    assert fit.evidence == (
        "train_loss rose 1.35 at epoch 1 → 1.98 at epoch 5, while val_accuracy fell 0.948 → "
        "0.852 (27% of chance): the steps are too large; the usual cause is the learning rate "
        "(lr 0.025 here): lower it, or add a schedule or gradient clipping"
    )
    # and as a complete trial, kept at its last epoch, too: unstable is checked first
    assert diagnose_fit(TRIAL_23, kept_epoch=5, chance=CHANCE).label == "unstable"


def test_training_loss_that_grew_after_the_kept_epoch_is_unstable():
    """A held-out case, trained for real (Adam at lr 0.025 on digits, batch 64): early
    stopping kept epoch 2, then the training loss climbed while validation fell apart."""
    history = unstable_history(
        [1.36, 1.27, 2.02, 1.94, 2.89, 2.69],
        [0.896, 0.951, 0.882, 0.91, 0.92, 0.885],
        [0.36, 0.21, 0.44, 0.35, 0.41, 0.49],
    )
    fit = diagnose_fit(history, kept_epoch=2, chance=CHANCE, stopped_by="early_stopping")
    assert fit.label == "unstable" and fit.evidence.startswith(
        "train_loss grew after the kept epoch 2: 1.27 at epoch 2 → 2.89 at epoch 5, while "
        "val_accuracy fell 0.951 → 0.885 (70% of chance)"
    )


def test_the_noise_of_dropout_is_not_instability():
    # a healthy run with dropout 0.5: the epoch's training loss wobbles by a few % of chance
    history = curves([1.2, 0.8, 0.7, 0.66, 0.68, 0.7], [0.9, 0.5, 0.4, 0.36, 0.35, 0.35])
    assert diagnose_fit(history, chance=CHANCE).label != "unstable"


def test_a_perfect_model_with_a_loss_near_zero_is_not_overfit():
    """wine_csv's data, SGD at lr 0.3 with momentum 0.95, 12 epochs, last weights kept:
    val_accuracy 1.0 at the end, its val_loss from 1.93e-07 to 0.0048."""
    chance = chance_loss("classification", 3)
    val_loss = [0.3, 0.01, 1e-4, 1.93e-07, 1e-6, 1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 3e-3, 0.0048]
    train_loss = [0.9, 0.2, 0.05, 0.01, 0.005, 0.003, 0.002, 0.0015, 0.001, 8e-4, 6e-4, 5e-4]
    history = [
        {"train_loss": t, "val_loss": v, "val_accuracy": 1.0 if i > 1 else 0.9}
        for i, (t, v) in enumerate(zip(train_loss, val_loss, strict=True))
    ]
    fit = diagnose_fit(history, chance=chance)
    assert fit.label == "good", fit.evidence
    assert "%" not in fit.evidence.replace("of chance", "")  # no +2482263%
    # the same curves below perfect accuracy: the rise is 0.4% of chance, under the floor
    for h in history:
        h.pop("val_accuracy")
    assert diagnose_fit(history, chance=chance).label != "overfit"
    assert _change(1.93e-07, 0.0048, chance) == "+0.0048, 0.44% of chance"
    assert _change(0.31, 0.45, chance) == "+45%"


def test_a_training_loss_that_wobbles_up_while_validation_improves_is_not_unstable():
    # a 95/5 split (chance 0.2): the end of the curve is 0.035 above a noisy low, but
    # validation improved every epoch
    chance = chance_loss("classification", 2, [95, 5])
    history = curves(
        [0.3, 0.15, 0.07, 0.09, 0.11, 0.095, 0.10, 0.105],
        [0.3, 0.2, 0.15, 0.13, 0.12, 0.11, 0.105, 0.1],
    )
    assert diagnose_fit(history, chance=chance).label != "unstable"
    # a single spike after the kept epoch that training recovered from is not either
    spike = curves([0.9, 0.5, 0.4, 0.9, 0.38, 0.37], [0.8, 0.45, 0.4, 0.5, 0.41, 0.42])
    assert diagnose_fit(spike, kept_epoch=3, chance=CHANCE).label != "unstable"
