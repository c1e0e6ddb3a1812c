"""The ``circot`` command line.

Each command group lives in its own module of this package and exposes ``register(app)``; every command is
a thin wrapper over a library function. User errors (:class:`circot.errors.CircotError`) are printed as one
line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from circot.errors import CircotError

app = typer.Typer(
    name="circot",
    help="Composed image retrieval with explicit chain-of-thought: reason, then embed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules of this package that register commands, in help order. A module that is missing is skipped so
# that the command line works while the package grows.
COMMAND_MODULES = ["demo", "data", "score", "submit", "eval", "train", "index", "search", "serve", "annotate"]


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock", "faiss"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"circot.cli.{_name}")
    except ModuleNotFoundError as exc:  # only our own missing command module is tolerated
        if exc.name != f"circot.cli.{_name}":
            raise
        continue
    _module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``circot`` script."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except CircotError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as exc:  # typer/click exits for --help and usage errors
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
