from __future__ import annotations

from ksdk.engine.page_table import PageTable
from ksdk.engine.request import SequenceStatus
from ksdk.engine.scheduler import ScheduledBatch, Scheduler

from tests.engine.helpers import make_seq, make_seqs


def fake_run(sched: Scheduler, batch: ScheduledBatch, next_token: int = 7) -> None:
    """What the engine does after a forward: advance computed tokens, cache pages, append samples."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        sched.page_table.commit(seq)
        seq.prompt_done |= seq.num_computed_tokens >= seq.num_prompt_tokens
    for seq in batch.sampling_seqs:
        seq.token_ids.append(next_token)


def test_chunked_prefill_respects_the_token_budget_and_decodes_join() -> None:
    sched = Scheduler(PageTable(64, 4), max_num_seqs=8, max_batch_tokens=10)
    a = make_seq(list(range(25)))
    sched.add(a)
    b1 = sched.schedule()
    assert b1.num_new_tokens == (10,) and b1.sampling_seqs == ()
    fake_run(sched, b1)
    b = make_seq(list(range(100, 106)))
    sched.add(b)
    b2 = sched.schedule()  # a's second chunk, then b with what is left
    assert [s is a for s in b2.seqs] == [True] and b2.num_new_tokens == (10,)
    fake_run(sched, b2)
    b3 = sched.schedule()
    assert b3.seqs == (a, b) and b3.num_new_tokens == (5, 5) and b3.sampling_seqs == (a,)
    fake_run(sched, b3)
    b4 = sched.schedule()  # a decodes one token while b finishes its prompt
    assert b4.seqs == (a, b) and b4.num_new_tokens == (1, 1) and b4.sampling_seqs == (a, b)


def test_fcfs_admission_waits_for_pages_in_order() -> None:
    sched = Scheduler(PageTable(6, 4), max_num_seqs=8, max_batch_tokens=100)
    big, small_late = make_seq(list(range(20))), make_seq([1, 2])
    first = make_seq(list(range(200, 208)))
    for s in (first, big, small_late):
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == (first,)  # big does not fit beside first; small_late may not overtake it
    assert big.status is SequenceStatus.WAITING and small_late.status is SequenceStatus.WAITING


def test_preemption_recomputes_the_newest_and_everything_completes() -> None:
    sched = Scheduler(PageTable(4, 2), max_num_seqs=8, max_batch_tokens=100)
    old, new = make_seq([1, 2, 3, 4]), make_seq([4, 5, 6, 7])
    sched.add(old)
    sched.add(new)
    fake_run(sched, sched.schedule())  # both admitted: 2 pages each, pool full
    assert old.status is new.status is SequenceStatus.RUNNING
    batch = sched.schedule()  # old needs a third page for its 5th token: new is preempted
    assert batch.seqs == (old,) and batch.num_preempted == 1
    assert new.status is SequenceStatus.WAITING and new.pages == [] and new.num_computed_tokens == 0
    assert sched.waiting[0] is new and new.token_ids == [4, 5, 6, 7, 7]  # its sample is kept, recomputed later
    fake_run(sched, batch)
    sched.finish(old)
    batch = sched.schedule()
    assert batch.seqs == (new,) and batch.num_new_tokens == (3,)  # its first page is still in the prefix cache


def test_a_running_sequence_preempts_itself_when_it_is_the_newest() -> None:
    sched = Scheduler(PageTable(3, 2), max_num_seqs=8, max_batch_tokens=100)
    old, new = make_seq([1, 2, 3, 4]), make_seq([4])
    sched.add(old)
    sched.add(new)
    fake_run(sched, sched.schedule())
    batch = sched.schedule()  # old: 5 tokens -> needs a 3rd page, preempts new
    assert batch.seqs == (old,)
    assert new.status is SequenceStatus.WAITING


def test_max_num_seqs_caps_the_running_batch() -> None:
    sched = Scheduler(PageTable(64, 4), max_num_seqs=2, max_batch_tokens=100)
    seqs = [make_seq([i, i + 1]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert len(sched.schedule().seqs) == 2


def test_choices_wait_for_the_first_choices_prefill_then_share_its_pages() -> None:
    sched = Scheduler(PageTable(32, 4), max_num_seqs=8, max_batch_tokens=100)
    s0, s1, s2 = make_seqs(list(range(10)), 3, temperature=1.0)
    for s in (s0, s1, s2):
        sched.add(s)
    b1 = sched.schedule()
    assert b1.seqs == (s0,)
    fake_run(sched, b1)
    b2 = sched.schedule()
    assert b2.seqs == (s0, s1, s2) and b2.num_new_tokens == (1, 2, 2)  # 8 of 10 prompt tokens cached
    assert s1.pages[:2] == s0.pages[:2] == s2.pages[:2]
