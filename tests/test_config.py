"""Every bad-input rule of the spec page, and the valid specs shipped in search_spaces/."""

from __future__ import annotations

import pytest
from conftest import REPO, small_spec, write_spec

from hpo.config import SpecError, load_spec, parse_spec
from hpo.params import PARAMS


def problems_of(spec: dict, tmp_path=None) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(spec, source_dir=tmp_path or ".")
    return info.value.problems


def file_problems(spec: dict, tmp_path) -> list[str]:
    """A csv spec parses without reading its files; loading its data checks them."""
    from hpo.data import load_data

    parsed = parse_spec(spec, source_dir=tmp_path)
    with pytest.raises(SpecError) as info:
        load_data(parsed)
    return info.value.problems


def one_problem(spec: dict, tmp_path=None) -> str:
    problems = problems_of(spec, tmp_path)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize(
    "path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_specs_are_valid(path):
    spec = load_spec(path)
    assert spec.name and spec.search_space


def test_valid_small_spec_parses_with_defaults():
    spec = parse_spec(small_spec())
    assert spec.study.n_trials == 3
    assert spec.training.early_stopping.monitor == "val_loss"
    assert spec.space["batch_size"] == 64
    assert spec.space["lr"].log is True


def test_unknown_top_level_key_suggests_nearest():
    msg = one_problem(small_spec(trainig={"max_epochs": 3}))
    assert msg.startswith("trainig: unknown key; did you mean 'training'?")


def test_unknown_nested_key_suggests_nearest():
    msg = one_problem(small_spec(training={"early_stopping": {"patiense": 3}}))
    assert msg.startswith(
        "training.early_stopping.patiense: unknown key; did you mean 'patience'?"
    )


def test_unknown_hyperparameter_suggests_nearest():
    spec = small_spec()
    spec["search_space"]["lrr"] = 0.1
    msg = one_problem(spec)
    assert msg.startswith("search_space.lrr: unknown hyperparameter; did you mean 'lr'?")


def test_unknown_distribution_key_suggests_nearest():
    spec = small_spec()
    spec["search_space"]["lr"]["hihg"] = 0.1
    assert "search_space.lr.hihg: unknown key; did you mean 'high'?" in problems_of(spec)[0]


def test_wrong_type_names_path_and_value():
    msg = one_problem(small_spec(training={"max_epochs": "many"}))
    assert msg.startswith("training.max_epochs:") and "'many'" in msg


def test_low_greater_than_high():
    spec = small_spec()
    spec["search_space"]["width"] = {"type": "int", "low": 64, "high": 16}
    assert one_problem(spec) == "search_space.width: low must be <= high (got low=64, high=16)"


def test_log_with_non_positive_low():
    spec = small_spec()
    spec["search_space"]["dropout"] = {"type": "float", "low": 0.0, "high": 0.5, "log": True}
    assert one_problem(spec) == "search_space.dropout.low: must be > 0 when log: true (got 0.0)"


def test_a_range_is_held_to_the_hyperparameters_bounds():
    """A range's ends are values of the hyperparameter: the table's bounds hold for them."""
    spec = small_spec()
    spec["search_space"]["lr"] = {"type": "float", "low": 0.0, "high": 0.1}
    spec["search_space"]["dropout"] = {"type": "float", "low": 0.1, "high": 1.0}
    spec["search_space"]["width"] = {"type": "float", "low": 8, "high": 64}
    assert problems_of(spec) == [
        "search_space.width.type: width takes type: int or categorical, or a fixed value "
        "(got float)",
        "search_space.dropout.high: must be < 1.0 (got 1.0)",
        "search_space.lr.low: must be > 0.0 (got 0.0)",
    ]


def test_step_with_log():
    spec = small_spec()
    spec["search_space"]["lr"] = {
        "type": "float",
        "low": 1e-3,
        "high": 0.1,
        "log": True,
        "step": 0.01,
    }
    assert one_problem(spec) == "search_space.lr.step: cannot be combined with log: true"


def test_empty_choices():
    spec = small_spec()
    spec["search_space"]["activation"] = {"type": "categorical", "choices": []}
    assert one_problem(spec) == "search_space.activation.choices: must not be empty"


@pytest.mark.parametrize(
    ("override", "path", "expected"),
    [
        ({"dataset": {"name": "mnsit"}}, "dataset.name", "did you mean 'mnist'?"),
        ({"study": {"sampler": {"name": "tpee"}}}, "study.sampler.name", "did you mean 'tpe'?"),
        ({"study": {"pruner": {"name": "medain"}}}, "study.pruner.name", "did you mean 'median'?"),
    ],
)
def test_unknown_registry_names(override, path, expected):
    msgs = problems_of(small_spec(**override))
    assert any(m.startswith(path) and expected in m for m in msgs), msgs


def test_unknown_activation_and_optimizer_are_both_reported():
    spec = small_spec()
    spec["search_space"]["activation"] = {"type": "categorical", "choices": ["relu", "relux"]}
    spec["search_space"]["optimizer"] = "adan"
    msgs = problems_of(spec)
    assert len(msgs) == 2
    assert msgs[0].startswith("search_space.activation.choices[1]: unknown activation 'relux'")
    assert "did you mean 'relu'?" in msgs[0]
    assert msgs[1].startswith("search_space.optimizer: unknown optimizer 'adan'")
    assert "did you mean 'adam'?" in msgs[1]


def test_all_problems_reported_at_once():
    spec = small_spec(trainig=1, study={"n_trials": 0, "metric": "val_rmse"})
    spec["search_space"]["lr"] = {"type": "float", "low": 0.0, "high": 0.1, "log": True}
    msgs = problems_of(spec)
    assert len(msgs) == 4, msgs
    assert {m.split(":")[0] for m in msgs} == {
        "trainig",
        "search_space.lr.low",
        "study.metric",
        "study.n_trials",
    }


def test_metric_that_does_not_fit_the_task():
    msg = one_problem(small_spec(study={"metric": "val_rmse"}))
    assert msg.startswith("study.metric: 'val_rmse' does not fit a classification task")


def test_missing_data_file(tmp_path):
    spec = small_spec(dataset={"name": "csv", "path": "nope.csv", "target": "y"})
    [msg] = file_problems(spec, tmp_path)
    assert msg.startswith("dataset.path: file not found:") and "nope.csv" in msg


def test_missing_target_column(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,x\n3,4,y\n")
    [msg] = file_problems(
        small_spec(dataset={"name": "csv", "path": "d.csv", "target": "lable"}), tmp_path
    )
    assert msg.startswith("dataset.target: no column 'lable' in d.csv; did you mean 'label'?")


def test_constant_target_column(tmp_path):
    (tmp_path / "d.csv").write_text("a,label\n1,x\n3,x\n")
    [msg] = file_problems(
        small_spec(dataset={"name": "csv", "path": "d.csv", "target": "label"}), tmp_path
    )
    assert msg.startswith("dataset.target: column 'label' in d.csv is constant")


def test_csv_task_inferred_from_target_for_metric_check(tmp_path):
    (tmp_path / "r.csv").write_text("a,y\n" + "".join(f"{i},{i * 0.37}\n" for i in range(40)))
    spec = small_spec(dataset={"name": "csv", "path": "r.csv", "target": "y"}, task="auto")
    [msg] = file_problems(spec, tmp_path)
    assert msg.startswith("study.metric: 'val_accuracy' does not fit a regression task")


def test_conditional_must_name_another_entry():
    spec = small_spec()
    spec["search_space"]["momentum"] = {
        "type": "float",
        "low": 0.0,
        "high": 0.9,
        "when": {"optimiser": ["sgd"]},
    }
    assert one_problem(spec).startswith("search_space.momentum.when.optimiser: must name another")


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndataset: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "invalid YAML at line" in info.value.problems[0]


def test_fingerprint_ignores_budget_but_not_search_space():
    a = parse_spec(small_spec())
    b = parse_spec(small_spec(study={"n_trials": 50}))
    spec = small_spec()
    spec["search_space"]["batch_size"] = 32
    c = parse_spec(spec)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_a_fractional_step_of_an_int_range_is_refused():
    spec = small_spec()
    spec["search_space"]["n_layers"] = {"type": "int", "low": 1, "high": 4, "step": 0.5}
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.problems == ["search_space.n_layers.step: must be an integer (got 0.5)"]


def test_precision_auto_keeps_older_studies_fingerprint_and_bf16_changes_it():
    before = parse_spec(small_spec())
    auto = parse_spec(small_spec(training={"precision": "auto"}))
    bf16 = parse_spec(small_spec(training={"precision": "bf16"}))
    assert before.fingerprint() == auto.fingerprint() != bf16.fingerprint()


def test_unknown_precision_is_one_problem_line():
    with pytest.raises(SpecError) as info:
        parse_spec(small_spec(training={"precision": "half"}))
    assert info.value.problems == [
        "training.precision: must be one of auto, fp32, tf32, bf16 (got 'half')"
    ]


def test_relative_data_path_resolves_against_spec_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("a,label\n1,x\n3,y\n")
    path = write_spec(
        tmp_path / "sub", small_spec(dataset={"name": "csv", "path": "d.csv", "target": "label"})
    )
    assert load_spec(path).data_path("path") == tmp_path / "sub" / "d.csv"


def test_numbers_in_exponent_form_without_a_dot_are_numbers(tmp_path):
    """`1e-3` is a number as in YAML 1.2 (PyYAML's YAML 1.1 reads it as a string); a quoted
    one stays a string and is refused where a number is wanted."""
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: exp\ndataset: {name: digits}\nsearch_space:\n  lr: 1e-3\n"
        "  weight_decay: {type: categorical, choices: [0, 1E-5, 2.5e-4]}\n"
        "  l1: {type: float, low: 1e-7, high: 1e-4, log: true}\n"
    )
    space = load_spec(path).space
    assert space["lr"] == 1e-3 and type(space["lr"]) is float
    assert space["weight_decay"].choices == [0, 1e-5, 2.5e-4]
    assert (space["l1"].low, space["l1"].high) == (1e-7, 1e-4)
    path.write_text(path.read_text().replace("lr: 1e-3", 'lr: "1e-3"'))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.problems == ["search_space.lr: must be a number (got '1e-3')"]


def test_a_spec_parses_without_reading_its_data_files(tmp_path):
    """`hpo report` and `hpo compare` read stored specs whose data may have moved: parsing one
    reads no file; loading the data says what is wrong."""
    spec = small_spec(dataset={"name": "csv", "path": "gone.csv", "target": "y"}, task="auto")
    parsed = parse_spec(spec, source_dir=tmp_path)
    assert parsed.dataset.path == "gone.csv"
    assert file_problems(spec, tmp_path)[0].startswith("dataset.path: file not found:")


# Recorded by hpo before the spec became typed models: a study stored by it must resume.
_FINGERPRINTS_BEFORE = {
    "digits.yaml": "42dab20310480cd2",
    "fashion_mnist.yaml": "a5d2b4565c7aea6a",
    "mnist.yaml": "38e7eb04d8cb742e",
    "wine_csv.yaml": "7721ad3c317b49ea",
    "xor.yaml": "d61ebb542b2cc8bd",
}


@pytest.mark.parametrize("name", sorted(_FINGERPRINTS_BEFORE))
def test_a_shipped_specs_fingerprint_is_the_one_stored_studies_have(name):
    assert load_spec(REPO / "search_spaces" / name).fingerprint() == _FINGERPRINTS_BEFORE[name]


def test_fingerprints_hash_values_as_written_not_as_typed():
    """A size given as text, a choice given as an int (a float once typed) and distributions
    of every kind hash as hpo hashed them before the typed models."""
    space = small_spec()["search_space"] | {
        "weight_decay": {"type": "categorical", "choices": [0, 1e-5]},
        "dropout": {"type": "float", "low": 0, "high": 0.5, "step": 0.1},
        "width": {"type": "int", "low": 16, "high": 64, "per_layer": True},
        "momentum": {"type": "float", "low": 0.0, "high": 0.9, "when": {"optimizer": "sgd"}},
        "optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
        "batchnorm": True,
        "l1": 0,
    }
    size = {"memory_limit": "8GB", "max_params": 100000}
    assert parse_spec(small_spec(search_space=space)).fingerprint() == "b631168996c8c664"
    assert parse_spec(small_spec(training=size)).fingerprint() == "a7e276dff1b6415b"
    assert parse_spec(small_spec(training={"memory_limit": 2**30})).fingerprint() == (
        "d4ccff296659ff7d"
    )
    assert parse_spec(small_spec(training=size)).training.memory_limit == 8 * 10**9


def test_the_spec_schema_describes_every_hyperparameter_and_distribution():
    """What an editor reads (`Spec.model_json_schema()`): each hyperparameter with its bounds,
    the registries' names, and distributions told apart by `type`."""
    from hpo.config import Spec

    schema = Spec.model_json_schema()
    defs = schema["$defs"]
    space = defs["SearchSpace"]["properties"]
    assert set(space) == set(PARAMS) and defs["SearchSpace"]["additionalProperties"] is False
    fixed, dist = space["dropout"]["oneOf"]
    assert (fixed["minimum"], fixed["exclusiveMaximum"]) == (0.0, 1.0)
    assert set(dist["discriminator"]["mapping"]) == {"int", "float", "categorical"}
    assert set(space["activation"]["oneOf"][1]["discriminator"]["mapping"]) == {"categorical"}
    assert "relu" in space["activation"]["oneOf"][0]["enum"]
    assert "tpe" in defs["SamplerSpec"]["properties"]["name"]["enum"]


def test_a_spec_crosses_to_a_worker_process_whole():
    """Worker processes receive the spec pickled: its typed entries, the entries as written
    (the fingerprint) and the baselines arrive as they left."""
    import pickle

    spec = parse_spec(small_spec(baselines=[{"name": "a", "width": [8, 4], "n_layers": 2}]))
    back = pickle.loads(pickle.dumps(spec))
    assert back.space == spec.space and back.fingerprint() == spec.fingerprint()
    assert back.baseline_config("a") == spec.baseline_config("a")


def test_a_value_set_from_the_command_line_keeps_the_studys_fingerprint(tmp_path):
    """`--n-trials` changes no trial: the study resumes, and logs the file as written; a new
    `max_epochs` does change them, and the study logs the document with it."""
    import yaml

    path = write_spec(tmp_path, small_spec(training={"memory_limit": "8GB"}))
    spec = load_spec(path)
    more = spec.with_values({"study.n_trials": 50})
    assert more.study.n_trials == 50 and more.fingerprint() == spec.fingerprint()
    assert more.to_yaml() == spec.to_yaml() == path.read_text()
    shorter = spec.with_values({"training.max_epochs": 2})
    assert shorter.fingerprint() != spec.fingerprint()
    again = parse_spec(yaml.safe_load(shorter.to_yaml()))
    assert again.training.max_epochs == 2 and again.fingerprint() == shorter.fingerprint()
    with pytest.raises(SpecError) as e:
        spec.with_values({"study.n_trials": 0})
    assert e.value.problems == ["study.n_trials: must be >= 1 (got 0)"]
