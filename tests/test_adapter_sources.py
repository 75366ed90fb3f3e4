"""Adapters from where users keep them: a hub id served from a pre-populated hub cache in
offline mode, folders on a local HTTP server and on an S3-compatible server (moto) on
loopback, and the bad sources (an unknown scheme, outside the allow-list, a body larger than
its header said, a 404, an unreachable hub), each with its status and nothing left in the
cache.

Oracle: the same adapter from a local root, served by the same server; a remote copy must
give its greedy tokens exactly (and differ from the base's).
"""

from __future__ import annotations

import collections
import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import pytest
from grpc_helpers import free_port
from peft_adapters import ADAPTER_CONFIGS, save_adapter
from server_process import ServerProcess
from transformers import AutoModelForCausalLM

from loraplex.adapters.errors import (
    AdapterNotFound,
    AdapterSourceRefused,
    AdapterSourceUnavailable,
    InvalidAdapter,
)
from loraplex.adapters.sources import AdapterSources, parse_allowed
from loraplex.clients import Client
from loraplex.clients import errors as client_errors
from loraplex.server import convert
from loraplex.server.errors import InvalidRequest

HUB_REPO, HUB_COMMIT = "acme/tiny-lora", "0123456789abcdef0123456789abcdef01234567"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "loraplex-test", "AWS_SECRET_ACCESS_KEY": "loraplex-test",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
PROMPT = "Hello there"


class LyingHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server whose HEAD replies under /liar/ declare half the file's size;
    it counts the GETs of each path."""

    gets: ClassVar[collections.Counter[str]] = collections.Counter()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        LyingHandler.gets[self.path] += 1
        super().do_GET()

    def send_header(self, keyword: str, value: str) -> None:
        if (
            self.command == "HEAD"
            and self.path.startswith("/liar/")
            and keyword == "Content-Length"
        ):
            value = str(int(value) // 2)
        super().send_header(keyword, value)


@pytest.fixture(scope="module")
def adapter_dir(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("local-adapters")
    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    return save_adapter(base, ADAPTER_CONFIGS["lora-qv-r4"], root / "local", seed=7, std=1.0)


@pytest.fixture(scope="module")
def http_root(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    served = tmp_path_factory.mktemp("http-served")
    for folder in ("good", "liar"):
        shutil.copytree(adapter_dir, served / folder)
    handler = functools.partial(LyingHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_endpoint(adapter_dir: Path) -> Iterator[str]:
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    key, secret = S3_KEYS["AWS_ACCESS_KEY_ID"], S3_KEYS["AWS_SECRET_ACCESS_KEY"]
    fs = s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("adapters")
    for file in adapter_dir.iterdir():
        fs.pipe(f"adapters/team/good/{file.name}", file.read_bytes())
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**S3_KEYS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)


def hub_cache(adapter_dir: Path, cache: Path) -> Path:
    """The hub's own cache layout (models--org--name/refs and snapshots), as a download
    made earlier on a machine with network would have left it."""
    repo = cache / f"models--{HUB_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    for file in adapter_dir.iterdir():
        shutil.copyfile(file, snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    return cache


def cached_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---- the sources on their own --------------------------------------------------------------


def test_an_http_folder_is_downloaded_once_with_its_files_intact(
    adapter_dir: Path, http_root: str, tmp_path: Path
) -> None:
    sources = AdapterSources([], tmp_path / "cache", ["local", http_root + "/"])
    url = f"{http_root}/good"
    sources.fetch(url)
    folder = sources.locate(url)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (adapter_dir / name).read_bytes()
    assert (folder / "source.txt").read_text().strip() == url
    assert len(cached_entries(tmp_path / "cache")) == 1  # no partial folder left beside it


def test_requests_for_one_new_adapter_at_once_download_it_once(
    adapter_dir: Path, tmp_path: Path
) -> None:
    served = tmp_path / "served"
    shutil.copytree(adapter_dir, served / "twice")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(LyingHandler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}/"
    sources = AdapterSources([], tmp_path / "cache", [root])
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: sources.fetch(root + "twice"), range(4)))
    finally:
        server.shutdown()
        server.server_close()
    assert LyingHandler.gets["/twice/adapter_model.safetensors"] == 1
    assert len(cached_entries(tmp_path / "cache")) == 1


def test_an_s3_folder_is_downloaded(adapter_dir: Path, s3_env: None, tmp_path: Path) -> None:
    sources = AdapterSources([], tmp_path / "cache", ["s3://adapters/"])
    url = "s3://adapters/team/good"
    sources.fetch(url)
    weights = sources.locate(url) / "adapter_model.safetensors"
    assert weights.read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("suffix", "error"),
    [("/missing", AdapterNotFound), ("/liar", InvalidAdapter)],
    ids=["404", "body-larger-than-declared"],
)
def test_bad_http_sources_leave_nothing_in_the_cache(
    http_root: str, tmp_path: Path, suffix: str, error: type[Exception]
) -> None:
    sources = AdapterSources([], tmp_path / "cache", [http_root + "/"])
    with pytest.raises(error):
        sources.fetch(http_root + suffix)
    assert cached_entries(tmp_path / "cache") == []
    with pytest.raises(AdapterNotFound):
        sources.locate(http_root + suffix)


def test_sources_outside_the_allow_list_are_refused_before_any_transfer(
    http_root: str, tmp_path: Path
) -> None:
    local_only = AdapterSources([], tmp_path / "cache")
    for adapter_id in (f"{http_root}/good", "s3://adapters/team/good", "acme/x@main"):
        with pytest.raises(AdapterSourceRefused):
            local_only.fetch(adapter_id)
    other_prefix = AdapterSources([], tmp_path / "cache", [f"{http_root}/other/"])
    with pytest.raises(AdapterSourceRefused, match="allow-list"):
        other_prefix.fetch(f"{http_root}/good")
    no_slash = AdapterSources([], tmp_path / "cache", ["http://127.0.0.1:80", "s3://adapters"])
    for elsewhere in ("http://127.0.0.1:8080/good", "http://127.0.0.1:80.evil.example/good",
                      "s3://adapters-other/good"):  # fmt: skip
        with pytest.raises(AdapterSourceRefused, match="allow-list"):
            no_slash.fetch(elsewhere)
    assert cached_entries(tmp_path / "cache") == []


def test_a_file_over_the_download_limit_is_refused(http_root: str, tmp_path: Path) -> None:
    sources = AdapterSources([], tmp_path / "cache", [http_root + "/"], max_download_bytes=1000)
    with pytest.raises(InvalidAdapter, match="download limit"):
        sources.fetch(f"{http_root}/good")
    assert cached_entries(tmp_path / "cache") == []


def test_an_unreachable_source_is_unavailable(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/"
    sources = AdapterSources([], tmp_path / "cache", [closed])
    with pytest.raises(AdapterSourceUnavailable):
        sources.fetch(closed + "adapter")
    assert cached_entries(tmp_path / "cache") == []


def test_ids_and_allow_list_entries_are_checked() -> None:
    for good in ("a00", "team/a00", "acme/tiny-lora@v1.0", "https://h.example/x/y", "s3://b/k"):
        assert convert.check_adapter_id(good) == good
    for bad, match in (
        ("ftp://h/x", "unknown adapter source scheme"),
        ("../x", "not an adapter"),
        ("http:///nohost", "not an adapter URL"),
        ("a b", "not an adapter"),
        ("https://h/ok/../../secret", "segments"),
        ("https://h/ok/%2e%2e/secret", "segments"),
    ):
        with pytest.raises(InvalidRequest, match=match):
            convert.check_adapter_id(bad)  # fmt: skip
    assert parse_allowed(["local", "hf", "s3://bucket/"]) == ("local", "hf", "s3://bucket/")
    for bad_entry in ("ftp://h/", "https://", "anywhere"):
        with pytest.raises(ValueError, match="--adapter-sources"):
            parse_allowed([bad_entry])


# ---- the real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    tiny_checkpoints: dict[str, Path], adapter_dir: Path, http_root: str, s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, Path]]:  # fmt: skip
    work = tmp_path_factory.mktemp("sources-server")
    cache = work / "adapter-downloads"
    env = {**S3_KEYS, "AWS_ENDPOINT_URL": s3_endpoint, "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(hub_cache(adapter_dir, work / "hub"))}  # fmt: skip
    args = ["--model", str(tiny_checkpoints["llama"]), "--quantization", "fp32",
            "--adapter-roots", str(adapter_dir.parent), "--adapter-cache", str(cache),
            "--adapter-sources", "hf", "--adapter-sources", f"{http_root}/",
            "--adapter-sources", "s3://adapters/",
            "--preload-adapters", "s3://adapters/team/good"]  # fmt: skip
    process = ServerProcess(args, work / "server.log", env=env)
    yield process, cache
    process.stop()


def greedy(client: Client, adapter_id: str) -> list[int]:
    reply = client.generate(PROMPT, adapter=adapter_id, max_new_tokens=8, temperature=0.0)
    return list(reply.token_ids)


def test_remote_adapters_are_served_as_their_local_copy(
    server: tuple[ServerProcess, Path], http_root: str
) -> None:
    process, cache = server
    remote = (f"{HUB_REPO}", f"{HUB_REPO}@main", f"{http_root}/good", "s3://adapters/team/good")
    with Client(process.target, timeout=120) as client:
        preloaded = {a.adapter_id for a in client.list_adapters() if a.resident}
        assert "s3://adapters/team/good" in preloaded  # --preload-adapters fetched it at start
        local = greedy(client, "local")
        assert local != greedy(client, "")
        for adapter_id in remote:
            assert greedy(client, adapter_id) == local, adapter_id
        listed = {a.adapter_id for a in client.list_adapters() if a.resident}
        assert set(remote) <= listed
        for adapter_id in listed:  # every id the server lists can be requested
            assert greedy(client, adapter_id) == local
        client.load_adapter(f"{http_root}/good")  # a load fetches the files again
    assert len(cached_entries(cache)) == len(remote)


def test_bad_sources_get_their_status_and_leave_nothing(
    server: tuple[ServerProcess, Path], http_root: str
) -> None:
    process, cache = server
    before = cached_entries(cache)
    expected = {
        "ftp://127.0.0.1/x": client_errors.InvalidArgument,
        "https://elsewhere.example/x": client_errors.PermissionDenied,
        f"{http_root}/missing": client_errors.NotFound,
        f"{http_root}/liar": client_errors.FailedPrecondition,
        "acme/not-in-the-cache": client_errors.Unavailable,  # offline, no cached copy
    }
    with Client(process.target, timeout=120) as client:
        for adapter_id, error in expected.items():
            with pytest.raises(error):
                greedy(client, adapter_id)
        assert len(greedy(client, "local")) == 8  # and the server keeps serving
    assert cached_entries(cache) == before
