"""A worker trains ahead of the driver's answers while its epochs are short, holds its next job
and starts it the moment the current one ends, and reads each trial's answers in order
(`hpo.executors.worker`, `hpo.executors.local.WorkerSlots`). No timing: the channel is a fake
whose answers arrive when the test says, and an epoch's length is the `epoch_seconds` it
reports."""

from __future__ import annotations

import collections

import pytest

from hpo.executors import Done, Epoch, Started
from hpo.executors.local import WorkerSlots
from hpo.executors.worker import AHEAD, RUN_AHEAD_BELOW_S, Inbox, _Answers


class Channel:
    """The worker's end: what it sent, and the messages the driver has sent so far."""

    def __init__(self):
        self.sent: list[tuple] = []
        self.inbox: collections.deque = collections.deque()

    def send(self, message):
        self.sent.append(message)

    def recv(self):
        if not self.inbox:
            raise AssertionError("the worker waited for a message that was not sent")
        return self.inbox.popleft()

    def poll(self):
        return bool(self.inbox)


class Job:
    def __init__(self, *numbers):
        self.numbers = list(numbers)


FAST = {"val_loss": 1.0, "epoch_seconds": RUN_AHEAD_BELOW_S / 10}
SLOW = {"val_loss": 1.0, "epoch_seconds": RUN_AHEAD_BELOW_S}


def training(*numbers):
    """A worker's inbox and answers, training a job of `numbers`."""
    channel = Channel()
    inbox = Inbox(channel)
    channel.inbox.append(("run", Job(*numbers)))
    assert inbox.next_job().numbers == list(numbers)
    return channel, _Answers(inbox)


def test_short_epochs_run_ahead_and_a_late_prune_stops_the_trial_at_the_next_epoch():
    channel, answers = training(7)
    assert answers({7: FAST}, 1) == {7: None}  # no answer yet: it trains on
    assert answers({7: FAST}, 2) == {7: None}
    channel.inbox += [("decision", 7, None), ("decision", 7, "pruned")]  # epochs 1 and 2
    assert answers({7: FAST}, 3) == {7: "pruned"}  # read after epoch 3: it stops there
    assert [m[2] for m in channel.sent] == [1, 2, 3]  # every epoch it trained was reported


def test_at_most_AHEAD_epochs_go_unanswered():
    channel, answers = training(1)
    for epoch in range(1, AHEAD + 1):
        answers({1: FAST}, epoch)
    with pytest.raises(AssertionError, match="waited"):  # one more: it waits for the oldest
        answers({1: FAST}, AHEAD + 1)


def test_the_next_job_starts_without_the_answers_to_the_last_epochs_which_are_dropped():
    channel, answers = training(5)
    channel.inbox.append(("run", Job(6)))  # sent while trial 5 trains: the worker holds it
    assert answers({5: FAST}, 1) == {5: None}
    assert answers({5: FAST}, 2) == {5: None}  # its last epoch waits for nothing
    inbox = answers.inbox
    assert inbox.next_job().numbers == [6]  # at once: the answers to 5 are still on their way
    channel.inbox += [("decision", 5, "pruned"), ("decision", 5, None)]  # late: dropped
    answers = _Answers(inbox)
    channel.inbox.append(("decision", 6, "pruned"))
    assert answers({6: SLOW}, 1) == {6: "pruned"}  # trial 6 reads only its own answers
    assert not inbox.answers.get(5) and not channel.inbox


def test_slow_epochs_wait_for_their_own_answer():
    channel, answers = training(3)
    channel.inbox.append(("decision", 3, "pruned"))
    assert answers({3: SLOW}, 1) == {3: "pruned"}
    assert not answers.owed


def test_a_cohort_reads_each_members_answers_and_an_exit_interrupts_the_rest():
    channel, answers = training(1, 2)
    assert answers({1: FAST, 2: FAST}, 1) == {1: None, 2: None}
    channel.inbox += [("decision", 2, None), ("decision", 1, "pruned")]  # any order
    assert answers({1: FAST, 2: FAST}, 2) == {1: "pruned", 2: None}
    channel.inbox += [("exit",)]  # the driver closes instead of answering epoch 2
    assert answers({2: FAST}, 3) == {2: "interrupted"}
    assert answers.inbox.next_job() is None  # serve's loop ends


