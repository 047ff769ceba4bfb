"""search_spaces/xor.yaml: XOR, which no model without a hidden layer can fit, run for real."""

from __future__ import annotations

import html
import re
import subprocess
import sys

import optuna
import yaml
from conftest import REPO, study_run

from hpo.config import parse_spec
from hpo.diagnose import RULES
from hpo.reports import write_report
from hpo.reports.data import report_data

SPEC = REPO / "search_spaces" / "xor.yaml"


def test_the_xor_data_is_what_its_script_writes(tmp_path):
    script = REPO / "search_spaces" / "data" / "make_xor.py"
    copy = tmp_path / "make_xor.py"
    copy.write_text(script.read_text())
    subprocess.run([sys.executable, str(copy)], check=True)
    assert (tmp_path / "xor.csv").read_text() == (SPEC.parent / "data" / "xor.csv").read_text()
    rows = (tmp_path / "xor.csv").read_text().splitlines()
    assert rows[0] == "x1,x2,label" and len(rows) == 401
    labels = [int(r.rsplit(",", 1)[1]) for r in rows[1:]]
    assert labels.count(0) == labels.count(1) == 200


def test_xor_spec_validates():
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "validate", str(SPEC)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok - study 'xor-mlp' on csv" in out.stdout and "2 baselines first" in out.stdout
    assert "2 features, 2 classes" in out.stdout


def test_depth_0_cannot_fit_xor_and_one_hidden_layer_can(workdir, mlflow_uri):
    raw = yaml.safe_load(SPEC.read_text())
    raw["study"]["n_trials"] = 3  # the two baselines and one searched trial
    raw["training"]["device"] = "cpu"
    raw["tracking"] = {"uri": mlflow_uri, "log_model": "none"}
    study_run(parse_spec(raw, source_dir=SPEC.parent))
    study = optuna.load_study(study_name="xor-mlp", storage="sqlite:///optuna.db")
    by_name = {t.user_attrs["baseline"]: t for t in study.trials if "baseline" in t.user_attrs}
    linear, hidden = by_name["perceptron"], by_name["one-hidden-layer"]
    assert linear.user_attrs["config"]["widths"] == [] and hidden.user_attrs["config"]["widths"]
    # no straight line separates XOR: at best 3 of the 4 corners, 75%
    assert 0.4 <= linear.value <= 0.8 and linear.user_attrs["fit"] == "underfit"
    assert "learned little" in linear.user_attrs["fit_evidence"]
    assert hidden.value >= 0.95 and hidden.user_attrs["fit"] == "good"

    d = report_data(study, mlflow_uri)
    rows = {b.name: b for b in d.baselines}
    assert rows["perceptron"].value == linear.value and rows["perceptron"].fit == "underfit"
    assert rows["one-hidden-layer"].value == hidden.value
    out = write_report(study, workdir / "rep", mlflow_uri)
    md = (out / "report.md").read_text()
    row = re.search(r"^\| perceptron \| #\d+ \| (.+?) \| ([\d.]+) \| (\w+):", md, re.M)
    assert (
        row.group(1) == "depth 0, the perceptron: no hidden layer (a linear model); adam, lr 0.03"
    )
    assert 0.4 <= float(row.group(2)) <= 0.8 and row.group(3) == "underfit"
    row = re.search(r"^\| one-hidden-layer \| #\d+ \| (.+?) \| ([\d.]+) \| (\w+):", md, re.M)
    assert row.group(1) == "hidden layers 8 (tanh); adam, lr 0.03"
    assert float(row.group(2)) >= 0.95 and row.group(3) == "good"
    page = (out / "index.html").read_text()
    assert RULES in md and html.escape(RULES) in page  # the fit rules beside the table
    assert (
        "<h3>Baselines</h3>" in page
        and "depth 0, the perceptron: no hidden layer (a linear model)" in page
    )
    assert study.user_attrs["test_metrics"]["test_accuracy"] >= 0.95
