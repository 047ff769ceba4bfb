"""The deployable model: the user's raw inputs in, answers in the user's terms out.

This file is logged with each model as MLflow "model code" and runs where the model is served,
where hpo may not be installed: it imports only numpy, pandas, torch and mlflow.

A `Predictor` holds the trained network and what the training split taught the data pipeline:
- tables (csv, parquet, openml): the data file's feature columns, the one-hot encoding of its
  categorical columns, and each feature's shift and scale;
- images (mnist, fashion_mnist, digits): raw pixel values (0-255 for MNIST, 0-16 for digits),
  one row per image, and each pixel's shift and scale;
then class labels as in the data (strings stay strings, numbers stay numbers), or values in the
target's own unit, and optionally each class's probability.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROWS_PER_PASS = 8192


class Predictor:
    """`network`: one trained network, or an ensemble of them as (weight, network) pairs,
    whose answer is the weighted mean of their probabilities (or values)."""

    def __init__(
        self, network: torch.nn.Module | list[tuple[float, torch.nn.Module]], prep: dict[str, Any]
    ):
        if isinstance(network, list):
            self.network: Any = [(float(w), net.cpu().eval()) for w, net in network]
        else:
            self.network = network.cpu().eval()
        self.prep = prep
        self.shift = np.asarray(prep["shift"], dtype=np.float32)
        self.scale = np.asarray(prep["scale"], dtype=np.float32)

    @classmethod
    def load(cls, network_path: str | Path, prep_path: str | Path) -> Predictor:
        network = torch.load(network_path, map_location="cpu", weights_only=False)
        return cls(network, json.loads(Path(prep_path).read_text()))

    def save(self, folder: Path) -> dict[str, str]:
        """The network and the preprocessing as files; their paths by artifact name."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.network, folder / "network.pt")
        (folder / "preprocessing.json").write_text(json.dumps(self.prep, indent=1))
        return {
            "network": str(folder / "network.pt"),
            "preprocessing": str(folder / "preprocessing.json"),
        }

    # ------------------------------------------------------------ inputs

    @property
    def columns(self) -> list[str]:
        """The raw feature columns a table model takes, in order."""
        return [c["name"] for c in self.prep.get("columns", [])]

    def features(self, data: Any) -> np.ndarray:
        """Raw rows -> the network's inputs, exactly as the training split was prepared."""
        if self.prep["kind"] == "table":
            X = self._encode(data)
        else:
            X = np.asarray(data)
            if X.ndim == 1:
                X = X.reshape(1, -1)
            X = X.reshape(len(X), -1).astype(np.float32)
            divisor = self.prep.get("input_divisor", 1.0)
            if divisor != 1.0:  # as the images were loaded for training: value / 255
                X = X / divisor
            if X.shape[1] != len(self.shift):
                raise ValueError(
                    f"expected {len(self.shift)} raw values a row "
                    f"({self.prep.get('input', 'features')}), got {X.shape[1]}"
                )
        return np.nan_to_num((X - self.shift) / self.scale)

    def _encode(self, data: Any) -> np.ndarray:
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise ValueError(f"missing feature columns: {', '.join(map(str, missing))}")
        frame = frame[self.columns].copy()
        for col in self.prep["columns"]:
            name, kind = col["name"], col["type"]
            if kind == "string":  # categories as the data file's text
                frame[name] = frame[name].map(lambda v: v if pd.isna(v) else str(v))
                frame[name] = frame[name].astype(object)
            elif kind == "boolean":
                frame[name] = [_boolean(v, name, row) for row, v in enumerate(frame[name])]
            else:
                values = pd.to_numeric(frame[name], errors="coerce")
                bad = values.isna() & frame[name].notna()
                if bad.any():
                    row = bad.to_numpy().nonzero()[0][0]
                    raise ValueError(
                        f"column {name!r}, row {row}: {frame[name].iloc[row]!r} is not a number"
                    )
                frame[name] = values.astype(np.float64)
        strings = [c["name"] for c in self.prep["columns"] if c["type"] == "string"]
        encoded = pd.get_dummies(frame, columns=strings, dtype=np.float32)
        encoded = encoded.reindex(columns=self.prep["encoded"], fill_value=0)
        return encoded.to_numpy(dtype=np.float32)

    # ------------------------------------------------------------ outputs

    def outputs(self, X: np.ndarray) -> torch.Tensor:
        """The network's outputs for prepared inputs, in large passes without gradients."""
        x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        with torch.inference_mode():
            parts = [
                self._forward(x[i : i + ROWS_PER_PASS]) for i in range(0, len(x), ROWS_PER_PASS)
            ]
        return torch.cat(parts) if parts else torch.zeros(0, self.prep["n_outputs"])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """One network's outputs; an ensemble's as the log of its mean probabilities (whose
        softmax is that mean) or its mean values."""
        if not isinstance(self.network, list):
            return self.network(x)
        if self.prep["task"] == "regression":
            return sum(w * net(x) for w, net in self.network)
        mean = sum(w * torch.softmax(net(x).float(), 1) for w, net in self.network)
        return torch.log(mean.clamp_min(1e-30))

    def predict(self, data: Any, probabilities: bool = False) -> np.ndarray | pd.DataFrame:
        """Class labels (or values in the target's unit), one per raw row; with
        `probabilities`, a frame with the label and one column per class."""
        out = self.outputs(self.features(data))
        if self.prep["task"] == "regression":
            return out.squeeze(1).double().numpy() * self.prep["y_std"] + self.prep["y_mean"]
        classes = self.prep["classes"]
        labels = np.empty(len(out), dtype=object)
        labels[:] = [classes[i] for i in out.argmax(1).tolist()]
        if not probabilities:
            return labels
        proba = torch.softmax(out.float(), 1).numpy()
        frame = pd.DataFrame(proba, columns=[f"probability_{c}" for c in classes])
        frame.insert(0, "prediction", labels)
        return frame


