"""The ``tracekit`` command line. Every command's first docstring line is its help."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tracekit")
def main() -> None:
    """Record what a transformer does, token by token, and replay it anywhere."""
