"""A worker trains ahead of the driver's answers while its epochs are short, reads every answer
in order, and never takes an answer for a job message (`hpo.executors.worker._Answers`,
`hpo.executors.local.WorkerSlots`). No timing: the channel is a fake whose answers arrive when
the test says, and an epoch's length is the `epoch_seconds` it reports."""

from __future__ import annotations

import collections

import pytest

from hpo.executors import Done, Epoch
from hpo.executors.local import WorkerSlots
from hpo.executors.worker import AHEAD, RUN_AHEAD_BELOW_S, _Answers


class Channel:
    """The worker's end: what it sent, and the answers the driver has sent so far."""

    def __init__(self):
        self.sent: list[tuple] = []
        self.inbox: collections.deque = collections.deque()

    def send(self, message):
        self.sent.append(message)

    def recv(self):
        if not self.inbox:
            raise AssertionError("the worker waited for an answer that was not sent")
        return self.inbox.popleft()

    def poll(self):
        return bool(self.inbox)


FAST = {"val_loss": 1.0, "epoch_seconds": RUN_AHEAD_BELOW_S / 10}
SLOW = {"val_loss": 1.0, "epoch_seconds": RUN_AHEAD_BELOW_S}


def test_short_epochs_run_ahead_and_a_late_prune_stops_the_trial_at_the_next_epoch():
    channel = Channel()
    answers = _Answers(channel)
    assert answers({7: FAST}, 1, set()) == {7: None}  # no answer yet: it trains on
    assert answers({7: FAST}, 2, set()) == {7: None}
    channel.inbox += [("decision", None), ("decision", "pruned")]  # epochs 1 and 2
    assert answers({7: FAST}, 3, set()) == {7: "pruned"}  # read after epoch 3: it stops there
    assert [m[2] for m in channel.sent] == [1, 2, 3]  # every epoch it trained was reported
    channel.inbox.append(("decision", "pruned"))
    assert answers.settle() is False and not channel.inbox  # epoch 3's answer read too


def test_at_most_AHEAD_epochs_go_unanswered():
    channel = Channel()
    answers = _Answers(channel)
    for epoch in range(1, AHEAD + 1):
        answers({1: FAST}, epoch, set())
    with pytest.raises(AssertionError, match="waited"):  # one more: it waits for the oldest
        answers({1: FAST}, AHEAD + 1, set())


def test_a_trials_last_epoch_reads_every_answer_so_a_prune_in_time_ends_it_pruned():
    class InFlight(Channel):  # the answers are on their way: recv waits for them, poll no
        def poll(self):
            return False

    channel = InFlight()
    answers = _Answers(channel)
    assert answers({5: FAST}, 1, set()) == {5: None}
    channel.inbox += [("decision", "pruned"), ("decision", None)]  # epochs 1 and 2
    # epoch 2 is its last (early stopping): it waits for both answers, the prune included
    assert answers({5: FAST}, 2, {5}) == {5: "pruned"}
    assert not answers.owed and not channel.inbox


def test_slow_epochs_wait_for_their_own_answer():
    channel = Channel()
    answers = _Answers(channel)
    channel.inbox.append(("decision", "pruned"))
    assert answers({3: SLOW}, 1, set()) == {3: "pruned"}
    assert not answers.owed


def test_a_cohort_reads_one_answer_per_member_in_order_and_an_exit_interrupts_the_rest():
    channel = Channel()
    answers = _Answers(channel)
    assert answers({1: FAST, 2: FAST}, 1, set()) == {1: None, 2: None}
    channel.inbox += [("decision", "pruned"), ("decision", None)]
    assert answers({1: FAST, 2: FAST}, 2, set()) == {1: "pruned", 2: None}
    channel.inbox += [("exit",)]  # the driver closes instead of answering epoch 2
    assert answers({2: FAST}, 3, set()) == {2: "interrupted"}
    assert answers.settle() is True  # serve's loop ends: the second "exit" is its own


class Slots(WorkerSlots):
    def __init__(self, slots):
        self._init_slots(slots)
        self.sent: list[tuple[int, tuple]] = []
        self._ready = [True] * slots

    def _send(self, i, message):
        self.sent.append((i, message))


class Job:
    def __init__(self, *numbers):
        self.numbers = list(numbers)


def test_a_worker_gets_no_new_job_before_its_last_epochs_are_answered():
    slots = Slots(1)
    slots.submit(Job(0))
    assert slots._receive(0, ("epoch", 0, 1, FAST)) == Epoch(0, 1, FAST)
    assert slots._receive(0, ("done", 0, "record")) == Done(0, "record")
    slots.submit(Job(1))  # the worker still reads epoch 1's answer: the job waits
    assert [m[0] for _, m in slots.sent] == ["run"]
    slots.decide(0, "pruned")  # answered (trial 0 is done, its worker still listens)
    assert [m[0] for _, m in slots.sent] == ["run", "decision", "run"]
    assert slots._job[0] == {1}


def test_a_small_net_trains_on_one_thread_and_a_wide_one_on_all_it_has():
    from conftest import small_spec

    from hpo.config import parse_spec
    from hpo.data import load_data
    from hpo.executors.worker import SMALL_STEP, threads_for
    from hpo.params import TrialConfig
    from hpo.trial import CohortJob, TrialJob

    data = load_data(parse_spec(small_spec()), "cpu")  # digits: 64 features, 10 classes
    small = TrialJob(0, TrialConfig.of({"n_layers": 1, "width": 32, "batch_size": 64}), seed=0)
    wide = TrialJob(1, TrialConfig.of({"n_layers": 2, "width": 512, "batch_size": 256}), seed=1)
    assert threads_for(small, data, 2) == 1 and threads_for(wide, data, 2) == 2
    # a cohort's step is its members' together: 2,464 parameters x 64 rows x K
    k = SMALL_STEP // (2464 * 64) + 1
    cohort = CohortJob([TrialJob(n, small.config, seed=n) for n in range(k)])
    assert threads_for(cohort, data, 2) == 2