def test_a_cancel_drops_the_held_job():
    channel, answers = training(1)
    channel.inbox += [("run", Job(2)), ("cancel",), ("exit",)]
    answers.inbox.read_arrived()
    assert not answers.inbox.jobs and answers.inbox.next_job() is None


class Slots(WorkerSlots):
    def __init__(self, slots):
        self._init_slots(slots)
        self.sent: list[tuple[int, tuple]] = []
        self._ready = [True] * slots

    def _send(self, i, message):
        self.sent.append((i, message))


def test_a_worker_trains_one_job_and_holds_one_more_and_the_rest_wait():
    slots = Slots(1)
    for n in range(3):
        slots.submit(Job(n))
    assert [m[0] for _, m in slots.sent] == ["run", "run"]
    assert slots._job[0] == {0} and slots._next[0].numbers == [1] and len(slots._pending) == 1
    assert slots._receive(0, ("epoch", 0, 1, FAST)) == Epoch(0, 1, FAST)
    slots.decide(0, "pruned")
    assert slots.sent[-1] == (0, ("decision", 0, "pruned"))
    assert slots._receive(0, ("done", 0, "record")) == Done(0, "record")
    assert slots._receive(0, ("start", 1, "host:1")) == Started(1, "host:1")
    assert slots._job[0] == {1} and slots._next[0] is None
    slots._submit_pending()
    assert slots._next[0].numbers == [2] and not slots._pending  # the third is held now


def test_a_job_taken_back_after_its_worker_started_it_is_interrupted_at_its_first_epoch():
    slots = Slots(1)
    slots.submit(Job(0))
    slots.submit(Job(1))
    assert slots.cancel() == [1] and slots.sent[-1] == (0, ("cancel",))
    slots._receive(0, ("done", 0, "record"))
    assert slots._receive(0, ("start", 1, "host:1")) is None  # the cancel came too late
    assert slots._receive(0, ("epoch", 1, 1, FAST)) is None
    assert slots.sent[-1] == (0, ("decision", 1, "interrupted"))


def test_a_replaced_workers_held_job_goes_to_the_next_worker_ready():
    slots = Slots(2)
    for n in range(4):
        slots.submit(Job(n))
    assert slots._job == [{0}, {1}] and [j.numbers for j in slots._next] == [[2], [3]]
    slots._forget(0)  # its worker died: trial 0 is lost, trial 2 never started
    slots._ready[0] = False  # until its successor says it is ready
    assert [j.numbers for j in slots._pending] == [[2]]
    slots._ready[0] = True
    slots._submit_pending()
    assert slots._job[0] == {2}


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
    # and a trial's repeats or folds are members of its cohort too
    assert threads_for(small, data, 2, members=k) == 2


def test_the_thread_executor_runs_jobs_submitted_while_its_worker_held_one():
    """One worker: a job to train, one held, and a third that waits in the executor until
    the worker takes the held one; every job runs, each epoch answered."""
    import time

    from conftest import small_spec

    from hpo.config import parse_spec
    from hpo.data import load_data
    from hpo.executors.local import ThreadExecutor
    from hpo.params import TrialConfig
    from hpo.trial import TrialJob

    spec = parse_spec(small_spec(training={"max_epochs": 2}))
    executor = ThreadExecutor(spec, "cpu")
    executor.start(load_data(spec, "cpu"))
    executor.ready()
    config = TrialConfig.of({"n_layers": 1, "width": 16, "batch_size": 64})
    for n in range(3):
        executor.submit(TrialJob(n, config, seed=n))
    assert len(executor._pending) == 1  # the third waits: the worker trains one, holds one
    done, deadline = [], time.monotonic() + 120  # a bound on a hang, not a timing
    try:
        while len(done) < 3 and time.monotonic() < deadline:
            for event in executor.wait(1.0):
                if isinstance(event, Epoch):
                    executor.decide(event.number, None)
                elif isinstance(event, Done):
                    done.append(event.number)
    finally:
        executor.close(interrupt=True)
    assert done == [0, 1, 2]
