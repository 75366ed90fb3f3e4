"""Run the real `loraplex serve` process on loopback ports for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_helpers import free_port

START_TIMEOUT_S = 300


class ServerProcess:
    """`python -m loraplex.server.cli serve ...`; always stop() it (fixtures do, in teardown)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "loraplex.server.cli", "serve", *args]
        command += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        env.pop("LORAPLEX_CONFIG", None)
        # Served tokens are compared with exact in-process oracles; the default output head
        # (auto) may time int8 faster on this machine (a flag in `args` still wins).
        env.setdefault("LORAPLEX_OUTPUT_HEAD", "full")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        pause = threading.Event()
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(START_TIMEOUT_S * 4):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited at start:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                pause.wait(0.25)
        self.stop()
        raise RuntimeError(f"the server did not start within {START_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
