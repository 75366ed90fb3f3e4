"""Drive a live loraplex server with a trace, over asyncio gRPC, and record every request.

Open-loop traces send each request at its arrival time, whatever is still in flight; closed-
loop traces keep `concurrency` clients busy. Each request streams, so the client itself sees
its time to first token. The runner measures its own overhead: how late it sent requests
against the trace (send lag) and the CPU time it used.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from loraplex.bench.stats import Distribution
from loraplex.bench.workload import Trace, TraceRequest
from loraplex.clients import AsyncClient
from loraplex.clients.errors import LoraplexClientError
from loraplex.server.gc_pauses import frozen_startup_objects


@dataclass(frozen=True)
class RequestRecord:
    index: int
    adapter_id: str
    status: str  # "OK", or the gRPC status code name
    queue_s: float  # server-side wait for admission
    ttft_s: float  # client-side: sent → first token
    tpot_s: float  # client-side: mean gap between later tokens (0 with one token)
    e2e_s: float  # client-side: sent → stream ended
    prompt_tokens: int
    completion_tokens: int
    send_lag_s: float  # sent later than the trace said, by this much (runner overhead)
    error: str = ""  # the server's message when status is not OK


@dataclass(frozen=True)
class RunResult:
    records: list[RequestRecord]
    wall_s: float
    runner_cpu_s: float

    def summary(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.status == "OK"]
        tokens = sum(r.completion_tokens for r in ok)
        statuses: dict[str, int] = {}
        for record in self.records:
            statuses[record.status] = statuses.get(record.status, 0) + 1
        return {
            "requests": len(self.records),
            "statuses": statuses,
            "completion_tokens": tokens,
            "wall_s": self.wall_s,
            "throughput_tok_s": tokens / self.wall_s if self.wall_s else 0.0,
            "throughput_req_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            **{
                name: asdict(Distribution.of([getattr(r, name) for r in ok]))
                for name in ("queue_s", "ttft_s", "tpot_s", "e2e_s")
            },
            "runner": {
                "cpu_s": self.runner_cpu_s,
                "cpu_share": self.runner_cpu_s / self.wall_s if self.wall_s else 0.0,
                "send_lag_s": asdict(Distribution.of([r.send_lag_s for r in self.records])),
            },
        }


async def run_trace(
    target: str, trace: Trace, progress: bool = True, timeout_s: float = 3600
) -> RunResult:
    """Send every request of `trace` to the server at `target`; never raises for a request."""
    bar = tqdm(total=len(trace.requests), desc="requests", unit="req", disable=not progress)
    with frozen_startup_objects():  # a collection would pause the client mid-request
        cpu_start, start = time.process_time(), time.perf_counter()
        records = await _run(target, trace, bar, start, timeout_s)
        wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    bar.close()
    ordered = sorted(records, key=lambda r: r.index)
    return RunResult(ordered, wall, cpu_s)


async def _run(
    target: str, trace: Trace, bar: tqdm[Any], start: float, timeout_s: float
) -> list[RequestRecord]:
    async with AsyncClient(target, timeout=timeout_s) as client:

        async def one(request: TraceRequest, due: float) -> RequestRecord:
            record = await send(client, request, start, due)
            bar.update()
            return record

        if trace.spec.arrival == "closed":
            return await closed_loop(one, trace)
        return await _open_loop(one, trace, start)


async def _open_loop(one: Any, trace: Trace, start: float) -> list[RequestRecord]:
    tasks = []
    for request in trace.requests:
        due = start + float(request.arrival_s or 0.0)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(request, due)))
    return list(await asyncio.gather(*tasks))


async def closed_loop(one: Any, trace: Trace) -> list[RequestRecord]:
    """Keep `trace.spec.concurrency` clients busy: each sends `one(request, sent_at)` as soon
    as its last request ended, until the trace is used up."""
    todo = list(reversed(trace.requests))
    records: list[RequestRecord] = []

    async def client_loop() -> None:
        while todo:
            records.append(await one(todo.pop(), time.perf_counter()))

    await asyncio.gather(*(client_loop() for _ in range(trace.spec.concurrency)))
    return records


async def send(
    client: AsyncClient, request: TraceRequest, start: float, due: float
) -> RequestRecord:
    sent = time.perf_counter()
    first: float | None = None
    stamps: list[float] = []
    stream = client.stream(
        request.prompt,
        adapter=request.adapter_id,
        max_new_tokens=request.output_tokens,
        request_id=f"trace-{request.index}",
    )
    status, error = "OK", ""
    try:
        async for chunk in stream:
            now = time.perf_counter()
            first = first or now
            stamps += [now] * len(chunk.token_ids)
    except LoraplexClientError as err:
        status, error = err.code.name, err.details
    end = time.perf_counter()
    result = stream.result
    gaps = len(stamps) - 1
    return RequestRecord(
        index=request.index,
        adapter_id=request.adapter_id,
        status=status if result is not None or status != "OK" else "INCOMPLETE",
        queue_s=result.timings.queue_s if result else 0.0,
        ttft_s=(first or end) - sent,
        tpot_s=(stamps[-1] - stamps[0]) / gaps if gaps > 0 else 0.0,
        e2e_s=end - sent,
        prompt_tokens=result.prompt_tokens if result else 0,
        completion_tokens=result.completion_tokens if result else len(stamps),
        send_lag_s=max(0.0, sent - due),
        error=error,
    )
