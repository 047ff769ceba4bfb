"""study.stop_when: a study stops at a target value, or once the search has converged (no
improvement beyond the noise in the last N trials), and says why."""

from __future__ import annotations

import datetime as dt

import optuna
from conftest import small_spec, study_run
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from hpo.config import parse_spec
from hpo.outcomes import stop_reason

START = dt.datetime(2026, 1, 1)


def _trial(number, value, state=TrialState.COMPLETE, **attrs):
    t = create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs=attrs,
    )
    t.number = number
    t.datetime_start = START
    t.datetime_complete = START + dt.timedelta(seconds=number + 1)
    return t


def _stop(**kw):
    return parse_spec(small_spec(study={"stop_when": kw})).study.stop_when


def test_a_target_stops_at_the_first_trial_to_reach_it_in_either_direction():
    trials = [_trial(0, 0.91), _trial(1, 0.97), _trial(2, 0.99)]
    assert stop_reason(trials, "MAXIMIZE", "val_accuracy", _stop(target=0.98), None) == (
        "trial #2 reached val_accuracy 0.9900 (stop_when.target: 0.98)"
    )
    assert stop_reason(trials, "MAXIMIZE", "val_accuracy", _stop(target=0.995), None) is None
    losses = [_trial(0, 0.40), _trial(1, 0.25)]
    assert "trial #1 reached" in stop_reason(
        losses, "MINIMIZE", "val_loss", _stop(target=0.3), None
    )


def test_a_plateau_counts_trials_since_the_best_improved_by_more_than_its_noise():
    stop = _stop(plateau={"trials": 3})
    # +0.001 over a best whose standard error is 0.005: within the noise, not an improvement
    trials = [
        _trial(0, 0.950, value_se=0.005),
        _trial(1, 0.940, value_se=0.005),
        _trial(2, 0.951, value_se=0.005),
        _trial(3, None, TrialState.PRUNED),
    ]
    said = stop_reason(trials, "MAXIMIZE", "val_accuracy", stop, None)
    assert said == (
        "plateau: the last 3 finished trials did not improve the best (val_accuracy 0.9510, "
        "trial #2) by more than its standard error (0.0050) (stop_when.plateau.trials: 3)"
    )
    # an improvement beyond the noise starts the count again
    beyond = trials[:2] + [_trial(2, 0.970, value_se=0.005), trials[3]]
    assert stop_reason(beyond, "MAXIMIZE", "val_accuracy", stop, None) is None
    # without members, the measured seed noise is the margin; without it, any improvement
    plain = [_trial(0, 0.95), _trial(1, 0.94), _trial(2, 0.955), _trial(3, 0.93)]
    assert "the seed noise (0.0100)" in stop_reason(plain, "MAXIMIZE", "m", stop, 0.01)
    assert stop_reason(plain, "MAXIMIZE", "m", stop, None) is None


def test_baselines_and_interrupted_trials_are_not_counted_toward_a_plateau():
    stop = _stop(plateau={"trials": 2})
    trials = [
        _trial(0, 0.90, baseline="small"),
        _trial(1, 0.95),
        _trial(2, None, TrialState.FAIL, interrupted=True),
        _trial(3, 0.91, baseline="large"),
        _trial(4, 0.94),
    ]
    assert stop_reason(trials, "MAXIMIZE", "m", stop, None) is None  # one searched trial since
    said = stop_reason(trials + [_trial(5, 0.93)], "MAXIMIZE", "m", stop, None)
    assert said.startswith(
        "plateau: the last 2 finished trials did not improve the best (m 0.9500"
    )


def test_a_study_stops_at_its_target_says_why_and_stops_again_when_run_again(workdir):
    spec = parse_spec(small_spec(study={"n_trials": 20, "stop_when": {"target": 0.5}}))
    result = study_run(spec)
    study = result.study
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) < 20
    first = min((t for t in complete if t.value >= 0.5), key=lambda t: t.datetime_complete)
    assert result.stopped_because == (
        f"trial #{first.number} reached val_accuracy {first.value:.4f} (stop_when.target: 0.5)"
    )
    again = study_run(spec)
    assert again.new_trials == 0 and again.stopped_because == result.stopped_because
    from hpo.reports.data import report_data
    from hpo.reports.render import facts

    shown = dict(facts(report_data(study)))
    assert shown["Stopped before the budget"] == result.stopped_because
    assert len(optuna.load_study(study_name="tiny", storage="sqlite:///optuna.db").trials) == (
        len(study.trials)
    )


def test_a_plateau_without_repeats_stops_judged_against_the_seed_noise_once_measured(workdir):
    """The noise is measured beside the study (`NoiseProbe`, tested below): until it is in, a
    plateau is judged on any improvement, which stops no sooner than the noise would."""
    spec = parse_spec(
        small_spec(
            study={"n_trials": 40, "stop_when": {"plateau": {"trials": 3}}},
            search_space={"n_layers": 1, "width": 16, "lr": 0.003},
        )  # fmt: skip
    )  # one configuration: nothing to improve but noise
    result = study_run(spec)
    assert result.stopped_because.startswith("plateau: the last 3 finished trials")
    noise = result.study.user_attrs.get("seed_noise")
    if noise is None:
        assert "by more than anything" in result.stopped_because
    else:  # the best when a plateau could first be reached, trained with two more seeds
        measured = result.study.trials[noise["trial"]]
        assert len(noise["values"]) == 3 and noise["values"][0] == measured.value
        assert f"the seed noise ({noise['sd']:.4f})" in result.stopped_because
    assert result.counts["COMPLETE"] < 40


def test_the_seed_noise_is_measured_in_a_process_of_its_own():
    from hpo.executors.local import NoiseProbe

    spec = parse_spec(small_spec(training={"max_epochs": 3}))
    config = {"n_layers": 1, "width": 16, "lr": 0.003, "batch_size": 64}
    probe = NoiseProbe(spec, "cpu", config, [11, 12], "val_accuracy")
    import time

    while (values := probe.result()) is None:
        time.sleep(0.05)
    probe.close()
    assert len(values) == 2 and values[0] != values[1]
    assert all(0 < v <= 1 for v in values)


def test_an_empty_stop_when_is_refused():
    import pytest

    from hpo.config import SpecError

    with pytest.raises(SpecError, match="give target, plateau or both"):
        parse_spec(small_spec(study={"stop_when": {}}))
