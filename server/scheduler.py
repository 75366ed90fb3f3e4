"""The loop that owns the engine: it takes requests and adapter commands from its inbox,
decides which sequences run each step, runs the step and hands each request its events.

Pure Python, no torch. Request threads (gRPC, HTTP) only call `submit` or `call`, which put
work on the inbox and never wait for the engine, and read their `RequestHandle`'s outbox.
One loop thread does everything else, so adapter loads and engine steps never overlap.
Each round
1. takes the inbox: a new request acquires its adapter (loading it if needed) and queues
   for admission; a request whose adapter finds no room (every resident adapter in use)
   waits as scheduler state and is retried after adapters are released, until
   `adapter_room_wait_s` runs out; commands (adapter loads, pins, unloads) run in order;
2. runs a decode step: it ends cancelled and expired requests (the engine frees their slots
   in this same step) and advances every running sequence by one token;
3. runs up to `prefill_steps_per_round` prefill steps, taking the inbox before each: each
   admits waiting requests from the fair `AdmissionQueue` within the sequence, token and
   distinct-adapter budgets and gives each its first token. The round ends early when a
   prefill step would admit nothing.
Each step's `TokenEvent`s go to their requests as soon as it ends, so the running sequences
wait for at most `prefill_steps_per_round` prefill steps between tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import count
from typing import Protocol, TypeVar

from loraplex.adapters.errors import AdapterCapacityExceeded
from loraplex.server.admission import AdmissionQueue, StepBudget
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
from loraplex.server.errors import (
    DeadlineExceeded,
    Draining,
    EngineFailure,
    LoraplexError,
    Overloaded,
)

log = logging.getLogger(__name__)
Clock = Callable[[], float]
T = TypeVar("T")
IDLE_POLL_S = 1.0  # an idle loop wakes on every submit, call and cancel; this is a safety net


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_sequences: int = 8
    max_batch_tokens: int = 2048
    max_adapters_per_step: int = 4
    max_queue: int = 64
    max_skips: int = 8  # steps a skipped request waits before it blocks the queue behind it
    prefill_steps_per_round: int = 2  # between two decode steps, at most
    adapter_room_wait_s: float = 30.0  # how long a load waits for adapters to be released


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
    error: Exception | None = None
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


@dataclass(eq=False)
class _Command:
    """Work a request thread asks the loop to run between steps, answered through `future`."""

    work: Callable[[], object]
    future: Future[object] = field(default_factory=Future)


@dataclass(eq=False)
class _AwaitingRoom:
    """A request or command whose adapter found no room; retried after releases."""

    item: RequestHandle | _Command
    give_up: float
    error: AdapterCapacityExceeded


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        adapters: AdapterAdmin | None,
        limits: SchedulerLimits,
        observer: SchedulerObserver | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.limits = limits
        self.observer = observer
        self.clock = clock
        self.steps = 0
        self._inbox: list[RequestHandle | _Command] = []
        self._awaiting: list[_AwaitingRoom] = []
        self._waiting: AdmissionQueue[RequestHandle] = AdmissionQueue(
            limits.max_queue, limits.max_skips
        )
        self._running: dict[str, RequestHandle] = {}
        self._lock = threading.Condition()
        self._ids = count()
        self._room_changed = False  # an adapter was released or a command ran since a retry
        self._admitting = True
        self._stopping = False
        self._loop_exited = threading.Event()  # set while no loop runs
        self._loop_exited.set()

    # ---- called from request threads -------------------------------------------------

    def submit(self, submission: Submission) -> RequestHandle:
        """Queue a request for the loop; raises Overloaded or Draining at once. Its adapter
        errors come out of `events()`."""
        with self._lock:
            self._check_admission()
            if self._backlog() >= self.limits.max_queue:
                raise Overloaded(
                    f"the admission queue is full ({self.limits.max_queue} requests waiting); "
                    "retry later"
                )
            handle = RequestHandle(
                seq_id=f"seq-{next(self._ids)}",
                submission=submission,
                adapter=None,
                timings=Timings(submitted=self.clock()),
                _wake=self._notify,
            )
            self._inbox.append(handle)
            self._lock.notify_all()
        return handle

    def call(self, work: Callable[[], T]) -> T:
        """Run `work` on the loop between steps and return its result or raise its error.
        Work that finds no adapter room is retried after releases, as requests are."""
        command = _Command(work)
        with self._lock:
            if self._stopping:
                raise Draining("the server is shutting down")
            self._inbox.append(command)
            self._lock.notify_all()
        return command.future.result()  # type: ignore[return-value]

    def counts(self) -> tuple[int, int]:
        """(running, waiting) right now."""
        with self._lock:
            return len(self._running), self._backlog()

    def adapters_in_flight(self) -> tuple[set[str], set[str]]:
        """The adapter ids of the running requests and of the waiting ones (not the base)."""
        with self._lock:
            running = {h.adapter_key for h in self._running.values()}
            waiting = {h.adapter_key for h in self._waiting}
            waiting |= {i.adapter_key for i in self._inbox if isinstance(i, RequestHandle)}
            waiting |= {a.item.adapter_key for a in self._awaiting
                        if isinstance(a.item, RequestHandle)}  # fmt: skip
        return running - {""}, waiting - {""}

    def running_requests(self) -> list[RequestHandle]:
        with self._lock:
            return list(self._running.values())

    def _backlog(self) -> int:
        handles = sum(isinstance(item, RequestHandle) for item in self._inbox)
        awaiting = sum(isinstance(a.item, RequestHandle) for a in self._awaiting)
        return handles + awaiting + len(self._waiting)

    def _check_admission(self) -> None:
        if not self._admitting:
            raise Draining("the server is shutting down and admits no new requests")

    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- the inbox ---------------------------------------------------------------------

    def _take_inbox(self) -> bool:
        """Admit new requests and run commands, in arrival order, then retry what waits for
        adapter room if some may have been made; False when there was nothing to take."""
        with self._lock:
            arrived, self._inbox = self._inbox, []
        for item in arrived:
            self._take(item, give_up=self.clock() + self.limits.adapter_room_wait_s)
        if self._room_changed and self._awaiting:
            self._room_changed = False
            retried, self._awaiting = self._awaiting, []
            for awaiting in retried:
                self._take(awaiting.item, awaiting.give_up)
        return bool(arrived)

    def _take(self, item: RequestHandle | _Command, give_up: float) -> None:
        try:
            if isinstance(item, _Command):
                self._run_command(item)
            else:
                self._admit(item)
        except AdapterCapacityExceeded as err:
            futile = self.adapters is None or not self.adapters.any_in_use()
            if futile or self.clock() >= give_up:
                self._refuse(item, err)
            else:
                with self._lock:
                    self._awaiting.append(_AwaitingRoom(item, give_up, err))
        except Exception as err:  # the request or command fails alone; the loop goes on
            self._refuse(item, err)

    def _run_command(self, command: _Command) -> None:
        result = command.work()
        self._room_changed = True  # an unload or unpin may have made room
        command.future.set_result(result)

    def _admit(self, handle: RequestHandle) -> None:
        if handle.cancelled:
            self._refuse(handle, None)
            return
        if handle.submission.adapter_id:
            handle.adapter = self._acquire(handle.submission)
            handle.adapter_version = handle.adapter.version
        with self._lock:
            try:
                self._waiting.push(handle)
            except LoraplexError:
                self._release_adapter(handle)
                raise

    def _acquire(self, submission: Submission) -> AdapterRef:
        if self.adapters is None:
            raise LoraplexError("this server has no adapter store")
        return self.adapters.acquire(submission.adapter_id, submission.adapter_scale)

    def _refuse(self, item: RequestHandle | _Command, error: Exception | None) -> None:
        """End a request that never queued, or fail a command; no metrics record."""
        if isinstance(item, _Command):
            item.future.set_exception(error or Draining("the server is shutting down"))
            return
        if error is None:
            item.finish_reason = FinishReason.CANCELLED
        self._close(item, error)

    # ---- the loop --------------------------------------------------------------------

    def step(self) -> bool:
        """Run one round: take the inbox, a decode step, then prefill steps while they admit
        a request (up to `prefill_steps_per_round`); False when there was nothing to do."""
        worked = self._take_inbox()
        worked = self._step(self._plan_decode) or worked
        for _ in range(self.limits.prefill_steps_per_round):
            self._take_inbox()  # a request that arrived during the last step joins this one
            if not self._step(self._plan_prefill):
                break
            worked = True
        return worked

    def _step(self, plan_step: Callable[[], StepPlan]) -> bool:
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
            running, waiting = len(self._running), self._backlog()
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
        """End cancelled and expired requests and those whose wait for adapter room ran out;
        return the running ones the engine must free."""
        for awaiting in [a for a in self._awaiting if self._given_up(a, now)]:
            self._awaiting.remove(awaiting)
            error = awaiting.error
            if isinstance(awaiting.item, RequestHandle) and self._abandoned(awaiting.item, now):
                error = self._abandon_error(awaiting.item)  # type: ignore[assignment]
            self._refuse(awaiting.item, error)
        release: list[str] = []
        for handle in [h for h in self._waiting if self._abandoned(h, now)]:
            self._waiting.remove(handle)
            self._end(handle, self._abandon_error(handle))
        for handle in [h for h in self._running.values() if self._abandoned(h, now)]:
            del self._running[handle.seq_id]
            release.append(handle.seq_id)
            self._end(handle, self._abandon_error(handle))
        return release

    def _given_up(self, awaiting: _AwaitingRoom, now: float) -> bool:
        item = awaiting.item
        return now >= awaiting.give_up or (
            isinstance(item, RequestHandle) and self._abandoned(item, now)
        )

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

    def _end(self, handle: RequestHandle, error: Exception | None) -> None:
        self._release_adapter(handle)
        self._close(handle, error)
        if self.observer is not None:
            self.observer.request_finished(self._record(handle))

    def _close(self, handle: RequestHandle, error: Exception | None) -> None:
        """Hand the request its end: its events stop, raising `error` if there is one."""
        handle.error = error
        handle.timings.finished = self.clock()
        handle._outbox.put(_END)

    def _release_adapter(self, handle: RequestHandle) -> None:
        if handle.adapter is not None and self.adapters is not None:
            self.adapters.release(handle.adapter)
            handle.adapter = None
            self._room_changed = True

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
                # What waits for adapter room waits for a release, a command or its give-up
                # time, not for the loop to spin: the poll ends it in time.
                if not self._can_step() and not self._stopping:
                    self._lock.wait(timeout=IDLE_POLL_S)

    def _can_step(self) -> bool:
        return bool(self._running or len(self._waiting) or self._inbox)

    def _has_work(self) -> bool:
        return self._can_step() or bool(self._awaiting)

    @property
    def admitting(self) -> bool:
        """False once draining has begun: `submit` then raises Draining."""
        return self._admitting

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
            while self._has_work() and self.clock() < end:
                self._lock.wait(timeout=min(0.1, max(0.0, end - self.clock())))
            clean = not self._has_work()
        self.stop()
        return clean

    def stop(self) -> None:
        """Stop the loop and wait for it to exit (never call it from the loop's own thread),
        then end whatever is still queued or running and fail the commands not run."""
        self._admitting = False
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._loop_exited.wait()
        with self._lock:
            left = self._inbox + [a.item for a in self._awaiting]
            self._inbox, self._awaiting = [], []
        for item in left:
            self._refuse(item, Draining("the server stopped before this request ran"))
        with self._lock:
            for handle in list(self._waiting):
                self._waiting.remove(handle)
                self._end(handle, Draining("the server stopped before this request ran"))
            for seq_id, handle in list(self._running.items()):
                del self._running[seq_id]
                self.engine.release(seq_id)
                self._end(handle, Draining("the server stopped before this request finished"))
