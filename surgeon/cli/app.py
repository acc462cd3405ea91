"""The ``surgeon`` command line: a typer app over the Python API, one module per command.

Command modules import the API inside the command, so ``surgeon --help`` starts without loading torch models,
timm or the Hub client.
"""

from __future__ import annotations

import typer

from surgeon.cli import (
    adapt_command,
    convert_command,
    demo_command,
    export_command,
    merge_command,
    plan_command,
    push_command,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert pretrained vision models into quadratic-adapter, low-activation-memory networks.")


def _show_version(value: bool) -> None:
    if value:
        from surgeon.version import __version__

        typer.echo(f"surgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Show surgeon's version and exit.")) -> None:
    """Convert pretrained vision models into quadratic-adapter, low-activation-memory networks."""


app.command("plan")(plan_command.plan)
app.command("convert")(convert_command.convert)
app.command("adapt")(adapt_command.adapt)
app.command("merge")(merge_command.merge)
app.command("export")(export_command.export)
app.command("push")(push_command.push)
app.command("demo")(demo_command.demo)


def main() -> None:
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # retries and cache notes would bury the one-line error
    app()


if __name__ == "__main__":
    main()
