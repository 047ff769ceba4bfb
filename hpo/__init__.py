"""hpo: hyperparameter experiments for PyTorch multilayer perceptrons."""

__version__ = "0.1.0"
