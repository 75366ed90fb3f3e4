"""`loraplex serve`: build the engine, adapter store, scheduler and gRPC server, then run
until SIGTERM or SIGINT, and drain: stop admitting, finish in-flight requests within the
grace period, exit 0."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import Field

from loraplex.server.auth import BearerAuth, Role, load_tokens
from loraplex.server.config import (
    ConfigError,
    ModelConfig,
    add_config_arguments,
    config_from_args,
)
from loraplex.server.convert import ChatTemplating
from loraplex.server.engine.api import (
    AdapterAdmin,
    Engine,
    SamplingParams,
    SequenceRequest,
    StepPlan,
)
from loraplex.server.frontend import Frontend, ServerDescription
from loraplex.server.gc_pauses import freeze_startup_objects
from loraplex.server.metrics import Metrics
from loraplex.server.scheduler import Scheduler, SchedulerLimits
from loraplex.server.service import SERVICE_NAME, LoraplexService
from loraplex.server.tls import server_credentials

if TYPE_CHECKING:
    from loraplex.adapters.sources import AdapterSources
    from loraplex.adapters.store import AdapterStore
    from loraplex.server.engine.gguf import GGUFEngine
    from loraplex.server.engine.hf import HFEngine
    from loraplex.server.http_server import HttpServer

log = logging.getLogger("loraplex.serve")
WARM_UP_ID = "warm-up"
WARM_UP_PROMPT = "Before serving, the server runs this prompt once through the base model."
PACKAGED_ADAPTERS = Path(__file__).resolve().parent.parent / "adapters" / "trainer" / "defaults"
ADMIN_WORKERS = 8  # gRPC threads kept free for admin, info and health calls


class ServeConfig(ModelConfig):
    """Everything `loraplex serve` needs; flags > LORAPLEX_* > the [serve] table of --config."""

    toml_table: ClassVar[str] = "serve"

    backend: Literal["auto", "hf", "gguf"] = Field(
        default="auto",
        description="hf: transformers (+ bitsandbytes); gguf: llama.cpp; auto: gguf for a "
        ".gguf file, hf otherwise (the default model included)",
    )
    quantization: Literal["nf4", "int8", "bf16", "fp32"] = Field(
        default="nf4", description="resident base weights (hf backend; a GGUF file keeps its own)"
    )
    device: str = Field(default="auto", description="torch device; auto picks CUDA when present")
    adapter_mode: Literal["batched", "merged", "auto"] = Field(
        default="auto",
        description="batched: per-row adapter deltas; merged: W+s·BA while one adapter owns "
        "the batch; auto: the engine decides",
    )
    output_head: Literal["auto", "full", "int8"] = Field(
        default="auto",
        description="full: the model's own output projection, exact; int8: several times faster "
        "on the CPU for large vocabularies, and greedy tokens may then differ from full on near "
        "ties; auto: int8 where it times faster than full at start (hf backend)",
    )
    nf4_kernel: Literal["auto", "fused", "dequantize"] = Field(
        default="auto",
        description="4-bit matmul on CPUs with AVX512-BF16: auto (dequantize for prompts, "
        "loraplex's NF4 kernel for decode steps, built at first use), dequantize (for both), "
        "fused (bitsandbytes' repacked row-by-row kernel: slower prefill)",
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    decode_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads for decode steps (hf backend); default: --threads",
    )
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description="directories holding PEFT adapter folders; an adapter's id is its folder "
        "name (default: <cache-dir>/adapters, plus the packaged default adapters)",
    )
    preload_adapters: list[str] = Field(
        default_factory=list,
        description="adapter ids loaded at start (default: every packaged default adapter)",
    )
    pinned_adapters: list[str] = Field(
        default_factory=list, description="adapter ids loaded at start and never evicted"
    )
    adapter_sources: list[str] = Field(
        default_factory=lambda: ["local"],
        description="where adapters may come from besides the adapter roots: 'hf' (hub ids "
        "org/name[@revision]; HF_TOKEN and HF_HUB_OFFLINE honoured) and URL prefixes "
        "(https://host/adapters/, s3://bucket/; S3 credentials and AWS_ENDPOINT_URL as "
        "botocore finds them); default: local only",
    )
    adapter_cache: Path | None = Field(
        default=None,
        description="where downloaded adapters are kept (default: <cache-dir>/adapter-downloads)",
    )
    max_adapter_download_bytes: int = Field(
        default=1 << 30, ge=1, description="largest adapter file a source may send"
    )
    max_resident_adapters: int = Field(default=64, ge=1, description="adapters kept loaded")
    max_resident_bytes: int = Field(default=4 << 30, ge=1, description="adapter bytes kept loaded")
    max_lora_rank: int = Field(default=64, ge=1, description="largest adapter rank accepted")
    max_context: int | None = Field(default=None, ge=8, description="context limit (tokens)")
    host: str = Field(default="127.0.0.1", description="address the gRPC server binds")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    chat_template: Path | None = Field(
        default=None,
        description="a Jinja chat template for /v1/chat/completions, for a model that has "
        "none or to replace its own (default: the model's; Gemma 3's for the default model, "
        "whose GGUF file carries none)",
    )
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="also serve the OpenAI-compatible HTTP API on --host at this port "
        "(0: pick a free one; default: no HTTP)",
    )
    metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Prometheus /metrics port (0: pick a free one)"
    )
    metrics: bool = Field(default=True, description="serve Prometheus metrics")
    metrics_host: str = Field(
        default="127.0.0.1", description="address the metrics endpoint binds (apart from --host)"
    )
    auth_tokens_file: Path | None = Field(
        default=None,
        description="file of 'admin TOKEN' / 'generate TOKEN' lines; with it (or "
        "$LORAPLEX_AUTH_TOKENS) every call but health checks needs a bearer token",
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain: serve TLS")
    tls_key: Path | None = Field(default=None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA: require client certificates it signed (mutual TLS)"
    )
    max_message_bytes: int = Field(
        default=4 << 20, ge=1024, description="largest request message accepted (bytes)"
    )
    max_prompt_chars: int = Field(
        default=1 << 20, ge=1, description="longest prompt accepted, checked before tokenizing"
    )
    max_batch_sequences: int = Field(default=16, ge=1, description="sequences per engine step")
    max_batch_tokens: int = Field(
        default=2048,
        ge=1,
        description="prompt tokens per prefill step, less one per running sequence",
    )
    max_adapters_per_step: int = Field(
        default=8, ge=1, description="distinct adapters per engine step"
    )
    max_queue: int = Field(default=64, ge=0, description="requests waiting for admission")
    max_skips: int = Field(
        default=8, ge=1, description="steps a skipped request waits before it blocks the queue"
    )
    prefill_steps_per_round: int = Field(
        default=2,
        ge=1,
        description="prefill steps between two decode steps, at most: more lowers time to "
        "first token in bursts, and the running sequences wait longer for their next token",
    )
    max_new_tokens_limit: int = Field(default=4096, ge=1, description="largest max_new_tokens")
    max_adapter_labels: int = Field(
        default=32, ge=0, description="adapters with their own metric label; others: 'other'"
    )
    grace_period: float = Field(
        default=30.0, ge=0, description="seconds SIGTERM waits for in-flight requests"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log level"
    )


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the gRPC server on a base model",
        description="Serve a quantized base model and many LoRA/VeRA adapters over gRPC "
        "(loraplex.v1, plus grpc.health.v1 and server reflection), with Prometheus metrics on "
        "their own port. SIGTERM drains in-flight requests, then exits 0.",
    )
    add_config_arguments(parser, ServeConfig)
    parser.set_defaults(run=lambda args: serve(config_from_args(ServeConfig, args)))


def offers_packaged_adapters(config: ServeConfig) -> bool:
    """The shipped adapters were trained on the default base and fit no other model."""
    from loraplex.server.models import DEFAULT_ALIASES

    return config.model in DEFAULT_ALIASES and PACKAGED_ADAPTERS.is_dir()


def adapter_roots(config: ServeConfig) -> list[Path]:
    roots = list(config.adapter_roots) or [config.cache_dir / "adapters"]
    if offers_packaged_adapters(config):
        roots.append(PACKAGED_ADAPTERS)
    return roots


def adapter_sources(config: ServeConfig) -> AdapterSources:
    from loraplex.adapters.sources import AdapterSources, parse_allowed

    try:
        allowed = parse_allowed(config.adapter_sources)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cache = config.adapter_cache or config.cache_dir / "adapter-downloads"
    return AdapterSources(adapter_roots(config), cache, allowed, config.max_adapter_download_bytes)


def packaged_adapter_ids(config: ServeConfig) -> list[str]:
    if not offers_packaged_adapters(config):
        return []
    return sorted(p.parent.name for p in PACKAGED_ADAPTERS.glob("*/adapter_config.json"))


def build_engine(config: ServeConfig) -> HFEngine:
    from loraplex.server import models
    from loraplex.server.engine.config import EngineConfig
    from loraplex.server.engine.hf import HFEngine

    source = models.resolve(config.model, config.cache_dir)
    engine_config = EngineConfig(
        checkpoint=models.hf_checkpoint(source, config.cache_dir),
        quantization=config.quantization,
        device=config.device,
        adapter_mode=config.adapter_mode,
        output_head=config.output_head,
        nf4_kernel=config.nf4_kernel,
        threads=config.threads,
        decode_threads=config.decode_threads,
        max_lora_rank=config.max_lora_rank,
        adapter_slots=config.max_adapters_per_step,
        max_batch_size=config.max_batch_sequences,
        max_context=config.max_context,
        adapter_roots=adapter_roots(config),
        max_resident_adapters=config.max_resident_adapters,
        max_resident_bytes=config.max_resident_bytes,
    )
    return HFEngine.from_config(engine_config)


def pick_backend(config: ServeConfig) -> Literal["hf", "gguf"]:
    if config.backend != "auto":
        return config.backend
    from loraplex.server.models import DEFAULT_ALIASES

    is_file = config.model not in DEFAULT_ALIASES and config.model.endswith(".gguf")
    return "gguf" if is_file else "hf"


def build_backend(config: ServeConfig) -> tuple[Engine, AdapterStore, ChatTemplating | None]:
    """The engine, its adapter store, and chat templating when the tokenizer has a template."""
    from loraplex.server.chat_template import chosen_template
    from loraplex.server.models import DEFAULT_ALIASES

    is_default = config.model in DEFAULT_ALIASES
    if pick_backend(config) == "gguf":
        from loraplex.server import models
        from loraplex.server.chat_template import gguf_chat

        engine, store = build_gguf(config)
        path = models.resolve(config.model, config.cache_dir).path
        chat = gguf_chat(path, engine.encode, config.chat_template, is_default)
        return engine, store, chat
    hf = build_engine(config)
    template = chosen_template(hf.tokenizer.chat_template, config.chat_template, is_default)
    hf.tokenizer.chat_template = template
    return hf, hf.store, TokenizerChat(hf.tokenizer) if template else None


def build_gguf(config: ServeConfig) -> tuple[GGUFEngine, AdapterStore]:
    from loraplex.server import models
    from loraplex.server.engine.gguf_runtime import RuntimeConfig
    from loraplex.server.engine.gguf_serving import AdapterLimits, build_gguf_backend

    source = models.resolve(config.model, config.cache_dir)
    if source.format != "gguf":
        raise ConfigError(f"--backend gguf needs a GGUF model file; {config.model} is not one")
    limits = AdapterLimits(adapter_roots(config), config.max_lora_rank,
                           config.max_resident_adapters, config.max_resident_bytes)  # fmt: skip
    runtime = RuntimeConfig(
        n_ctx_per_seq=config.max_context or RuntimeConfig.n_ctx_per_seq,
        n_seq_max=config.max_batch_sequences,
        n_threads=config.threads,
    )
    return build_gguf_backend(source.path, source.sha256, limits, runtime, config.cache_dir)


def prepare_adapters(store: AdapterAdmin, config: ServeConfig, sources: AdapterSources) -> None:
    preload = config.preload_adapters or packaged_adapter_ids(config)
    if not preload and not config.pinned_adapters:
        roots = ", ".join(str(r) for r in adapter_roots(config))
        log.warning("no adapters preloaded; adapters under %s load on first use", roots)
    for adapter_id in dict.fromkeys([*preload, *config.pinned_adapters]):
        sources.fetch(adapter_id)
        info = store.load(adapter_id)
        log.info(
            "adapter %s v%d ready (%s, rank %d)",
            info.adapter_id, info.version, info.peft_type, info.rank,
        )  # fmt: skip
    for adapter_id in config.pinned_adapters:
        store.pin(adapter_id)


class TokenizerChat:
    """Chat prompts through the tokenizer's own template, as text the engine then encodes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # Templates start with the BOS token; drop it when encoding adds one anyway.
        probe = tokenizer.encode("a")
        bos_id = tokenizer.bos_token_id
        adds_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        self._strip = str(tokenizer.bos_token) if adds_bos else ""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        text = str(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
        return text.removeprefix(self._strip) if self._strip else text


@dataclass
class RunningServer:
    grpc_server: grpc.Server
    scheduler: Scheduler
    health: health.HealthServicer
    port: int
    metrics_port: int  # 0 when metrics are off
    stop_metrics: Callable[[], None]
    drain_requested: threading.Event
    http_server: HttpServer | None = None

    @property
    def http_port(self) -> int | None:
        """The OpenAI-compatible HTTP port; None when HTTP is off."""
        return None if self.http_server is None else self.http_server.port

    def drain(self, grace_s: float) -> bool:
        # Admission stops before health changes, so NOT_SERVING (and a 503 from the HTTP
        # /health, which reads the scheduler) means refusing.
        self.scheduler.stop_admitting()
        self.health.enter_graceful_shutdown()
        clean = self.scheduler.drain(grace_s)
        self.grpc_server.stop(grace=5).wait()
        if self.http_server is not None:
            self.http_server.stop()
        self.stop_metrics()
        return clean


def start(
    config: ServeConfig,
    engine: Engine,
    store: AdapterAdmin,
    chat: ChatTemplating | None = None,
    *,
    loop_thread: bool = True,
    sources: AdapterSources | None = None,
) -> RunningServer:
    """Start the gRPC server, the HTTP server (with --http-port) and the metrics endpoint
    around a built engine, and the scheduler's loop on a thread of its own unless
    `loop_thread` is False (then the caller runs `scheduler.run()`)."""
    metrics = Metrics(max_adapter_labels=config.max_adapter_labels)
    metrics.watch_adapters(store.list)
    metrics.watch_engine(engine.resources)
    store.events = metrics
    scheduler = Scheduler(engine, store, scheduler_limits(config), observer=metrics)
    metrics.watch_scheduler(scheduler.counts)
    metrics.watch_lora_requests(scheduler.adapters_in_flight, config.max_resident_adapters)
    health_servicer = _health()
    drain_requested = threading.Event()

    def request_drain() -> int:
        """Refuse new requests now; whoever runs the server then drains it."""
        scheduler.stop_admitting()
        health_servicer.enter_graceful_shutdown()
        drain_requested.set()
        return sum(scheduler.counts())

    description = describe(config, engine)
    frontend = Frontend(scheduler, engine, store, description, chat, metrics, sources)
    tokens = load_tokens(config.auth_tokens_file)
    service = LoraplexService(frontend, request_drain)
    server, port = _grpc_server(config, service, health_servicer, tokens)
    if loop_thread:
        scheduler.start()
    http: HttpServer | None = None
    try:
        # gRPC health turns SERVING when the gRPC server starts, so every other front end
        # listens first: a client that waits for SERVING may then use any of them.
        http = _serve_http(config, frontend, tokens)
        metrics_port, stop_metrics = _serve_metrics(config, metrics)
    except ConfigError:
        server.stop(grace=0)
        if http is not None:
            http.stop()
        scheduler.stop()
        raise
    server.start()
    return RunningServer(
        server, scheduler, health_servicer, port, metrics_port, stop_metrics, drain_requested,
        http,
    )  # fmt: skip


def _serve_http(
    config: ServeConfig, frontend: Frontend, tokens: dict[str, Role]
) -> HttpServer | None:
    if config.http_port is None:
        return None
    from loraplex.server.http_server import TlsFiles, start_http
    from loraplex.server.openai_api import OpenAIApi, build_app

    api = OpenAIApi(frontend, adapter_roots(config))
    app = build_app(api, tokens, config.max_message_bytes)
    tls = TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
    return start_http(app, config.host, config.http_port, tls)


def scheduler_limits(config: ServeConfig) -> SchedulerLimits:
    return SchedulerLimits(
        max_batch_sequences=config.max_batch_sequences,
        max_batch_tokens=config.max_batch_tokens,
        max_adapters_per_step=config.max_adapters_per_step,
        max_queue=config.max_queue,
        max_skips=config.max_skips,
        prefill_steps_per_round=config.prefill_steps_per_round,
    )


def describe(config: ServeConfig, engine: Engine) -> ServerDescription:
    backend = pick_backend(config)
    return ServerDescription(
        model=config.model,
        backend=backend,
        quantization=_gguf_file_type(engine) if backend == "gguf" else config.quantization,
        max_new_tokens_limit=config.max_new_tokens_limit,
        version=version("loraplex"),
        max_prompt_chars=config.max_prompt_chars,
    )


def _gguf_file_type(engine: Engine) -> str:
    from loraplex.server.engine.gguf import GGUFEngine  # llama.cpp is an optional extra

    return engine.quantization if isinstance(engine, GGUFEngine) else "unknown"


def _serve_metrics(config: ServeConfig, metrics: Metrics) -> tuple[int, Callable[[], None]]:
    if not config.metrics:
        return 0, _noop
    try:
        return metrics.serve_http(config.metrics_port, config.metrics_host)
    except OSError as err:
        problem = f"cannot listen on {config.metrics_host}:{config.metrics_port} ({err})"
        raise ConfigError(f"--metrics-port: {problem}") from None


def _noop() -> None:
    return None


def _health() -> health.HealthServicer:
    servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def _grpc_server(
    config: ServeConfig,
    service: LoraplexService,
    health_servicer: health.HealthServicer,
    tokens: dict[str, Role],
) -> tuple[grpc.Server, int]:
    # Every request waiting or running holds a thread; past that, gRPC answers
    # RESOURCE_EXHAUSTED itself rather than queueing invisibly.
    workers = config.max_batch_sequences + config.max_queue + ADMIN_WORKERS
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        handlers=[service.handler()],
        interceptors=[BearerAuth(tokens)] if tokens else [],
        maximum_concurrent_rpcs=workers,
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    address = f"{config.host}:{config.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise ConfigError(f"--port: cannot listen on {config.host}:{config.port} ({err})") from None
    return server, port


def warm_up(engine: Engine) -> None:
    """One short base-model generation before serving: a process's first forward pass sets
    up allocations and kernels, which the first request would otherwise pay for."""
    started = time.perf_counter()
    prompt = engine.encode(WARM_UP_PROMPT)
    sampling = SamplingParams(max_new_tokens=2)
    events = engine.step(StepPlan(prefill=[SequenceRequest(WARM_UP_ID, prompt, sampling)]))
    if all(event.finish is None for event in events):
        engine.step(StepPlan(decode=[WARM_UP_ID]))
    engine.release(WARM_UP_ID)  # a no-op where its last token ended it
    log.info("warmed up in %.2f s", time.perf_counter() - started)


def serve(config: ServeConfig) -> int:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    engine, store, chat = build_backend(config)
    sources = adapter_sources(config)
    store.locate = sources.locate
    prepare_adapters(store, config, sources)
    warm_up(engine)
    log.info("%d start-up objects exempt from garbage collection", freeze_startup_objects())
    running = start(config, engine, store, chat, loop_thread=False, sources=sources)
    log.info(
        "serving %s on %s:%d (metrics on port %d)",
        config.model, config.host, running.port, running.metrics_port,
    )  # fmt: skip
    http = "" if running.http_port is None else f" (HTTP on port {running.http_port})"
    print(f"loraplex: serving on {config.host}:{running.port}{http}", file=sys.stderr, flush=True)
    drained: list[bool] = []
    drainer = threading.Thread(
        target=lambda: drained.append(_drain_when_asked(running, stop, config.grace_period)),
        name="drain",
        daemon=True,
    )
    drainer.start()
    # The loop runs on the thread that loaded and warmed up the engine, so the process keeps
    # one multi-threaded OpenMP pool: a second one makes every parallel region of a CPU
    # forward pay a thread wake-up.
    running.scheduler.run()
    drainer.join()
    engine.close()
    outcome = "all requests finished" if drained and drained[0] else "the grace period ran out"
    print(f"loraplex: stopped ({outcome})", file=sys.stderr, flush=True)
    return 0


def _drain_when_asked(running: RunningServer, stop: threading.Event, grace_s: float) -> bool:
    """Wait for a signal or a Drain call, then drain; the scheduler loop ends with it."""
    # A signal handler runs on the main thread, which runs the loop, so `stop` is set
    # between steps at the latest; the drain call sets drain_requested from a gRPC thread.
    while not stop.wait(timeout=0.5) and not running.drain_requested.is_set():
        pass
    log.info("draining: no new requests; waiting up to %.0fs", grace_s)
    return running.drain(grace_s)
