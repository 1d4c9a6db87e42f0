"""Options shared by several commands, and `--config FILE` (YAML or JSON) with flags taking precedence.

`--config` is eager: its callback runs before the other options are read and installs the file's
values as the command's default map, so any flag given on the command line still wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..errors import UsageError


def _load_config_file(ctx: typer.Context, param, value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    try:
        text = path.read_text()
    except OSError as error:
        raise typer.BadParameter(f"cannot read {path}: {error.strerror}") from None
    import yaml

    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise typer.BadParameter(f"{path}: unreadable ({str(error).splitlines()[0]})") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of option names to values")
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for key, setting in document.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in known or name == "config":
            raise typer.BadParameter(f"{path}: unknown setting {key!r}")
        defaults[name] = setting
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def config_option():
    return typer.Option(
        None,
        "--config",
        is_eager=True,
        callback=_load_config_file,
        help="YAML or JSON file of option values (names as the long flags); flags on the command line win.",
    )


def positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be positive, got {value}")
