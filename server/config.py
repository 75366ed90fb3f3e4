"""Typed per-command configs and the bridge that fills them from flags, LORAPLEX_* and TOML.

Precedence, highest first: command-line flags, environment variables, the config file
(`--config` or $LORAPLEX_CONFIG, the table named after the command), then defaults.
"""

from __future__ import annotations

import argparse
import os
import types
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_MODEL = "gemma3-270m"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache" / "loraplex")


class CommandConfig(BaseSettings):
    """Base of every command's config: LORAPLEX_* variables and an optional TOML file."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid")
    toml_table: ClassVar[str] = ""

    config: Path | None = Field(
        default=None, description="TOML config file; its [<command>] table supplies defaults"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        assert isinstance(init_settings, InitSettingsSource)
        config_file = init_settings.init_kwargs.get("config") or os.environ.get("LORAPLEX_CONFIG")
        if not config_file:
            return (init_settings, env_settings)
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        header = (cls.toml_table,) if cls.toml_table else None
        toml = TomlConfigSettingsSource(settings_cls, Path(config_file), toml_table_header=header)
        return (init_settings, env_settings, toml)


class ModelConfig(CommandConfig):
    """Which base model, and where converted files are cached."""

    toml_table: ClassVar[str] = "model"

    model: str = Field(
        default=DEFAULT_MODEL,
        description=f"base model: {DEFAULT_MODEL!r} (default), a .gguf file, a transformers "
        "checkpoint directory, or a hub id",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="where models are assembled and converted "
        "($LORAPLEX_CACHE, else ~/.cache/loraplex)",
    )


ConfigT = TypeVar("ConfigT", bound=CommandConfig)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _add_field(parser: argparse.ArgumentParser, name: str, info: FieldInfo) -> None:
    annotation = _unwrap_optional(info.annotation)
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": info.description}
    default = info.get_default(call_default_factory=True)
    if default not in (None, "", [], ()):
        kwargs["help"] = f"{info.description} (default: {default})"
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(annotation) is list:
        kwargs["action"] = "append"
        kwargs["metavar"] = name.upper().removesuffix("S")
    elif get_origin(annotation) is Literal:
        kwargs["choices"] = list(get_args(annotation))
    else:
        kwargs["metavar"] = name.upper()
    parser.add_argument(_flag(name), **kwargs)


def add_config_arguments(
    parser: argparse.ArgumentParser, config_cls: type[CommandConfig], positional: str | None = None
) -> None:
    """Add one flag per config field; `positional` also accepts that field as an argument."""
    for name, info in config_cls.model_fields.items():
        if name == positional:
            parser.add_argument(
                name,
                nargs="?",
                default=argparse.SUPPRESS,
                metavar=name.upper(),
                help=info.description,
            )
            continue
        _add_field(parser, name, info)


def config_from_args(config_cls: type[ConfigT], args: argparse.Namespace) -> ConfigT:
    """Build the command's config; flags given on the command line win over every other source."""
    given = {k: v for k, v in vars(args).items() if k in config_cls.model_fields}
    try:
        return config_cls(**given)
    except ValidationError as err:
        problems = "; ".join(
            f"{_flag(str(e['loc'][0])) if e['loc'] else 'config'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(problems) from None


class ConfigError(ValueError):
    """A flag, variable or config-file value is invalid."""
