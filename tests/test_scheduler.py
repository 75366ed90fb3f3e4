"""Scheduler unit tests against a model-free engine: budgets, fairness, cancellation, drain."""

from __future__ import annotations

import threading
import time

import pytest
from fake_engine import FakeAdapters, FakeEngine, expected_token
from hypothesis import given, settings
from hypothesis import strategies as st
from waiting import wait_for

from loraplex.adapters.errors import AdapterCapacityExceeded, AdapterNotFound
from loraplex.server.engine.api import (
    AdapterRef,
    FinishReason,
    SamplingParams,
    StepPlan,
    TokenEvent,
)
from loraplex.server.errors import DeadlineExceeded, Draining, EngineFailure, Overloaded
from loraplex.server.scheduler import RequestHandle, Scheduler, SchedulerLimits, Submission


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(
    limits: SchedulerLimits | None = None, adapters: set[str] | None = None
) -> tuple[Scheduler, FakeEngine, FakeAdapters, FakeClock]:
    engine = FakeEngine()
    store = FakeAdapters(known=adapters or {"a", "b", "c", "d"})
    clock = FakeClock()
    return Scheduler(engine, store, limits or SchedulerLimits(), clock=clock), engine, store, clock


def sub(prompt: str = "hello", adapter: str = "", n: int = 4, **kw: object) -> Submission:
    return Submission(FakeEngine().encode(prompt), SamplingParams(max_new_tokens=n), adapter, **kw)  # type: ignore[arg-type]


def run_until_idle(s: Scheduler, limit: int = 10_000) -> int:
    steps = 0
    while s.step():
        steps += 1
        assert steps < limit
    return steps


def tokens(handle: RequestHandle) -> list[int]:
    return [e.token_id for e in handle.events() if e.token_id is not None]


def admitted_order(engine: FakeEngine) -> list[str]:
    return [r.seq_id for plan in engine.plans for r in plan.prefill]


def test_every_request_gets_its_own_tokens_however_batched() -> None:
    s, engine, store, _ = make(SchedulerLimits(max_batch_sequences=3, max_adapters_per_step=2))
    handles = [
        s.submit(sub(f"prompt {i}", adapter=["", "a", "b", "c"][i % 4], n=3 + i % 5))
        for i in range(12)
    ]
    run_until_idle(s)
    for h in handles:
        ref = store.acquire(h.adapter_key) if h.adapter_key else None
        if ref is not None:
            store.release(ref)
        want = [expected_token(h.submission.prompt_ids, ref, i) for i in range(h.completion_tokens)]
        assert tokens(h) == want
        assert h.finish_reason is FinishReason.LENGTH
        assert h.completion_tokens == h.submission.sampling.max_new_tokens
    assert not engine.seqs
    assert all(n == 0 for n in store.in_use.values()), "adapter references leaked"


def test_budgets_hold_every_step() -> None:
    limits = SchedulerLimits(max_batch_sequences=4, max_batch_tokens=24, max_adapters_per_step=2)
    s, engine, _, _ = make(limits)
    for i in range(30):
        s.submit(sub("x" * (3 + i % 9), adapter="abcd"[i % 4] if i % 3 else "", n=1 + i % 6))
    run_until_idle(s)
    for plan in engine.plans:
        ids = [r.seq_id for r in plan.prefill] + plan.decode
        assert len(ids) <= limits.max_batch_sequences
        assert sum(len(r.prompt_ids) for r in plan.prefill) + len(plan.decode) <= 24
        adapters = {r.adapter.adapter_id for r in plan.prefill if r.adapter}
        adapters |= {engine_adapter(engine, sid) for sid in plan.decode} - {""}
        assert len(adapters) <= limits.max_adapters_per_step
    assert len(admitted_order(engine)) == 30


def engine_adapter(engine: FakeEngine, seq_id: str) -> str:
    for plan in engine.plans:
        for r in plan.prefill:
            if r.seq_id == seq_id:
                return r.adapter.adapter_id if r.adapter else ""
    raise AssertionError(f"{seq_id} was never prefilled")


def test_full_queue_raises_overloaded_and_drops_nothing() -> None:
    s, _, store, _ = make(SchedulerLimits(max_queue=3))
    accepted = [s.submit(sub(adapter="a")) for _ in range(3)]
    with pytest.raises(Overloaded, match="full"):
        s.submit(sub(adapter="a"))
    run_until_idle(s)
    assert all(h.finish_reason is FinishReason.LENGTH for h in accepted)
    assert sum(store.in_use.values()) == 0, "the refused request kept its adapter reference"
    s.submit(sub())  # room again


