"""Engine steps and side work take turns: neither starts while the other runs, and neither
can starve the other."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from fake_engine import FakeAdapters

from loraplex.adapters.store import AdapterStore
from loraplex.server.cpu_turns import CpuTurns
from loraplex.server.serve import cpu_turns

SETTLE_S = 0.2  # long enough for a thread that is not blocked to have started
WAIT_S = 10.0


def in_thread(work: Callable[[], None]) -> tuple[threading.Thread, threading.Event]:
    """Start `work` in a thread; the event is set once it has returned."""
    done = threading.Event()

    def run() -> None:
        work()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


Context = Callable[[], AbstractContextManager[None]]


def hold(context: Context, entered: threading.Event, leave: threading.Event,
         log: list[str], name: str) -> Callable[[], None]:  # fmt: skip
    """Work that enters `context`, logs `name`, and stays inside until `leave` is set."""

    def work() -> None:
        with context():
            log.append(name)
            entered.set()
            assert leave.wait(WAIT_S)

    return work


def test_an_idle_engine_lets_side_work_start_at_once() -> None:
    turns = CpuTurns()

    def side() -> None:
        with turns.side_work():
            pass

    _, done = in_thread(side)
    assert done.wait(WAIT_S)


def test_side_work_waits_for_the_step_in_progress() -> None:
    turns, log = CpuTurns(), []
    entered, leave = threading.Event(), threading.Event()
    with turns.step():
        in_thread(hold(turns.side_work, entered, leave, log, "side"))
        assert not entered.wait(SETTLE_S)
        log.append("step ends")
    assert entered.wait(WAIT_S)
    assert log == ["step ends", "side"]
    leave.set()


def test_a_step_waits_for_side_work_in_progress() -> None:
    turns, log = CpuTurns(), []
    side_in, side_out = threading.Event(), threading.Event()
    step_in, step_out = threading.Event(), threading.Event()
    in_thread(hold(turns.side_work, side_in, side_out, log, "side"))
    assert side_in.wait(WAIT_S)
    in_thread(hold(turns.step, step_in, step_out, log, "step"))
    assert not step_in.wait(SETTLE_S)
    side_out.set()
    assert step_in.wait(WAIT_S)
    assert log == ["side", "step"]
    step_out.set()


def test_side_work_arriving_while_the_engine_waits_goes_after_its_step() -> None:
    """A stream of overlapping side jobs cannot keep the engine from stepping, and the jobs
    that wait for a step all run before the step after it."""
    turns, log, rounds = CpuTurns(), [], 3
    first_in, first_out = threading.Event(), threading.Event()
    in_thread(hold(turns.side_work, first_in, first_out, log, "side 0"))
    assert first_in.wait(WAIT_S)
    for i in range(1, rounds + 1):
        step_in, step_out = threading.Event(), threading.Event()
        step, _ = in_thread(hold(turns.step, step_in, step_out, log, f"step {i}"))
        assert not step_in.wait(SETTLE_S)  # side job i-1 still runs
        side_in, side_out = threading.Event(), threading.Event()
        in_thread(hold(turns.side_work, side_in, side_out, log, f"side {i}"))
        assert not side_in.wait(SETTLE_S)  # the engine waits: this job goes after its step
        first_out.set()
        assert step_in.wait(WAIT_S)
        assert not side_in.wait(SETTLE_S)
        step_out.set()
        step.join(WAIT_S)
        assert side_in.wait(WAIT_S)
        first_out = side_out
    first_out.set()
    expected = ["side 0"] + [
        f"{kind} {i}" for i in range(1, rounds + 1) for kind in ("step", "side")
    ]
    assert log == expected


class _EngineOn:
    def __init__(self, device: str) -> None:
        self.device = torch.device(device)


def test_the_server_takes_turns_only_where_the_engine_computes_on_the_cpu(tmp_path: Path) -> None:
    store = AdapterStore([tmp_path])
    assert cpu_turns(_EngineOn("cuda"), store) is None  # type: ignore[arg-type]
    assert store.side_work is contextlib.nullcontext
    turns = cpu_turns(_EngineOn("cpu"), store)  # type: ignore[arg-type]
    assert turns is not None and store.side_work == turns.side_work
    no_device = cpu_turns(object(), AdapterStore([tmp_path]))  # type: ignore[arg-type]
    assert no_device is not None  # the GGUF engine: llama.cpp computes on the CPU threads
    assert cpu_turns(_EngineOn("cpu"), FakeAdapters(known=set())) is None  # no side work


def test_side_work_finished_inside_keep_side_turn_holds_the_turn_until_the_block_ends() -> None:
    turns, log = CpuTurns(), []
    step_in, step_out = threading.Event(), threading.Event()
    with turns.keep_side_turn():
        with turns.side_work():
            log.append("load")
        in_thread(hold(turns.step, step_in, step_out, log, "step"))
        assert not step_in.wait(SETTLE_S)
        with turns.side_work():  # more side work in the kept turn starts at once
            log.append("load again")
        log.append("queued")
    assert step_in.wait(WAIT_S)
    step_out.set()
    assert log == ["load", "load again", "queued", "step"]


def test_side_work_that_fails_inside_keep_side_turn_ends_its_turn_at_once() -> None:
    """The caller may then wait for room that only steps can free."""
    turns = CpuTurns()
    step_in, step_out = threading.Event(), threading.Event()
    with turns.keep_side_turn():
        with contextlib.suppress(RuntimeError), turns.side_work():
            raise RuntimeError("no room")
        in_thread(hold(turns.step, step_in, step_out, [], "step"))
        assert step_in.wait(WAIT_S)
    step_out.set()


def test_keep_side_turn_without_side_work_holds_nothing() -> None:
    turns = CpuTurns()
    step_in, step_out = threading.Event(), threading.Event()
    with turns.keep_side_turn():
        in_thread(hold(turns.step, step_in, step_out, [], "step"))
        assert step_in.wait(WAIT_S)
    step_out.set()


def test_side_work_runs_on_one_torch_thread_and_puts_the_setting_back() -> None:
    turns = CpuTurns()
    seen: list[int] = []

    def work() -> None:
        torch.set_num_threads(2)
        with turns.side_work():
            seen.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(WAIT_S)
    assert seen == [1, 2]
