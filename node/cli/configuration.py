"""`pacsnode config`: the settings file, written out (`example`) and checked (`check`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from node import config
from node.cli.common import load_settings
from node.config_docs import example_toml, settings_toml
from node.config_schema import Spec
from node.redact import MASK, redact_url

app = typer.Typer(help="The settings file: an example with every key, and a check.",
                  no_args_is_help=True)


@app.command("example")
def example() -> None:
    """Print a settings file with every key at its default and what it does."""
    typer.echo(example_toml(), nl=False)


def _shown(key: str, spec: Spec, value: Any) -> Any:
    """A value as `config check` prints it: no password."""
    if spec.secret and value:
        return MASK
    if key == "node.database_url":
        return redact_url(value)
    return value


@app.command("check")
def check(
    file: Annotated[Path | None, typer.Argument(
        envvar=config.ENV_CONFIG, show_default=False,
        help="TOML settings file (default: $PACSNODE_CONFIG, else the embedded defaults).")
    ] = None,
) -> None:
    """Check a settings file: print the settings in effect, or the problem (exit status 1)."""
    settings = load_settings(file)
    where = f"{settings.source} is valid" if settings.source else "no settings file: defaults"
    typer.echo(f"# {where}; the settings in effect:\n"
               f"# data directory {settings.data_dir}, storage {settings.storage_dir},\n"
               f"# database {redact_url(settings.database_url)}, node id {settings.node_id}\n")
    typer.echo(settings_toml(settings, _shown), nl=False)
