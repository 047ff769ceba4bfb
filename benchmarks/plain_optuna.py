"""The baseline for time to target: the Optuna script a user would write by hand.

Default TPE, no pruning, a DataLoader loop over CPU tensors with `.item()` per step (each batch
moved to the GPU when there is one, as tutorials do), 10 epochs a trial, the search space of
`search_spaces/mnist.yaml` (depth, width, activation, dropout, lr, batch size, weight decay,
optimizer, momentum; cosine schedule). The split is hpo's (the same 54,000 / 6,000 images), so the
validation accuracies compare. Prints one line per trial and, at the end, the seconds until a
finished trial first reached the target validation accuracy.

    HPO_DATA_DIR=/path/to/data python benchmarks/plain_optuna.py [--timeout 600] [--target 0.98]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hpo.config import load_spec
from hpo.data import load_data
from hpo.train import flush_denormals

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
EPOCHS = 10


def objective(trial: optuna.Trial, train_ds, val_ds, device: str = "cpu") -> float:
    n_layers = trial.suggest_int("n_layers", 1, 4)
    width = trial.suggest_int("width", 32, 1024, log=True)
    activation = trial.suggest_categorical("activation", list(ACTIVATIONS))
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    batch_size = trial.suggest_categorical("batch_size", [64, 128, 256, 512])
    weight_decay = trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True)
    optimizer = trial.suggest_categorical("optimizer", list(OPTIMIZERS))
    kw = {"lr": lr, "weight_decay": weight_decay}
    if optimizer in ("sgd", "rmsprop"):
        kw["momentum"] = trial.suggest_float("momentum", 0.0, 0.99)

    layers, fan_in = [], 784
    for _ in range(n_layers):
        layers += [nn.Linear(fan_in, width), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        fan_in = width
    model = nn.Sequential(*layers, nn.Linear(fan_in, 10)).to(device)
    opt = OPTIMIZERS[optimizer](model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(val_ds, batch_size=1000)
    best = 0.0
    for _ in range(EPOCHS):
        model.train()
        for xb, yb in train_loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            _ = loss.item()  # what every tutorial loop does: print or sum it
        sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in val_loader:
                xb, yb = xb.to(device), yb.to(device)
                correct += (model(xb).argmax(1) == yb).sum().item()
        best = max(best, correct / len(val_ds))
    return best


def run(spec_path: str, timeout: float, target: float, seed: int = 0, device: str = "cpu") -> dict:
    """Optimise on `device` until `timeout` seconds; when a finished trial first reached
    `target`."""
    data = load_data(load_spec(spec_path), "cpu")
    train_ds = TensorDataset(*data.train)
    val_ds = TensorDataset(*data.val)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
    )
    start = time.perf_counter()
    reached: list[float] = []

    def note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        elapsed = time.perf_counter() - start
        print(
            f"trial {trial.number}: val_accuracy {trial.value:.4f} at {elapsed:.0f} s", flush=True
        )
        if not reached and trial.value is not None and trial.value >= target:
            reached.append(elapsed)
            study.stop()

    study.optimize(
        lambda t: objective(t, train_ds, val_ds, device), timeout=timeout, callbacks=[note]
    )
    return {
        "seconds_to_target": reached[0] if reached else None,
        "trials": len(study.trials),
        "best_val_accuracy": study.best_value if study.trials else None,
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    flush_denormals()  # as hpo's processes do, before the first torch operation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="search_spaces/mnist.yaml")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(json.dumps(run(args.spec, args.timeout, args.target, device=args.device)))


if __name__ == "__main__":
    main()