def test_prompt_over_the_token_budget_runs_alone() -> None:
    s, engine, _, _ = make(SchedulerLimits(max_batch_tokens=8))
    short = s.submit(sub("ab", n=3))
    long = s.submit(sub("x" * 20, n=2))
    run_until_idle(s)
    assert short.finish_reason is long.finish_reason is FinishReason.LENGTH
    plan = next(p for p in engine.plans if any(r.seq_id == long.seq_id for r in p.prefill))
    assert len(plan.prefill) == 1 and not plan.decode


def test_request_over_the_adapter_cap_is_skipped_not_blocking() -> None:
    s, engine, _, _ = make(SchedulerLimits(max_batch_sequences=8, max_adapters_per_step=1))
    first = s.submit(sub(adapter="a", n=5))
    blocked = s.submit(sub(adapter="b", n=5))
    behind = [s.submit(sub(adapter="a", n=5)), s.submit(sub(n=5))]
    s.step()
    admitted = set(admitted_order(engine))
    assert {first.seq_id, *(h.seq_id for h in behind)} <= admitted
    assert blocked.seq_id not in admitted
    run_until_idle(s)
    assert blocked.finish_reason is FinishReason.LENGTH


@settings(max_examples=40, deadline=None)
@given(
    flood=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=3),
    slots=st.integers(min_value=1, max_value=4),
)
def test_fairness_bound_rare_adapter_waits_at_most_q_minus_1_admissions(
    flood: list[int], slots: int
) -> None:
    """The stated bound: a request at the head of its adapter's queue is admitted after at
    most Q-1 requests of other adapters, Q = adapters with waiting requests."""
    limits = SchedulerLimits(max_batch_sequences=slots, max_adapters_per_step=8, max_queue=400)
    s, engine, _, _ = make(limits)
    for adapter, count in zip("abc", flood, strict=False):
        for _ in range(count):
            s.submit(sub(adapter=adapter, n=3))
    rare = s.submit(sub(adapter="d", n=3))
    queues_waiting = len(flood) + 1
    run_until_idle(s)
    order = admitted_order(engine)
    assert order.index(rare.seq_id) <= queues_waiting - 1


def test_rare_adapter_blocked_by_the_cap_is_admitted_within_the_skip_bound() -> None:
    limits = SchedulerLimits(max_batch_sequences=4, max_adapters_per_step=1, max_skips=3)
    s, engine, _, _ = make(limits)
    n = 5
    for _ in range(4):
        s.submit(sub(adapter="a", n=n))
    rare = s.submit(sub(adapter="b", n=n))
    steps = 0
    while rare.seq_id not in admitted_order(engine):
        s.submit(sub(adapter="a", n=n))  # the flood never stops
        s.step()
        steps += 1
        # Skipped max_skips steps, then the running sequences of "a" (at most n tokens) drain.
        assert steps <= limits.max_skips + n + 1


def test_cancelling_a_running_request_frees_its_slot_in_the_next_step() -> None:
    s, engine, store, _ = make(SchedulerLimits(max_batch_sequences=1))
    running = s.submit(sub(adapter="a", n=50))
    waiting = s.submit(sub(n=2))
    s.step()
    assert running.seq_id in engine.seqs
    running.cancel()
    s.step()
    decode, prefill = engine.plans[-2:]
    assert decode.release == [running.seq_id] and not decode.decode
    assert running.seq_id not in engine.seqs
    assert [r.seq_id for r in prefill.prefill] == [waiting.seq_id]
    assert running.finish_reason is FinishReason.CANCELLED
    assert len(tokens(running)) == 1  # events() ends without an error
    assert sum(store.in_use.values()) == 0
    run_until_idle(s)