def read_rows(path: str | Path, prep: dict[str, Any]) -> pd.DataFrame:
    """Raw rows from a CSV or Parquet file, read as the training file was: categorical
    columns as text (so that "007" stays "007"); image rows of values, with a header or not."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if prep["kind"] == "table":
        text = {c["name"]: str for c in prep["columns"] if c["type"] == "string"}
        return pd.read_csv(path, dtype=text)
    first = pd.to_numeric(pd.read_csv(path, header=None, nrows=1).iloc[0], errors="coerce")
    counting = first.tolist() in (list(range(len(first))), list(range(1, len(first) + 1)))
    pixels = bool(first.notna().all()) and not counting  # a header "0,1,2,..." is a header
    return pd.read_csv(path, header=None if pixels else "infer")


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _boolean(value: Any, column: str, row: int) -> bool:
    """A boolean feature: True/False, 1/0 or their text; anything else is an error."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"column {column!r}, row {row}: {value!r} is not true or false")


try:  # where mlflow is installed (always, where the model is served)
    import mlflow.pyfunc

    class HpoModel(mlflow.pyfunc.PythonModel):
        """The pyfunc flavour: `mlflow.pyfunc.load_model(uri).predict(rows)`, and
        `params={"probabilities": True}` for each class's probability."""

        def load_context(self, context: Any) -> None:
            a = context.artifacts
            self.predictor = Predictor.load(a["network"], a["preprocessing"])

        # A DataFrame hint is one MLflow neither warns about nor enforces: rows arrive as
        # the signature (tables) or the caller (images) gives them.
        def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
            probabilities = bool((params or {}).get("probabilities", False))
            return self.predictor.predict(model_input, probabilities)

    if __name__.startswith("code_model_"):  # loaded by MLflow as the model's code
        mlflow.models.set_model(HpoModel())
except ImportError:  # pragma: no cover - the Predictor works without mlflow
    pass
