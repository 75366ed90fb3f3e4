"""The fleet end to end, in one Ray session: run by tests/test_fleet.py inside a loopback-only
network namespace (Serve's gRPC proxy listens on every interface), writing what it saw as
JSON for the tests to judge.

    python tests/fleet_scenario.py OUT.json MODEL_DIR ADAPTER_ROOT

1. Two replicas with bearer tokens: tokens checked by the replicas; the same greedy tokens
   through the fleet as from a replica's server directly; streaming; errors keep their
   status; adapter commands reach every replica; ListAdapters merges the replicas'. The
   same over the OpenAI HTTP API with the official client.
2. The Zipf placement trace (the fleet has room for every adapter) and a full holder,
   routed by adapter affinity (bench code).
3. The same trace with Ray's stock router.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from openai import APIStatusError, APITimeoutError, OpenAI

from loraplex.bench.fleet_bench import PROXY, full_holder, placement, resident
from loraplex.clients import Client
from loraplex.clients.errors import LoraplexClientError
from loraplex.clients.security import Security
from loraplex.server.auth import parse_tokens
from loraplex.server.fleet import app
from loraplex.server.fleet.registry import Registry, ReplicaAddress

GENERATE_TOKEN = "generate-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
TRACE = 800  # requests in the placement trace
HTTP_PORT = 8000  # free: the scenario runs in a network namespace of its own


def error_name(call: Any) -> str:
    try:
        call()
    except LoraplexClientError as err:
        return type(err).__name__
    return "none"


def checks(config: app.FleetConfig) -> dict[str, Any]:
    targets = [r.grpc for r in Registry.named(config.registry).replicas().values()]
    seen: dict[str, Any] = {"replicas": len(targets)}
    with Client(PROXY, timeout=120) as anonymous:
        seen["no_token"] = error_name(lambda: anonymous.generate("Hi", max_new_tokens=2))
    user = Client(PROXY, timeout=120, security=Security(token=GENERATE_TOKEN))
    admin = Client(PROXY, timeout=120, security=Security(token=ADMIN_TOKEN))
    fleet = user.generate("Hello there", adapter="a00", max_new_tokens=8)
    holder = next(t for t in targets if "a00" in resident(t))
    with Client(holder, timeout=120) as direct:
        alone = direct.generate("Hello there", adapter="a00", max_new_tokens=8)
        seen["same_tokenize"] = user.tokenize("Hello there") == direct.tokenize("Hello there")
        seen["same_info"] = user.server_info() == direct.server_info()
    seen["same_tokens"] = fleet.token_ids == alone.token_ids
    streamed = list(user.stream("Hello there", adapter="a00", max_new_tokens=8))
    seen["stream_same"] = [t for c in streamed for t in c.token_ids] == alone.token_ids
    seen["base_tokens"] = len(user.generate("Hello", max_new_tokens=3).token_ids)
    seen["unknown_adapter"] = error_name(lambda: user.generate("Hi", adapter="nope"))
    seen["load_as_user"] = error_name(lambda: user.load_adapter("a05"))
    admin.load_adapter("a05")
    seen["loaded_on"] = sum("a05" in resident(t) for t in targets)
    listed = {a.adapter_id: a for a in admin.list_adapters()}
    seen["listed_resident"] = sorted(i for i, a in listed.items() if a.resident)
    admin.unload_adapter("a05")
    seen["after_unload_on"] = sum("a05" in resident(t) for t in targets)
    user.close()
    admin.close()
    seen.update(http_checks(Registry.named(config.registry).replicas()))
    return seen


def http_checks(replicas: dict[str, ReplicaAddress]) -> dict[str, Any]:
    """The OpenAI API through Serve's HTTP proxy, with the official client."""
    fleet_url = f"http://127.0.0.1:{HTTP_PORT}/v1"
    user = OpenAI(base_url=fleet_url, api_key=GENERATE_TOKEN, max_retries=0)
    admin = OpenAI(base_url=fleet_url, api_key=ADMIN_TOKEN, max_retries=0)
    seen: dict[str, Any] = {}
    asked = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0.0}
    fleet = user.completions.create(model="a07", **asked)  # type: ignore[call-overload]
    holders = [r for r in replicas.values() if "a07" in resident(r.grpc)]
    seen["http_a07_holders"] = len(holders)
    direct = OpenAI(base_url=f"{holders[0].http}/v1", api_key="unused", max_retries=0)
    seen["http_same_text"] = (
        fleet.choices[0].text == direct.completions.create(model="a07", **asked).choices[0].text
    )  # type: ignore[call-overload]
    streamed = user.completions.create(model="a07", stream=True, **asked)  # type: ignore[call-overload]
    seen["http_stream_same"] = "".join(c.choices[0].text for c in streamed if c.choices) == (
        fleet.choices[0].text
    )
    seen["http_a07_holders_after"] = sum("a07" in resident(r.grpc) for r in replicas.values())
    # the tiny model's tokenizer has no chat template: the server's 400 comes back as it is
    seen["http_chat"] = http_error(lambda: user.chat.completions.create(
        model="a07", messages=[{"role": "user", "content": "Hi"}], max_tokens=4))  # fmt: skip
    seen["http_models"] = sorted(m.id for m in user.models.list())
    seen["http_no_token"] = http_error(lambda: OpenAI(base_url=fleet_url, api_key="wrong",
                                       max_retries=0).models.list())  # fmt: skip
    seen["http_unknown_adapter"] = http_error(
        lambda: user.completions.create(model="nope", prompt="Hi", max_tokens=2)
    )
    load = {"lora_name": "a06"}
    seen["http_load_as_user"] = http_error(lambda: user.post("/load_lora_adapter", body=load,
                                                             cast_to=object))  # fmt: skip
    admin.post("/load_lora_adapter", body=load, cast_to=object)
    seen["http_loaded_on"] = sum("a06" in resident(r.grpc) for r in replicas.values())
    admin.post("/unload_lora_adapter", body=load, cast_to=object)
    seen["http_after_unload_on"] = sum("a06" in resident(r.grpc) for r in replicas.values())
    seen["http_burst_answered"] = http_burst(fleet_url)
    return seen


