"""service/engine/scheduler.py on its own, over a real block manager and no model: admission by blocks and by
priority, chunked prompts, preemption and resumption, shared prefixes; every transition and block count."""

from __future__ import annotations

from service.engine.block_manager import BlockManager
from service.engine.handle import RequestHandle
from service.engine.request import GenerationRequest, SamplingParams
from service.engine.scheduler import Plan, Scheduler
from service.engine.sequence import Sequence, Status
from service.engine.stats import EngineStats

SIZE = 4
PARAMS = SamplingParams(max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


class NoWaker:
    def wake(self) -> None:
        pass


def seq(prompt: list[int], priority: int = 0, rid: str = "") -> Sequence:
    request = GenerationRequest(rid or f"r{prompt[0]}", list(prompt), PARAMS, priority=priority)
    return Sequence(handle=RequestHandle(request, NoWaker(), None), text=None, generator=None)  # no text here


def scheduler(blocks: int = 17, rows: int = 4, chunk: int = 64) -> Scheduler:
    return Scheduler(BlockManager(blocks, SIZE), EngineStats(), max_rows=rows, prefill_chunk_tokens=chunk)


def run(s: Scheduler, plan: Plan, token: int = 1) -> None:
    """What the engine does after the model: postprocess, then one sampled token for every row that samples."""
    s.postprocess(plan)
    for x in plan.decode + [c.sequence for c in plan.prefill if c.samples]:
        x.generated.append(token)


def test_a_request_goes_waiting_prefilling_decoding_finished_and_gives_its_blocks_back():
    s = scheduler()
    a = seq(list(range(10)))
    s.add(a)
    assert a.status is Status.WAITING and s.blocks.held == 0
    plan = s.schedule()
    assert a.status is Status.PREFILLING and len(a.block_table) == 3 and s.blocks.held == 3
    assert [(c.start, c.end, c.samples) for c in plan.prefill] == [(0, 10, True)] and plan.decode == []
    assert sorted(plan.fresh_blocks) == sorted(a.block_table)
    run(s, plan)
    assert a.status is Status.DECODING and a.computed == 10 and a.sealed == 2
    plan = s.schedule()
    assert plan.decode == [a] and plan.prefill == [] and a.next_position == 10
    run(s, plan)
    assert a.computed == 11
    s.release(a)
    assert a.status is Status.FINISHED and s.idle and s.blocks.held == 0 and s.blocks.cached_free == 2


def test_a_long_prompt_is_computed_in_chunks_beside_decoding_rows():
    s = scheduler(chunk=8)
    a, b = seq([1, 2, 3]), seq(list(range(100, 120)))
    s.add(a)
    run(s, s.schedule())
    s.add(b)
    plan = s.schedule()
    assert plan.decode == [a] and [(c.start, c.end, c.samples) for c in plan.prefill] == [(0, 8, False)]
    run(s, plan)
    plan = s.schedule()
    assert [(c.start, c.end) for c in plan.prefill] == [(8, 16)]
    run(s, plan)
    plan = s.schedule()
    assert [(c.start, c.end, c.samples) for c in plan.prefill] == [(16, 20, True)] and plan.decode == [a]


def test_admission_waits_for_blocks_and_a_lone_request_that_fits_always_runs():
    s = scheduler(blocks=9)  # 8 usable blocks: 32 positions; watermark 1 block
    a, b = seq(list(range(24))), seq(list(range(50, 58)))  # 6 blocks, then 2
    s.add(a)
    s.add(b)
    s.schedule()
    assert a.status is Status.PREFILLING and b.status is Status.WAITING  # 2 + watermark 1 > 2 free
    s.release(a)
    s.schedule()
    assert b.status is Status.PREFILLING


def test_out_of_blocks_the_most_recent_lowest_priority_sequence_is_preempted_and_resumes_where_it_was():
    s = scheduler(blocks=9, chunk=64)  # 8 usable blocks of 4
    a, b = seq(list(range(12))), seq(list(range(40, 52)))  # 3 blocks each
    for x in (a, b):
        s.add(x)
    run(s, s.schedule(), token=7)
    assert s.blocks.free == 2 and a.status is b.status is Status.DECODING
    for _ in range(4):  # each decodes to 16 positions: a 4th block each takes the last two free
        run(s, s.schedule(), token=7)
    assert s.blocks.free == 0 and a.computed == b.computed == 16
    plan = s.schedule()  # position 16 needs a 5th block each: b, the later arrival, gives its blocks back
    assert plan.decode == [a] and b.status is Status.WAITING and b.block_table == [] and b.computed == 0
    assert s.stats.preempted == 1 and b.preemptions == 1 and b.generated == [7] * 5  # what it made stays
    run(s, plan, token=7)
    s.release(a)
    plan = s.schedule()  # b resumes: its sealed blocks are still cached, only the rest is recomputed
    chunk, = plan.prefill
    assert chunk.sequence is b and chunk.start == 12 and chunk.end == b.prefill_target == 16 and not chunk.samples
    assert s.stats.resumed_cached_tokens == 12 and b.cached_prompt_tokens == 0
    run(s, plan)
    assert b.status is Status.DECODING and b.generated == [7] * 5  # no token sampled twice or lost
    assert s.schedule().decode == [b] and b.next_position == 16


def test_a_better_priority_preempts_a_worse_one_for_a_row():
    s = scheduler(rows=2)
    batch = [seq([i] * 8, priority=10) for i in (1, 2)]
    for x in batch:
        s.add(x)
    run(s, s.schedule())
    urgent = seq([9] * 8, priority=0)
    s.add(urgent)
    s.schedule()
    assert urgent.status is Status.PREFILLING
    assert [x.status for x in batch] == [Status.DECODING, Status.WAITING]  # the later one of priority 10
    same = seq([5] * 8, priority=10)
    s.add(same)
    s.schedule()
    assert same.status is Status.WAITING  # equal priority preempts nobody
    assert s.waiting == [batch[1], same]  # the preempted one keeps its place: arrival order within a priority


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    s = scheduler(rows=1)
    order = [seq([1] * 4, 5, "late-5"), seq([2] * 4, 0, "first-0"), seq([3] * 4, 5, "later-5"),
             seq([4] * 4, 0, "second-0")]
    for x in order:
        s.add(x)
    started = []
    while not s.idle:
        plan = s.schedule()
        started += [c.sequence.request.request_id for c in plan.prefill]
        s.release(plan.prefill[0].sequence)
    assert started == ["first-0", "second-0", "late-5", "later-5"]


def test_a_prompt_sharing_sealed_blocks_holds_them_once_and_computes_the_rest():
    s = scheduler()
    system = list(range(100, 112))  # 3 full blocks
    a = seq(system + [1, 2])
    s.add(a)
    run(s, s.schedule())
    b = seq(system + [3, 4, 5], rid="b")
    s.add(b)
    plan = s.schedule()
    chunk, = plan.prefill
    assert chunk.sequence is b and chunk.start == 12 and b.cached_prompt_tokens == 12
    assert b.block_table[:3] == a.block_table[:3] and s.blocks.held == 4 + 1
    assert s.stats.prefix_hits == 1 and s.stats.reused_tokens == 12
    whole = seq(system, rid="whole")  # a prompt of exactly the cached blocks: its last block is recomputed
    s.add(whole)
    chunk = s.schedule().prefill[-1]
    assert chunk.sequence is whole and (chunk.start, chunk.end) == (8, 12) and whole.block_table[2] != a.block_table[2]


def test_without_prefix_caching_nothing_is_shared():
    s = Scheduler(BlockManager(17, SIZE), EngineStats(), max_rows=4, prefill_chunk_tokens=64, prefix_caching=False)
    a = seq(list(range(12)) + [1])
    s.add(a)
    run(s, s.schedule())
    s.release(a)
    b = seq(list(range(12)) + [2])
    s.add(b)
    assert s.schedule().prefill[0].start == 0 and s.blocks.cached_free == 0


def test_gone_sequences_are_found_queued_preempted_or_running():
    s = scheduler(rows=1)
    a, b = seq([1] * 4), seq([2] * 4)
    s.add(a)
    s.add(b)
    s.schedule()
    a.handle.cancel()
    b.handle.cancel()
    assert set(s.drop_gone()) == {a, b}
    assert s.stats.dropped_running == 1 and s.stats.cancelled_in_queue == 1
