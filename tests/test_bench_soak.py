"""`loraplex bench soak`, shortened: a real tiny-model server under traffic and adapter churn
ends with every request served, every admin action done, and nothing held."""

from __future__ import annotations

import json
from pathlib import Path

from loraplex.bench.soak_bench import main


def test_a_short_soak_serves_everything_and_leaks_nothing(
    tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "soak"
    results = main([
        "--model", str(tiny_checkpoints["llama"]), "--serve-args", "--quantization fp32",
        "--minutes", "0.4", "--admin-every", "1", "--adapters", "4", "--resident", "2",
        "--concurrency", "3", "--prompt-tokens", "2,6", "--output-tokens", "2,5",
        "--out", str(out), "--no-progress",
    ])  # fmt: skip
    requests, admin = results["requests"], results["admin"]
    assert requests["served"] > 20 and requests["failed"] == 0, requests["statuses"]
    assert admin["actions"] >= 6 and admin["failed"] == 0, admin["log"]
    assert {a["action"] for a in admin["log"]} == {"unload", "load", "replace"}
    replaced = [a for a in admin["log"] if a["action"] == "replace"]
    assert all(a["version"] > 1 for a in replaced)  # a replacement is served as a new version
    assert set(results["leaks"]) >= {"running", "waiting", "adapters_in_use", "sequences"}
    assert set(results["leaks"].values()) == {0}
    assert len(results["rss_mib"]) == 4 and results["rss_mib"]["peak"] > 0
    assert json.loads((out / "results.json").read_text())["requests"] == requests
    assert "requests failed | 0 | 0 | met" in (out / "summary.md").read_text()
    assert (out / "rss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