def http_burst(fleet_url: str, requests: int = 48, deadline_s: float = 90) -> int:
    """Three times as many requests at once as the fleet has Serve slots (2 x 8), on all 16
    adapters: how many are answered within the deadline, a 503 retried after its
    Retry-After as the openai SDK retries it."""
    client = OpenAI(base_url=fleet_url, api_key=GENERATE_TOKEN, max_retries=0, timeout=30)
    end = time.monotonic() + deadline_s

    def ask(i: int) -> bool:
        while time.monotonic() < end:
            try:
                client.completions.create(model=f"a{i % 16:02d}", prompt="Hi", max_tokens=4)
                return True
            except APIStatusError as err:
                if err.status_code != 503:
                    return False
                time.sleep(float(err.response.headers.get("retry-after", "1")))
            except APITimeoutError:
                return False
        return False

    with ThreadPoolExecutor(max_workers=requests) as pool:
        return sum(pool.map(ask, range(requests)))


def http_error(call: Any) -> int:
    try:
        call()
    except APIStatusError as err:
        return err.status_code
    return 200


def main(out: Path, model: str, root: Path) -> None:
    adapters = sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
    serve_args = ["--model", model, "--quantization", "fp32", "--adapter-roots", str(root),
                  "--log-level", "warning"]  # fmt: skip
    tokens = parse_tokens(f"generate {GENERATE_TOKEN}\nadmin {ADMIN_TOKEN}\n", "scenario")
    config = app.FleetConfig(replicas=2, max_resident_adapters=8, max_batch_sequences=4,
                             max_queue=4, serve_args=serve_args, replica_cpus=1,
                             tokens=tokens, http_port=HTTP_PORT,
                             registry="scenario-checks")  # fmt: skip
    results: dict[str, Any] = {}
    app.start(config, num_cpus=2)
    try:
        results["checks"] = checks(config)
        affinity = replace(config, tokens={}, registry="scenario-affinity")
        app.deploy(affinity)
        results["affinity"] = placement(affinity, adapters, requests=TRACE, seed=0)
        results["full_holder"] = full_holder(affinity, adapters[-1], adapters[-2])
        stock = replace(affinity, router="ray", registry="scenario-stock")
        app.deploy(stock)
        results["stock"] = placement(stock, adapters, requests=TRACE, seed=0)
    finally:
        app.stop(config)
    out.write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
