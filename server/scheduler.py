"""The scheduler decides which sequences run each step; the engine executes the step.

Pure Python, no torch. gRPC handler threads call `submit` and read their `RequestHandle`;
one loop thread calls `step` while there is work. Each round runs
1. a decode step: it ends cancelled and expired requests (the engine frees their slots in
   this same step) and advances every running sequence by one token;
2. up to `prefill_steps_per_round` prefill steps, each planned when the step before it ends:
   it admits waiting requests from the fair `AdmissionQueue` within the sequence, token and
   distinct-adapter budgets and gives each its first token. The round ends early when a
   prefill step would admit nothing.
Each step's `TokenEvent`s go to their requests as soon as it ends. So a request that arrives
during a decode step is prefilled right after it, and one that arrives during a prefill
step is prefilled next unless the round has run its prefill steps; the running sequences
wait for at most that many prefill steps between tokens. `loraplex bench load` (Gemma 3
270M, 2 CPU cores, 256 adapters, Poisson arrivals at 1.389 req/s, 64 requests, one hour):
decode and prefill in one step, TTFT p50 0.260 s and p99 0.743 s; one prefill step per
round, 0.193 / 0.453 s and 0.220 / 0.479 s; two, 0.203 / 0.364 s and 0.213 / 0.451 s. TPOT
p50 was 0.093, 0.099-0.103 and 0.106-0.111 s.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Protocol

from loraplex.server.admission import AdmissionQueue, StepBudget
from loraplex.server.cpu_turns import CpuTurns
from loraplex.server.engine.api import (
    AdapterAdmin,
    AdapterRef,
    Engine,
    FinishReason,
    SamplingParams,
    SequenceRequest,
    StepPlan,
    TokenEvent,
)
from loraplex.server.errors import DeadlineExceeded, Draining, EngineFailure, LoraplexError

log = logging.getLogger(__name__)
Clock = Callable[[], float]
IDLE_POLL_S = 1.0  # an idle loop wakes on every submit and cancel; this is a safety net


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_sequences: int = 8
    max_batch_tokens: int = 2048
    max_adapters_per_step: int = 4
    max_queue: int = 64
    max_skips: int = 8  # steps a skipped request waits before it blocks the queue behind it
    prefill_steps_per_round: int = 2  # between two decode steps, at most


@dataclass(frozen=True)
class Submission:
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter_id: str = ""  # "" is the base model
    adapter_scale: float = 1.0
    deadline: float | None = None  # on the scheduler's clock


@dataclass
class Timings:
    submitted: float
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass(frozen=True)
class RequestRecord:
    """A finished request, as plain data for metrics."""

    adapter_id: str
    outcome: str  # the FinishReason value, or "deadline", "draining", "error"
    prompt_tokens: int
    completion_tokens: int
    timings: Timings


class SchedulerObserver(Protocol):
    def request_finished(self, record: RequestRecord) -> None: ...

    def step_finished(self, running: int, waiting: int, batch_size: int) -> None: ...


_END = object()


@dataclass(eq=False)
class RequestHandle:
    """One submitted request; iterate `events()` for its tokens as they come."""

    seq_id: str
    submission: Submission
    adapter: AdapterRef | None
    timings: Timings
    adapter_version: int = 0  # kept after the adapter reference is released
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    error: LoraplexError | None = None
    _cancelled: bool = False
    _outbox: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue)
    _wake: Callable[[], None] = lambda: None

    @property
    def adapter_key(self) -> str:
        return self.submission.adapter_id

    @property
    def slot_key(self) -> str:
        return f"{self.adapter_key}@{self.adapter_version}" if self.adapter_key else ""

    @property
    def prompt_tokens(self) -> int:
        return len(self.submission.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop the request; its slot is freed at the start of the next step."""
        self._cancelled = True
        self._wake()

    def events(self) -> Iterator[TokenEvent]:
        """Token events until the request ends; raises the request's error if it failed."""
        while (item := self._outbox.get()) is not _END:
            assert isinstance(item, TokenEvent)
            yield item
        if self.error is not None:
            raise self.error


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        adapters: AdapterAdmin | None,
        limits: SchedulerLimits,
        observer: SchedulerObserver | None = None,
        clock: Clock = time.monotonic,
        turns: CpuTurns | None = None,
    ) -> None:
        """`turns`, when given, makes each engine step take turns with adapter loads."""
        self.engine = engine
        self.turns = turns
        self.adapters = adapters
        self.limits = limits
        self.observer = observer
        self.clock = clock
        self.steps = 0
        self._waiting: AdmissionQueue[RequestHandle] = AdmissionQueue(
            limits.max_queue, limits.max_skips
        )
        self._running: dict[str, RequestHandle] = {}
        self._lock = threading.Condition()
        self._ids = count()
        self._admitting = True
        self._stopping = False
        self._loop_exited = threading.Event()  # set while no loop runs
        self._loop_exited.set()

    # ---- called from request threads -------------------------------------------------

    def submit(self, submission: Submission) -> RequestHandle:
        """Queue a request; raises Overloaded, Draining or an adapter error at once."""
        self._check_admission()
        # An adapter load takes a CPU turn before a step; the request is queued within that
        # turn, so the step after it admits the request instead of planning without it.
        with self.turns.keep_side_turn() if self.turns else contextlib.nullcontext():
            return self._queue(submission)

    def _queue(self, submission: Submission) -> RequestHandle:
        ref = self._acquire(submission)
        handle = RequestHandle(
            seq_id=f"seq-{next(self._ids)}",
            submission=submission,
            adapter=ref,
            timings=Timings(submitted=self.clock()),
            adapter_version=ref.version if ref else 0,
            _wake=self._notify,
        )
        with self._lock:
            try:
                self._check_admission()
                self._waiting.push(handle)
            except LoraplexError:
                self._release_adapter(handle)
                raise
            self._lock.notify_all()
        return handle

    def counts(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._lock:
            return len(self._running), len(self._waiting)

    def running_requests(self) -> list[RequestHandle]:
        with self._lock:
            return list(self._running.values())

    def _check_admission(self) -> None:
        if not self._admitting:
            raise Draining("the server is shutting down and admits no new requests")

    def _acquire(self, submission: Submission) -> AdapterRef | None:
        if not submission.adapter_id:
            return None
        if self.adapters is None:
            raise LoraplexError("this server has no adapter store")
        return self.adapters.acquire(submission.adapter_id, submission.adapter_scale)

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- the loop --------------------------------------------------------------------

    def step(self) -> bool:
        """Run one round: a decode step, then prefill steps while they admit a request (up
        to `prefill_steps_per_round`); False when there was nothing to do."""
        worked = self._step(self._plan_decode)
        for _ in range(self.limits.prefill_steps_per_round):
            if not self._step(self._plan_prefill):
                break
            worked = True
        return worked

    def _step(self, plan_step: Callable[[], StepPlan]) -> bool:
        # Planned within the turn, so a request whose adapter load went first joins this step.
        with self.turns.step() if self.turns else contextlib.nullcontext():
            with self._lock:
                plan = plan_step()
            if not (plan.prefill or plan.decode or plan.release):
                return False
            started = self.clock()
            events = self._run_engine(plan)
        if log.isEnabledFor(logging.DEBUG):  # the prompt-token sum is work on every step
            log.debug(
                "step %d: %d prefill (%d prompt tokens), %d decode, %d released, %.3f s",
                self.steps, len(plan.prefill), sum(len(s.prompt_ids) for s in plan.prefill),
                len(plan.decode), len(plan.release), self.clock() - started,
            )  # fmt: skip
        with self._lock:
            self.steps += 1
            for event in events:
                self._deliver(event)
            running, waiting = len(self._running), len(self._waiting)
            self._lock.notify_all()  # drain() waits for the running set to empty
        if self.observer is not None:
            self.observer.step_finished(running, waiting, len(plan.prefill) + len(plan.decode))
        return True

    def _plan_decode(self) -> StepPlan:
        release = self._end_abandoned(self.clock())
        return StepPlan(decode=list(self._running), release=release)

    def _plan_prefill(self) -> StepPlan:
        if not len(self._waiting):
            return StepPlan()  # every round asks; most have nothing waiting
        now = self.clock()
        budget = StepBudget(
            free_sequences=self.limits.max_batch_sequences - len(self._running),
            free_tokens=self.limits.max_batch_tokens - len(self._running),
            max_adapters=self.limits.max_adapters_per_step,
            adapters=Counter(h.slot_key for h in self._running.values()),
            empty=not self._running,
        )
        started = self._waiting.select(budget)
        for handle in started:
            handle.timings.scheduled = now
            self._running[handle.seq_id] = handle
        return StepPlan(prefill=[self._sequence(h) for h in started])

    def _sequence(self, handle: RequestHandle) -> SequenceRequest:
        sub = handle.submission
        return SequenceRequest(handle.seq_id, sub.prompt_ids, sub.sampling, handle.adapter)

    def _end_abandoned(self, now: float) -> list[str]:
        """End cancelled and expired requests; return the running ones the engine must free."""
        release: list[str] = []
        for handle in [h for h in self._waiting if self._abandoned(h, now)]:
            self._waiting.remove(handle)
            self._end(handle, self._abandon_error(handle))
        for handle in [h for h in self._running.values() if self._abandoned(h, now)]:
            del self._running[handle.seq_id]
            release.append(handle.seq_id)
            self._end(handle, self._abandon_error(handle))
        return release

    @staticmethod
    def _abandoned(handle: RequestHandle, now: float) -> bool:
        deadline = handle.submission.deadline
        return handle._cancelled or (deadline is not None and now >= deadline)

    @staticmethod
    def _abandon_error(handle: RequestHandle) -> LoraplexError | None:
        if handle._cancelled:
            handle.finish_reason = FinishReason.CANCELLED
            return None
        return DeadlineExceeded("the request's deadline passed before it finished")

    def _run_engine(self, plan: StepPlan) -> list[TokenEvent]:
        try:
            return self.engine.step(plan)
        except Exception as err:
            log.exception("engine step failed; ending the %d sequences in it", len(plan.decode))
            with self._lock:
                self._fail_step(plan, err)
            return []

    def _fail_step(self, plan: StepPlan, err: Exception) -> None:
        failure = EngineFailure(f"the engine failed while running this request: {err}")
        for seq_id in [s.seq_id for s in plan.prefill] + plan.decode:
            handle = self._running.pop(seq_id, None)
            if handle is None:
                continue
            try:
                self.engine.release(seq_id)
            except Exception:
                log.warning("could not release %s after the failed step", seq_id)
            self._end(handle, failure)

    def _deliver(self, event: TokenEvent) -> None:
        handle = self._running.get(event.seq_id)
        if handle is None:
            return  # ended (cancelled or expired) while the step ran
        if event.deferred:  # it waits at the head of its queue for what it conflicts with
            del self._running[event.seq_id]
            handle.timings.scheduled = None
            self._waiting.push_back_to_head(handle)
            return
        if event.token_id is not None:
            handle.completion_tokens += 1
            if handle.timings.first_token is None:
                handle.timings.first_token = self.clock()
            handle._outbox.put(event)
        if event.finish is not None:
            del self._running[event.seq_id]
            handle.finish_reason = event.finish
            failed = event.finish is FinishReason.ERROR
            problem = event.error or "the engine ended the sequence"
            self._end(handle, EngineFailure(problem) if failed else None)

    def _end(self, handle: RequestHandle, error: LoraplexError | None) -> None:
        handle.error = error
        handle.timings.finished = self.clock()
        self._release_adapter(handle)
        handle._outbox.put(_END)
        if self.observer is not None:
            self.observer.request_finished(self._record(handle))

    def _release_adapter(self, handle: RequestHandle) -> None:
        if handle.adapter is not None and self.adapters is not None:
            self.adapters.release(handle.adapter)
            handle.adapter = None

    @staticmethod
    def _record(handle: RequestHandle) -> RequestRecord:
        if isinstance(handle.error, DeadlineExceeded):
            outcome = "deadline"
        elif isinstance(handle.error, Draining):
            outcome = "draining"
        elif handle.error is not None:
            outcome = "error"
        else:
            outcome = handle.finish_reason.value if handle.finish_reason else "error"
        return RequestRecord(
            handle.adapter_key,
            outcome,
            handle.prompt_tokens,
            handle.completion_tokens,
            handle.timings,
        )

    # ---- the loop thread and draining -------------------------------------------------

    def start(self) -> None:
        """Run the loop on a thread of its own (`serve` runs it on its main thread instead)."""
        self._loop_exited.clear()
        threading.Thread(target=self.run, name="scheduler", daemon=True).start()

    def run(self) -> None:
        """Step until stopped, on the calling thread."""
        self._loop_exited.clear()
        try:
            self._loop()
        finally:
            self._loop_exited.set()

    def _loop(self) -> None:
        while not self._stopping:
            if self.step():
                continue
            with self._lock:
                # Checked under the lock: work submitted since the empty step sent its
                # wake-up before this wait began, so it must not be slept on.
                idle = not self._running and not len(self._waiting)
                if idle and not self._stopping:
                    self._lock.wait(timeout=IDLE_POLL_S)

    def stop_admitting(self) -> None:
        """From now on `submit` raises Draining."""
        with self._lock:
            self._admitting = False

    def drain(self, grace_s: float) -> bool:
        """Stop admitting, let in-flight requests finish for up to `grace_s`, then stop.

        Returns True when everything finished within the grace period.
        """
        self._admitting = False
        end = self.clock() + grace_s
        with self._lock:
            while (self._running or len(self._waiting)) and self.clock() < end:
                self._lock.wait(timeout=min(0.1, max(0.0, end - self.clock())))
            clean = not self._running and not len(self._waiting)
        self.stop()
        return clean

    def stop(self) -> None:
        """Stop the loop and wait for it to exit (never call it from the loop's own thread),
        then end whatever is still queued or running."""
        self._admitting = False
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._loop_exited.wait()
        with self._lock:
            for handle in list(self._waiting):
                self._waiting.remove(handle)
                self._end(handle, Draining("the server stopped before this request ran"))
            for seq_id, handle in list(self._running.items()):
                del self._running[seq_id]
                self.engine.release(seq_id)
                self._end(handle, Draining("the server stopped before this request finished"))
