"""request_id is bounded and sent once per stream, so a client cannot make the server echo
a large id in every token message (a 1 MiB id with 8 tokens once cost 9.4 MB of replies).

One in-process server on loopback around the model-free engine, for the whole module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from fake_engine import FakeAdapters, FakeEngine

from loraplex.clients import AsyncClient, Client
from loraplex.clients import errors as client_errors
from loraplex.proto.v1 import loraplex_pb2 as pb
from loraplex.proto.v1 import loraplex_pb2_grpc as pb_grpc
from loraplex.server.serve import RunningServer, ServeConfig, start

LIMIT = 256
MAX_NEW = 8


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    config = ServeConfig(port=0, metrics=False, max_new_tokens_limit=1000)
    running = start(config, FakeEngine(max_context=64), FakeAdapters(known={"a"}))
    yield running
    running.drain(grace_s=5)


@pytest.fixture(scope="module")
def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[Client]:
    with Client(target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(target: str) -> Iterator[pb_grpc.LoraplexStub]:
    """The raw stub, to see each stream message as the server sent it."""
    with grpc.insecure_channel(target) as channel:
        yield pb_grpc.LoraplexStub(channel)


def raw_stream(stub: pb_grpc.LoraplexStub, request_id: str) -> list[pb.GenerateStreamResponse]:
    request = pb.GenerateStreamRequest(
        prompt="hello", sampling=pb.SamplingParams(max_new_tokens=MAX_NEW), request_id=request_id
    )
    return list(stub.GenerateStream(request, timeout=30))


TOO_LONG = {
    "one byte over": "x" * (LIMIT + 1),
    "the issue's 1 MiB": "x" * (1 << 20),
    # 129 characters but 258 bytes: the limit counts encoded bytes, not characters.
    "two-byte characters": "é" * (LIMIT // 2 + 1),
}


@pytest.mark.parametrize("request_id", TOO_LONG.values(), ids=TOO_LONG.keys())
def test_an_over_long_request_id_is_invalid_argument_naming_field_and_limit(
    client: Client, request_id: str
) -> None:
    calls = {
        "unary": lambda: client.generate("hi", max_new_tokens=2, request_id=request_id),
        "stream": lambda: list(client.stream("hi", max_new_tokens=2, request_id=request_id)),
    }
    for name, call in calls.items():
        with pytest.raises(client_errors.InvalidArgument) as caught:
            call()
        assert "request_id" in caught.value.details, name
        assert str(LIMIT) in caught.value.details, name
    assert client.generate("still serving", max_new_tokens=2).completion_tokens == 2


@pytest.mark.parametrize("request_id", ["r" * LIMIT, "é" * (LIMIT // 2)], ids=["ascii", "utf8"])
def test_an_id_of_exactly_the_limit_is_accepted_and_echoed(client: Client, request_id: str) -> None:
    assert len(request_id.encode()) == LIMIT
    unary = client.generate("hi", max_new_tokens=2, request_id=request_id)
    assert unary.request_id == request_id and unary.completion_tokens == 2
    stream = client.stream("hi", max_new_tokens=2, request_id=request_id)
    assert len(list(stream)) == 2
    assert stream.result is not None and stream.result.request_id == request_id


def test_a_stream_carries_the_id_once_in_its_first_message(stub: pb_grpc.LoraplexStub) -> None:
    request_id = "s" * LIMIT
    replies = raw_stream(stub, request_id)
    assert len(replies) == MAX_NEW + 1  # one per token, then the final one
    assert [m.request_id for m in replies] == [request_id] + [""] * MAX_NEW
    sent = b"".join(m.SerializeToString() for m in replies)
    assert sent.count(request_id.encode()) == 1


def test_unary_generate_echoes_the_id_in_its_response(stub: pb_grpc.LoraplexStub) -> None:
    request = pb.GenerateRequest(
        prompt="hello", sampling=pb.SamplingParams(max_new_tokens=MAX_NEW), request_id="u-1"
    )
    assert stub.Generate(request, timeout=30).request_id == "u-1"


def test_both_clients_still_report_a_streams_id(client: Client, target: str) -> None:
    stream = client.stream("hello", max_new_tokens=MAX_NEW, request_id="sync-1")
    assert len(list(stream)) == MAX_NEW
    assert stream.result is not None and stream.result.request_id == "sync-1"

    async def run() -> str | None:
        async with AsyncClient(target, timeout=30) as aclient:
            astream = aclient.stream("hello", max_new_tokens=MAX_NEW, request_id="async-1")
            assert len([chunk async for chunk in astream]) == MAX_NEW
            return None if astream.result is None else astream.result.request_id

    assert asyncio.run(run()) == "async-1"


def test_a_stream_without_an_id_sends_none(stub: pb_grpc.LoraplexStub) -> None:
    assert all(m.request_id == "" for m in raw_stream(stub, ""))
