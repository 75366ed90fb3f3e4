"""Flags beat LORAPLEX_* variables, which beat the TOML config file, which beats defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loraplex.server.config import (
    DEFAULT_MODEL,
    ConfigError,
    ModelConfig,
    add_config_arguments,
    config_from_args,
)


def _parse(argv: list[str]) -> ModelConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ModelConfig, positional="model")
    return config_from_args(ModelConfig, parser.parse_args(argv))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LORAPLEX_MODEL", "LORAPLEX_CONFIG", "LORAPLEX_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_apply_when_nothing_is_given() -> None:
    assert _parse([]).model == DEFAULT_MODEL


def test_precedence_is_flag_then_env_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file = tmp_path / "loraplex.toml"
    config_file.write_text('[model]\nmodel = "from-file.gguf"\ncache_dir = "/from/file"\n')
    assert _parse(["--config", str(config_file)]).model == "from-file.gguf"
    monkeypatch.setenv("LORAPLEX_MODEL", "from-env.gguf")
    config = _parse(["--config", str(config_file)])
    assert (config.model, config.cache_dir) == ("from-env.gguf", Path("/from/file"))
    assert _parse(["--config", str(config_file), "from-flag.gguf"]).model == "from-flag.gguf"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "loraplex.toml"
    config_file.write_text('[model]\nmodel = "env-file.gguf"\n')
    monkeypatch.setenv("LORAPLEX_CONFIG", str(config_file))
    assert _parse([]).model == "env-file.gguf"


def test_unknown_key_in_config_file_is_refused(tmp_path: Path) -> None:
    config_file = tmp_path / "loraplex.toml"
    config_file.write_text('[model]\nmodle = "typo"\n')
    with pytest.raises(ConfigError, match="modle"):
        _parse(["--config", str(config_file)])


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _parse(["--config", str(tmp_path / "absent.toml")])
