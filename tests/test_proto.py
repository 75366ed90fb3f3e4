"""The committed stubs match the .proto source, and the wire format says what the API promises."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.proto.v1 import loraplex_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to run scripts/gen_proto.sh")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated, "gen_proto.sh produced nothing"
    for name in generated:
        committed = ROOT / "proto" / "v1" / name
        assert committed.is_file(), f"{name} is not committed; run scripts/gen_proto.sh"
        assert filecmp.cmp(committed, tmp_path / name, shallow=False), (
            f"proto/v1/{name} is stale; run scripts/gen_proto.sh and commit the result"
        )


def test_package_is_versioned() -> None:
    assert pb.DESCRIPTOR.package == "loraplex.v1"


def test_every_rpc_has_its_own_request_and_response() -> None:
    methods = pb.DESCRIPTOR.services_by_name["Loraplex"].methods
    inputs = [m.input_type.full_name for m in methods]
    outputs = [m.output_type.full_name for m in methods]
    assert len(set(inputs)) == len(methods)
    assert len(set(outputs)) == len(methods)
    for m in methods:
        assert m.input_type.name == f"{m.name}Request"
        assert m.output_type.name == f"{m.name}Response"


def test_streaming_rpc_is_server_streaming_only() -> None:
    methods = {m.name: m for m in pb.DESCRIPTOR.services_by_name["Loraplex"].methods}
    stream = methods["GenerateStream"]
    assert stream.server_streaming and not stream.client_streaming
    assert not methods["Generate"].server_streaming


def test_both_generation_requests_carry_the_same_fields() -> None:
    def shape(desc: object) -> list[tuple[str, int, int]]:
        return [(f.name, f.number, f.type) for f in desc.fields]  # type: ignore[attr-defined]

    assert shape(pb.GenerateRequest.DESCRIPTOR) == shape(pb.GenerateStreamRequest.DESCRIPTOR)
    assert shape(pb.GenerateResponse.DESCRIPTOR) == shape(pb.GenerateStreamResponse.DESCRIPTOR)


def test_optional_numbers_distinguish_zero_from_unset() -> None:
    params = pb.SamplingParams()
    assert not params.HasField("max_new_tokens")
    params.max_new_tokens = 0
    assert params.HasField("max_new_tokens")
    again = pb.SamplingParams.FromString(params.SerializeToString())
    assert again.HasField("max_new_tokens") and again.max_new_tokens == 0


def test_invalid_utf8_in_a_string_field_is_rejected_at_parse_time() -> None:
    # Field 1 (prompt), wire type 2, length 2, bytes that are not UTF-8.
    raw = bytes([0x0A, 0x02, 0xFF, 0xFE])
    with pytest.raises(Exception, match=r"(?i)utf-?8|decode|parse"):
        pb.GenerateRequest.FromString(raw)