def test_a_request_arriving_during_a_decode_step_is_prefilled_right_after_it() -> None:
    """The prefill step is planned once the decode step ends: a request that arrived during
    it does not wait for another decode step, and the running sequence's token from the
    decode step is delivered before the prefill runs."""
    s, engine, _, _ = make()
    running = s.submit(sub("first", n=5))
    s.step()
    arrived: list[RequestHandle] = []
    delivered_at_prefill: list[int] = []
    step = engine.step

    def arrival_during_decode(plan: StepPlan) -> list[TokenEvent]:
        if plan.decode and not arrived:
            arrived.append(s.submit(sub("second", n=2)))
        if plan.prefill:
            delivered_at_prefill.append(running.completion_tokens)
        return step(plan)

    engine.step = arrival_during_decode  # type: ignore[method-assign]
    s.step()
    decode, prefill = engine.plans[-2:]
    assert decode.decode == [running.seq_id] and not decode.prefill
    assert [r.seq_id for r in prefill.prefill] == [arrived[0].seq_id] and not prefill.decode
    assert delivered_at_prefill == [2]
    run_until_idle(s)
    assert tokens(arrived[0]) == [
        expected_token(arrived[0].submission.prompt_ids, None, i) for i in range(2)
    ]


@pytest.mark.parametrize("prefill_steps", [1, 2, 3])
def test_requests_arriving_during_prefills_are_prefilled_before_the_next_decode_up_to_the_bound(
    prefill_steps: int,
) -> None:
    """A request arrives during every prefill step. A round prefills it in a step of its own
    until the round has run `prefill_steps_per_round` of them; then the running sequences
    decode, so no decode waits for more than that many prefill steps."""
    limits = SchedulerLimits(max_batch_sequences=64, prefill_steps_per_round=prefill_steps)
    s, engine, _, _ = make(limits)
    first = s.submit(sub("first", n=12))
    arrivals: list[RequestHandle] = []
    step = engine.step

    def arrival_during_prefill(plan: StepPlan) -> list[TokenEvent]:
        if plan.prefill and len(arrivals) < 20:
            arrivals.append(s.submit(sub(f"arrival {len(arrivals)}", n=3)))
        return step(plan)

    engine.step = arrival_during_prefill  # type: ignore[method-assign]
    for _ in range(3):
        s.step()
    kinds = "".join("P" if plan.prefill else "D" for plan in engine.plans)
    assert kinds == "P" * prefill_steps + ("D" + "P" * prefill_steps) * 2
    assert all(len(plan.prefill) == 1 for plan in engine.plans if plan.prefill)
    run_until_idle(s)
    assert all(h.finish_reason is FinishReason.LENGTH for h in [first, *arrivals])


def test_cancelling_a_waiting_request_removes_it() -> None:
    s, engine, _, _ = make(SchedulerLimits(max_batch_sequences=1))
    s.submit(sub(n=3))
    waiting = s.submit(sub(n=3))
    waiting.cancel()
    run_until_idle(s)
    assert waiting.seq_id not in admitted_order(engine)
    assert s.counts() == (0, 0)


def test_missed_deadline_ends_with_deadline_exceeded_and_frees_the_slot() -> None:
    s, engine, _, clock = make(SchedulerLimits(max_batch_sequences=1))
    late = s.submit(sub(n=50, deadline=5.0))
    queued_late = s.submit(sub(n=2, deadline=5.0))
    s.step()
    clock.now = 5.0
    s.step()
    assert engine.plans[-1].release == [late.seq_id]
    for handle in (late, queued_late):
        with pytest.raises(DeadlineExceeded):
            tokens(handle)
    assert s.counts() == (0, 0)


def test_engine_failure_ends_the_step_and_the_scheduler_keeps_serving() -> None:
    s, engine, store, _ = make()
    doomed = s.submit(sub(adapter="a"))
    engine.fail_next_step = True
    s.step()
    with pytest.raises(EngineFailure, match="simulated"):
        tokens(doomed)
    after = s.submit(sub(adapter="a"))
    run_until_idle(s)
    assert after.finish_reason is FinishReason.LENGTH
    assert sum(store.in_use.values()) == 0


def test_eos_from_the_engine_finishes_the_request() -> None:
    s, engine, _, _ = make()
    engine.eos_after = 2
    h = s.submit(sub(n=10))
    run_until_idle(s)
    assert len(tokens(h)) == 2 and h.finish_reason is FinishReason.EOS


