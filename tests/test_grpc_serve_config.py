"""`loraplex serve`: its settings (flags win over LORAPLEX_* variables, which win over the TOML
file) and the warm-up before it serves."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_engine import FakeEngine

from loraplex.server.cli import build_parser
from loraplex.server.config import ConfigError, config_from_args
from loraplex.server.serve import ServeConfig, adapter_roots, scheduler_limits, warm_up


def parse(argv: list[str]) -> ServeConfig:
    return config_from_args(ServeConfig, build_parser().parse_args(["serve", *argv]))


def test_precedence_flags_env_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "loraplex.toml"
    toml.write_text(
        "[serve]\nport = 7000\nmax_queue = 5\nmax_batch_sequences = 3\n"
        'preload_adapters = ["a", "b"]\n'
    )
    monkeypatch.setenv("LORAPLEX_MAX_QUEUE", "9")
    monkeypatch.setenv("LORAPLEX_MAX_BATCH_SEQUENCES", "4")
    config = parse(["--config", str(toml), "--max-batch-sequences", "6", "--pinned-adapters", "p"])
    assert config.port == 7000  # file
    assert config.max_queue == 9  # variable over file
    assert config.max_batch_sequences == 6  # flag over variable
    assert config.preload_adapters == ["a", "b"] and config.pinned_adapters == ["p"]


def test_repeated_list_flags_and_roots(tmp_path: Path) -> None:
    config = parse(["--adapter-roots", str(tmp_path / "x"), "--adapter-roots", str(tmp_path / "y")])
    assert adapter_roots(config)[:2] == [tmp_path / "x", tmp_path / "y"]
    default = parse(["--cache-dir", str(tmp_path)])
    assert adapter_roots(default)[0] == tmp_path / "adapters"


def test_scheduler_limits_come_from_the_settings() -> None:
    limits = scheduler_limits(parse(["--prefill-steps-per-round", "3", "--max-skips", "5"]))
    assert (limits.prefill_steps_per_round, limits.max_skips) == (3, 5)
    assert scheduler_limits(parse([])).prefill_steps_per_round == 2


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-batch-sequences", "0"], "--max-batch-sequences"),
        (["--port", "70000"], "--port"),
        (["--prefill-steps-per-round", "0"], "--prefill-steps-per-round"),
        (["--quantization", "int3"], None),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], flag: str | None) -> None:
    if flag is None:
        with pytest.raises(SystemExit):
            parse(argv)
        return
    with pytest.raises(ConfigError, match=flag):
        parse(argv)


def test_serve_help_describes_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for name in ServeConfig.model_fields:
        assert "--" + name.replace("_", "-") in text


def test_a_port_in_use_is_a_config_error_naming_the_flag() -> None:
    import socket

    from fake_engine import FakeAdapters, FakeEngine

    from loraplex.server.serve import start

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, settings in (
            ("--port", {"port": port}),
            ("--metrics-port", {"metrics_port": port}),
        ):
            config = ServeConfig(**{"port": 0, "metrics_port": 0, **settings})  # type: ignore[arg-type]
            with pytest.raises(ConfigError, match=flag):
                start(config, FakeEngine(), FakeAdapters(known=set()))


def test_the_warm_up_prefills_and_decodes_once_and_leaves_nothing_running() -> None:
    engine = FakeEngine()
    warm_up(engine)
    assert [(len(p.prefill), len(p.decode)) for p in engine.plans] == [(1, 0), (0, 1)]
    assert engine.running() == []


def test_the_warm_up_skips_the_decode_when_the_first_token_ends_it() -> None:
    engine = FakeEngine(eos_after=0)
    warm_up(engine)
    assert [(len(p.prefill), len(p.decode)) for p in engine.plans] == [(1, 0)]
    assert engine.running() == []
