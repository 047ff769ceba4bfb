"""Workers per device and the cohort size chosen from a probe (`hpo.executors.autoplan`): the
rules on made-up timings, the probe on real ones (on this machine's CPU: the path is the same
on a GPU, where the API takes it when the user gives neither), and a study run on the plan."""

from __future__ import annotations

import optuna
import pytest
import torch
from conftest import small_spec

import hpo
from hpo.config import parse_spec
from hpo.data import load_data
from hpo.executors import autoplan, local
from hpo.executors.autoplan import RULES, Probe, choose
from hpo.executors.local import ProcessExecutor, chooses_plan, cpu_count, local_executor
from hpo.study import run_study
from hpo.tracking import tracker_for


def _probe(epoch_s: dict[int, float], setup_s: float = 0.1) -> Probe:
    return Probe("64-32-10 at batch 64", epoch_s, {k: setup_s for k in epoch_s})


LAUNCH_BOUND = {1: 0.10, 2: 0.10, 4: 0.11, 8: 0.12, 16: 0.13}  # a stack costs little more
COMPUTE_BOUND = {1: 0.10, 2: 0.20, 4: 0.40}  # a stack costs K times one


def test_a_launch_bound_net_is_fused_up_to_the_budgets_share_of_free_cohorts():
    wide_budget = choose(_probe(LAUNCH_BOUND), searched=200, max_epochs=20, cores=2, devices=1)
    # 16 trains 16 / 0.13 = 123 trial-epochs a second, 8 67 (< 90% of 123): 16
    assert wide_budget.fused_trials == 16
    # 40 trials keep at least 8 cohorts whose structure the sampler picks freely: 4 a cohort
    small_budget = choose(_probe(LAUNCH_BOUND), searched=40, max_epochs=20, cores=2, devices=1)
    assert small_budget.fused_trials == 5  # 40 / 8: 5 (an epoch of 5 interpolated)
    assert choose(_probe(LAUNCH_BOUND), searched=7, max_epochs=20, cores=2,
                  devices=1).fused_trials == 1  # fmt: skip


def test_a_trial_of_several_members_fuses_fewer_trials_and_says_so():
    # 5 folds a trial: the best stack, 16 nets, holds 3 trials; 5 and 15 nets interpolated
    plan = choose(_probe(LAUNCH_BOUND), searched=200, max_epochs=20, cores=2, devices=1,
                  members=5)  # fmt: skip
    assert plan.fused_trials == 3
    assert "a trial's epoch 0.113 s (5 nets), 0.129 s for 3 fused" in plan.why


def test_epochs_of_sizes_not_probed_are_interpolated_and_grow_past_the_largest():
    probe = _probe({1: 0.1, 2: 0.1, 4: 0.2})
    assert probe.epoch(3) == pytest.approx(0.15)
    assert probe.epoch(8) == pytest.approx(0.4)
    assert probe.setup(3) == probe.setup_s[4] and probe.setup(9) == probe.setup_s[4]


def test_a_compute_bound_net_is_not_fused():
    plan = choose(_probe(COMPUTE_BOUND), searched=200, max_epochs=20, cores=2, devices=1)
    assert plan.fused_trials == 1
    assert "a trial's epoch 0.1 s; one worker would keep the GPU" in plan.why


def test_the_smallest_cohort_within_a_tenth_of_the_best_is_chosen():
    # 8: 8 / 0.2 = 40 a second; 4: 4 / 0.11 = 36.4, 91% of it: 4 is enough
    probe = _probe({1: 0.1, 2: 0.1, 4: 0.11, 8: 0.2})
    assert choose(probe, searched=500, max_epochs=10, cores=2, devices=1).fused_trials == 4


def test_workers_cover_the_gaps_of_short_trials_within_the_cores():
    # epochs of 0.1 s, 10 a trial (half of 20): 1 s training, 1 s outside (setup + hand-over)
    probe = _probe({1: 0.1}, setup_s=1.0 - RULES["hand_over_s"])
    plan = choose(probe, searched=40, max_epochs=20, cores=16, devices=1)
    assert plan.workers_per_device == 2 and "50% busy" in plan.why
    # outside 9 times the training: as many as allowed
    busy_10 = _probe({1: 0.1}, setup_s=9.0 - RULES["hand_over_s"])
    plan = choose(busy_10, searched=40, max_epochs=20, cores=16, devices=1)
    assert plan.workers_per_device == RULES["max_workers_per_device"]
    # one core for the driver: on 2 cores one worker; on 5 cores over 2 GPUs, 2 each
    assert choose(busy_10, searched=40, max_epochs=20, cores=2, devices=1).workers_per_device == 1
    assert choose(busy_10, searched=40, max_epochs=20, cores=5, devices=2).workers_per_device == 2
    # long trials keep the device busy with one worker
    long = _probe({1: 10.0}, setup_s=0.5)
    assert choose(long, searched=40, max_epochs=20, cores=16, devices=1).workers_per_device == 1


def test_a_plan_that_does_not_fit_the_memory_is_cut_to_one_that_does():
    busy_10 = _probe(LAUNCH_BOUND, setup_s=20.0)
    fits = lambda workers, fused: workers * fused <= 4  # noqa: E731
    plan = choose(busy_10, searched=200, max_epochs=20, cores=16, devices=1, fits=fits)
    assert plan.fused_trials == 4 and plan.workers_per_device == 1
    nothing_fused = lambda workers, fused: fused == 1  # noqa: E731
    plan = choose(busy_10, searched=200, max_epochs=20, cores=16, devices=1, fits=nothing_fused)
    assert plan.fused_trials == 1 and plan.workers_per_device == RULES["max_workers_per_device"]


