"""Helpers shared by the gRPC tests: free ports, raw calls, and metric scrapes."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable

import grpc
from prometheus_client.parser import text_string_to_metric_families

SERVICE = "/loraplex.v1.Loraplex/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_unary(channel: grpc.Channel, method: str) -> Callable[..., bytes]:
    """Call a method with hand-made request bytes, bypassing the client's serializer."""
    return channel.unary_unary(
        SERVICE + method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payload shorter than 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def scrape(
    port: int, host: str = "127.0.0.1"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it; keys are (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