def test_drain_finishes_in_flight_work_and_refuses_new_requests() -> None:
    s, _, _, _ = make(SchedulerLimits(max_batch_sequences=2))
    s.clock = __import__("time").monotonic
    handles = [s.submit(sub(adapter="ab"[i % 2], n=20)) for i in range(6)]
    s.start()
    results: list[bool] = []
    drainer = threading.Thread(target=lambda: results.append(s.drain(grace_s=60)))
    drainer.start()
    drainer.join()
    assert results == [True]
    assert all(h.finish_reason is FinishReason.LENGTH for h in handles)
    with pytest.raises(Draining):
        s.submit(sub())


def test_run_steps_on_the_calling_thread_until_a_drain_from_another_ends_it() -> None:
    """What `serve` does: the loop runs on its main thread, and a drain from elsewhere
    finishes the work in flight, stops the loop and lets run() return."""
    s, engine, _, _ = make()
    s.clock = time.monotonic
    stepped_on: set[threading.Thread] = set()
    step = engine.step

    def recording_step(plan: StepPlan) -> list[TokenEvent]:
        stepped_on.add(threading.current_thread())
        return step(plan)

    engine.step = recording_step  # type: ignore[method-assign]
    handle = s.submit(sub(n=5))
    results: list[bool] = []
    drainer = threading.Thread(target=lambda: results.append(s.drain(grace_s=60)))
    drainer.start()
    s.run()
    drainer.join(timeout=10)
    assert results == [True]
    assert stepped_on == {threading.current_thread()}
    assert handle.finish_reason is FinishReason.LENGTH


def test_a_request_arriving_as_the_loop_goes_idle_runs_at_once() -> None:
    """A submission between an empty step and the loop's idle wait must not be slept on
    (the wake-up it sends comes before the wait): it once waited for its own deadline."""
    late: list[RequestHandle] = []

    class ArrivesAsItGoesIdle(Scheduler):
        def step(self) -> bool:
            worked = super().step()
            if not worked and not late:
                late.append(self.submit(sub(n=3, deadline=time.monotonic() + 120)))
            return worked

    s = ArrivesAsItGoesIdle(FakeEngine(), FakeAdapters(known=set()), SchedulerLimits())
    s.start()
    try:
        served: list[list[int]] = []
        reader = threading.Thread(target=lambda: served.append(tokens(_first(late))))
        reader.start()
        reader.join(timeout=10)
        assert served and len(served[0]) == 3, "the request waited for its deadline"
    finally:
        s.stop()


def _first(items: list[RequestHandle], wait_s: float = 10) -> RequestHandle:
    end = time.monotonic() + wait_s
    while not items and time.monotonic() < end:
        time.sleep(0.01)
    return items[0]


def test_stop_ends_what_is_left_with_draining() -> None:
    s, engine, _, _ = make(SchedulerLimits(max_batch_sequences=1))
    running = s.submit(sub(n=50))
    queued = s.submit(sub(n=50))
    s.step()
    s.stop()
    for h in (running, queued):
        with pytest.raises(Draining):
            tokens(h)
    assert not engine.seqs


def test_unknown_adapter_is_refused_through_its_events_without_queueing() -> None:
    s, engine, _, _ = make()
    handle = s.submit(sub(adapter="nope"))  # the request thread never touches the store
    run_until_idle(s)
    with pytest.raises(AdapterNotFound):
        tokens(handle)
    assert s.counts() == (0, 0) and not engine.plans