def test_the_probe_trains_the_middle_of_the_search_space():
    space = {
        "n_layers": {"type": "int", "low": 1, "high": 3},
        "width": {"type": "int", "low": 16, "high": 64, "log": True},  # geometric: 32
        "activation": {"type": "categorical", "choices": ["relu", "tanh", "gelu"]},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128, 256]},
    }
    config = autoplan.typical_config(parse_spec(small_spec(search_space=space)))
    assert config.widths == (32, 32) and config.activation == "tanh"
    assert config.lr == pytest.approx(1e-3) and config.dropout == pytest.approx(0.2)
    assert config.batch_size == 128


def test_the_probe_times_real_epochs_of_growing_cohorts():
    spec = parse_spec(small_spec())
    data = load_data(spec, "cpu")
    probe = autoplan.probe(spec, data, ladder=(1, 2, 4))
    ks = list(probe.epoch_s)
    assert ks[0] == 1 and ks == sorted(ks) and set(ks) <= {1, 2, 4}
    assert all(s > 0 for s in probe.epoch_s.values())
    assert all(s > 0 for s in probe.setup_s.values())
    assert probe.net.startswith("64-") and probe.net.endswith("-10 at batch 64")


def test_the_choice_is_made_on_gpus_only_and_only_when_nothing_is_given():
    spec = parse_spec(small_spec())
    assert chooses_plan(spec, ["cuda:0", "cuda:1"], None, None)
    assert not chooses_plan(spec, ["cpu"], None, None)  # a CPU: one worker, trials alone
    assert not local_executor(spec).auto
    assert not chooses_plan(spec, ["cuda:0"], 1, None)
    assert not chooses_plan(spec, ["cuda:0"], None, 2)
    fused_given = parse_spec(small_spec(study={"fused_trials": 1}))
    assert not chooses_plan(fused_given, ["cuda:0"], None, None)
    executor = ProcessExecutor(spec, ["cpu"], 1)  # not auto: the spec as it was
    assert executor.adapt(spec, None) is spec


def test_a_study_runs_on_the_plan_its_probe_chose(tmp_path):
    spec = parse_spec(small_spec(study={"n_trials": 8}))
    executor = ProcessExecutor(spec, ["cpu"], 1, auto=True)
    started = {}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracker = tracker_for(spec, f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_study(spec, tracker, executor, storage=storage, on_start=started.update)
    chosen = executor.spec.study.fused_trials
    assert started["fused_trials"] == chosen == 1  # 8 trials: fewer than 8 cohorts of 2
    assert "chosen from a probe of 64-" in started["workers"]
    assert "would keep the CPU" in started["workers"]
    assert 1 <= executor.slots <= min(RULES["max_workers_per_device"], max(1, cpu_count() - 1))
    assert started["workers"].startswith(f"{executor.slots} worker process")
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 8 and all(t.state.is_finished() for t in study.trials)


def test_the_probe_runs_in_a_process_of_its_own_and_a_failure_is_one_line():
    spec = parse_spec(small_spec())
    probe = local.probe_apart(spec, "cpu")
    assert isinstance(probe, Probe) and probe.net.startswith("64-") and 1 in probe.epoch_s
    if not torch.cuda.is_available():
        failed = local.probe_apart(spec, "cuda:0")  # no CUDA here: the child says so
        assert isinstance(failed, str) and "\n" not in failed and "CUDA" in failed


def test_a_probe_that_fails_leaves_the_plain_plan_and_says_why(monkeypatch):
    monkeypatch.setattr(
        local, "probe_apart", lambda spec, device: "CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    spec = parse_spec(small_spec())
    executor = ProcessExecutor(spec, ["cpu"], 1, auto=True)
    assert executor.adapt(spec, load_data(spec, "cpu")).study.fused_trials == 1
    assert executor.slots == 1
    assert executor.description.endswith(
        "(not chosen: the probe failed (CUDA out of memory. Tried to allocate 2.00 GiB); "
        "1 worker a device, trials alone)"
    )


def test_a_cohort_chosen_for_a_larger_budget_trains_fused(tmp_path, monkeypatch):
    """The plan's cohort size reaches the driver: with every probed size as fast as one, 16
    searched trials make cohorts of 2."""
    monkeypatch.setattr(local, "probe_apart", lambda spec, device: _probe({1: 0.1, 2: 0.1}))
    spec = parse_spec(small_spec(study={"n_trials": 16}))
    executor = ProcessExecutor(spec, ["cpu"], 1, auto=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tracker = tracker_for(spec, f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_study(spec, tracker, executor, storage=storage)
    assert executor.spec.study.fused_trials == 2
    study = optuna.load_study(study_name="tiny", storage=storage)
    fused = [t for t in study.trials if len(t.user_attrs.get("fused_with", [])) == 2]
    assert len(study.trials) == 16 and len(fused) >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_on_a_gpu_the_api_chooses_and_the_first_line_says_so(workdir):
    started = {}
    spec = small_spec(training={"device": "cuda"}, study={"n_trials": 16})
    result = hpo.run(spec, on_start=started.update)
    assert "chosen from a probe of 64-" in started["workers"]
    assert "would keep the GPU" in started["workers"]
    assert started["fused_trials"] in autoplan.LADDER and started["fused_trials"] <= 2
    assert result.summary.counts["COMPLETE"] + result.summary.counts["PRUNED"] == 16
