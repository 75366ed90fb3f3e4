"""Faults survived with nothing lost, with real processes: adapter files broken under a running
server, a client killed mid-stream, many slow clients, a trainer killed with kill -9, and a
write that hits the file-size limit (a full disk, as the writer sees it)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_helpers import metric, scrape
from peft import LoraConfig
from peft_adapters import save_adapter
from safetensors.torch import load_file
from server_process import ServerProcess
from test_trainer import DATA
from transformers import AutoModelForCausalLM
from waiting import wait_for

from loraplex.adapters.paths import scan_adapter_ids
from loraplex.clients import Client
from loraplex.clients import errors as client_errors

PROMPT = "The capital of France"
SERVE_ARGS = ["--quantization", "fp32", "--max-new-tokens-limit", "1000", "--log-level", "warning"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def root(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    for name in ("victim", "other"):
        save_adapter(base, config, root / name, seed=len(name), std=1.0)
    return root


@pytest.fixture
def server(checkpoint: Path, root: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """Two running sequences and two waiting requests at most."""
    args = ["--model", str(checkpoint), "--adapter-roots", str(root), *SERVE_ARGS]
    args += ["--max-batch-sequences", "2", "--max-queue", "2", "--cache-dir", str(tmp_path)]
    proc = ServerProcess(args, tmp_path / "server.log")
    yield proc
    proc.stop()


def held(server: ServerProcess) -> dict[str, float]:
    samples = scrape(server.metrics_port)
    names = ("sequences", "kv_cache_rows", "adapter_slot_holds")
    return {n: metric(samples, "loraplex_engine_held", resource=n) for n in names}


def idle(server: ServerProcess, client: Client) -> bool:
    info = client.server_info()
    return info.running == info.waiting == 0 and not any(held(server).values())


def test_adapter_files_broken_while_resident(server: ServerProcess, root: Path) -> None:
    shutil.copytree(root / "victim", root / "victim-copy")
    try:
        with Client(server.target, timeout=120) as client:
            loaded = client.load_adapter("victim-copy")
            before = client.generate(PROMPT, adapter="victim-copy", max_new_tokens=8).token_ids
            stream = client.stream(PROMPT, adapter="victim-copy", max_new_tokens=300)
            chunks = iter(stream)
            next(chunks)
            (root / "victim-copy" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
            list(chunks)  # the running request finishes on the weights it started with
            assert stream.result is not None
            # the resident version keeps serving; loading the broken files says what is wrong
            again = client.generate(PROMPT, adapter="victim-copy", max_new_tokens=300)
            assert again.token_ids == stream.result.token_ids
            assert again.token_ids[:8] == before and again.adapter_version == loaded.version
            with pytest.raises(client_errors.FailedPrecondition, match="safetensors"):
                client.load_adapter("victim-copy")
            shutil.rmtree(root / "victim-copy")
            with pytest.raises(client_errors.NotFound):
                client.load_adapter("victim-copy")
            assert client.generate(PROMPT, adapter="victim-copy", max_new_tokens=8).token_ids \
                == before  # fmt: skip
            client.unload_adapter("victim-copy")
            with pytest.raises(client_errors.NotFound):
                client.generate(PROMPT, adapter="victim-copy", max_new_tokens=8)
            wait_for(lambda: idle(server, client))
    finally:
        shutil.rmtree(root / "victim-copy", ignore_errors=True)


CLIENT = """
import sys
from loraplex.clients import Client
stream = Client(sys.argv[1]).stream("The capital of France", adapter="victim", max_new_tokens=900)
next(iter(stream))
print("streaming", flush=True)
sys.stdin.read()
"""


def test_a_client_killed_mid_stream_frees_its_sequence(server: ServerProcess) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.target],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "streaming"
    with Client(server.target, timeout=60) as client:
        assert client.server_info().running == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: idle(server, client))
        samples = scrape(server.metrics_port)
        assert metric(samples, "loraplex_requests_total", adapter="victim", status="CANCELLED") == 1
        assert client.generate(PROMPT, adapter="victim", max_new_tokens=4).completion_tokens == 4


def test_many_slow_clients_meet_the_admission_queue(server: ServerProcess) -> None:
    """Clients that never read: the server runs 2, queues 2, refuses the rest, stays healthy."""
    with Client(server.target, timeout=120) as client:
        running = [client.stream(PROMPT, adapter="other", max_new_tokens=900) for _ in range(2)]
        for stream in running:
            next(iter(stream))
        # both rows are running before the rest arrive, so exactly two of them find queue room
        assert client.server_info().running == 2
        later = [client.stream(PROMPT, adapter="other", max_new_tokens=400) for _ in range(10)]
        refused, queued = [], []
        for stream in later:
            try:
                next(iter(stream))
                queued.append(stream)
            except client_errors.ResourceExhausted:
                refused.append(stream)
        assert len(queued) == 2 and len(refused) == 8
        assert client.health() == "SERVING"
        for stream in running + queued:  # slow readers still get every token
            received = 1 + sum(len(c.token_ids) for c in stream)
            assert stream.result is not None and received == stream.result.completion_tokens
        wait_for(lambda: idle(server, client))


# ---- the trainer ----------------------------------------------------------------------


def train_command(checkpoint: Path, out: Path, checkpoints: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "loraplex.server.cli", "train-adapter", "--model", str(checkpoint),
        "--quantization", "none", "--data", str(DATA["sft"]), "--output", str(out),
        "--max-steps", "8", "--batch-size", "2", "--max-length", "96", "--learning-rate", "5e-3",
        "--optimizer", "adamw_torch", "--save-steps", "2", "--checkpoint-dir", str(checkpoints),
        "--no-progress", *extra,
    ]  # fmt: skip


def test_kill_9_mid_training_then_resume(checkpoint: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LORAPLEX_CACHE": str(tmp_path / "cache")}
    root, ckpt = tmp_path / "adapters", tmp_path / "ckpt"
    command = train_command(checkpoint, root / "new", ckpt)
    proc = subprocess.Popen(command, env=env)
    wait_for(lambda: (ckpt / "checkpoint-4" / "trainer_state.json").is_file(), within_s=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "new").exists() and list(scan_adapter_ids([root])) == []
    # a checkpoint cut short mid-save (no trainer_state.json) must not be resumed from
    partial = ckpt / "checkpoint-99"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\x00cut short")
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-99" not in resumed.stderr
    straight = subprocess.run(train_command(checkpoint, tmp_path / "straight", tmp_path / "c2"),
                              env=env, capture_output=True, text=True)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_file(str(root / "new" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_a_full_disk_leaves_the_previous_adapter_intact(checkpoint: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LORAPLEX_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "adapters" / "kept"
    first = subprocess.run(train_command(checkpoint, out, tmp_path / "c1"), env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = 4096  # bytes any one file may grow to: the new adapter's weights cannot be written

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    again = subprocess.run(
        train_command(checkpoint, out, tmp_path / "c2", "--overwrite", "--save-steps", "0"),
        env=env, capture_output=True, text=True, preexec_fn=small_disk,
    )  # fmt: skip
    assert again.returncode == 2, again.stderr[-3000:]
    assert "no room to write" in again.stderr and "left as it was" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["kept"], "scratch files left behind"