class LoopAdapters(FakeAdapters):
    """Records the thread each cold load ran on and whether a step was running then."""

    def __init__(self, engine: FakeEngine, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.engine = engine
        self.loads: list[tuple[str, int]] = []  # (thread name, steps planned so far)

    def acquire(self, adapter_id: str, scale: float = 1.0) -> AdapterRef:
        if adapter_id not in self.versions:
            self.loads.append((threading.current_thread().name, len(self.engine.plans)))
        return super().acquire(adapter_id, scale)


def test_a_cold_adapter_loads_on_the_loop_between_steps_and_its_request_joins_the_next() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    store = LoopAdapters(engine, known={"a"})
    s = Scheduler(engine, store, SchedulerLimits())
    s.submit(sub("first", n=3))
    s.start()
    try:
        wait_for(lambda: s.counts() == (1, 0), within_s=10)  # step 1 runs, held at the gate
        cold = s.submit(sub(adapter="a"))  # returns at once although step 1 is held
        assert store.loads == []
        gate.set()
        wait_for(lambda: len(engine.plans) >= 2, within_s=10)
        assert store.loads == [("scheduler", 1)]  # on the loop, after step 1 ended
        assert [r.seq_id for r in engine.plans[1].prefill] == [cold.seq_id]
        assert tokens(cold) == [
            expected_token(cold.submission.prompt_ids, AdapterRef("a", 1), i) for i in range(4)
        ]
    finally:
        s.stop()


def test_a_request_waits_for_adapter_room_as_scheduler_state_then_runs() -> None:
    s, _, store, _ = make(adapters={"a", "b"})
    store.max_resident = 1
    holder = s.submit(sub(adapter="a", n=4))
    s.step()  # holder runs with adapter a, the only room
    second = s.submit(sub(adapter="b", n=2))  # no thread blocks on it
    s.step()
    assert s.counts() == (1, 1) and "b" not in store.versions
    run_until_idle(s)
    assert holder.finish_reason is second.finish_reason is FinishReason.LENGTH
    assert tokens(second) == [
        expected_token(second.submission.prompt_ids, AdapterRef("b", 1), i) for i in range(2)
    ]


def test_waiting_for_adapter_room_gives_up_after_its_limit() -> None:
    s, _, store, clock = make(SchedulerLimits(adapter_room_wait_s=5.0), adapters={"a", "b"})
    store.max_resident = 1
    holder = s.submit(sub(adapter="a", n=1000))
    s.step()
    starved = s.submit(sub(adapter="b", n=2))
    s.step()
    clock.now = 5.0
    s.step()
    with pytest.raises(AdapterCapacityExceeded):
        tokens(starved)
    assert s.counts() == (1, 0)
    holder.cancel()
    run_until_idle(s)
    assert not store.any_in_use()


def test_no_wait_for_room_that_only_pins_fill() -> None:
    s, _, store, _ = make(adapters={"a", "b"})
    store.max_resident = 1
    store.acquire("a")  # a is resident...
    store.release(AdapterRef("a", 1))
    store.pin("a")  # ...and pinned: no release can ever make room for b
    handle = s.submit(sub(adapter="b"))
    s.step()
    with pytest.raises(AdapterCapacityExceeded):
        tokens(handle)


def test_commands_run_on_the_loop_in_order_and_raise_their_errors() -> None:
    s, _, store, _ = make()
    s.start()
    try:
        ran_on: list[str] = []
        info = s.call(lambda: ran_on.append(threading.current_thread().name) or store.load("a"))
        assert ran_on == ["scheduler"] and info.version == 1
        with pytest.raises(AdapterNotFound):
            s.call(lambda: store.load("nope"))
        assert s.call(lambda: 42) == 42  # the loop goes on after a failed command
    finally:
        s.stop()
    with pytest.raises(Draining):
        s.call(lambda: None)


def test_a_command_that_finds_no_room_runs_once_a_release_makes_some() -> None:
    s, _, store, _ = make(adapters={"a", "b"})
    store.max_resident = 1
    holder = s.submit(sub(adapter="a", n=3))
    s.step()
    loaded = []
    caller = threading.Thread(target=lambda: loaded.append(s.call(lambda: store.load("b"))))
    caller.start()
    wait_for(lambda: s._inbox, within_s=10)
    run_until_idle(s)  # holder finishes; the load is retried after its release
    caller.join(10)
    assert holder.finish_reason is FinishReason.LENGTH
    assert [i.adapter_id for i in loaded] == ["b"] and store.versions == {"b": 1}


def test_a_request_waiting_for_room_does_not_keep_the_loop_spinning() -> None:
    s, _, store, _ = make(adapters={"a", "b"})
    store.max_resident = 1
    held = store.acquire("a")  # held outside the scheduler: no step can release it
    takes = 0
    take_inbox = s._take_inbox

    def counted() -> bool:
        nonlocal takes
        takes += 1
        return take_inbox()

    s._take_inbox = counted  # type: ignore[method-assign]
    waiting = s.submit(sub(adapter="b", n=2))
    s.start()
    try:
        wait_for(lambda: s.counts() == (0, 1), within_s=10)
        before = takes
        time.sleep(1.5)
        assert takes - before <= 3, "the loop spun while the request waited for room"
        store.release(held)
        s.call(lambda: None)  # a command: room may have changed, the loop retries
        assert tokens(waiting) == [
            expected_token(waiting.submission.prompt_ids, AdapterRef("b", 1), i) for i in range(2)
        ]
    finally:
        s.stop()
