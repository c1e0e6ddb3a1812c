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
COMMAND_MODULES = [
    "demo",
    "data",
    "score",
    "submit",
    "eval",
    "train",
    "index",
    "search",
    "serve",
    "annotate",
    "export",
]


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock", "faiss", "milvus_lite"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"circot.cli.{_name}")
    except ModuleNotFoundError as exc:  # only our own missing command module is tolerated
        if exc.name != f"circot.cli.{_name}":
            raise
        continue
    _module.register(app)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(ClickException types, Abort types)`` of every click that typer may raise from.

    Typer bundles its own copy of click (``typer._click``) whose exceptions are not subclasses of the
    installed ``click``'s; older typers raise the installed one's. Both are caught.
    """
    errors: list[type] = []
    aborts: list[type] = []
    for name in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, found in (("ClickException", errors), ("Abort", aborts)):
            cls = getattr(module, attr, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(errors), tuple(aborts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``circot`` script.

    Usage errors print typer's usage message and exit 2; a :class:`CircotError` prints one ``error:`` line.
    """
    click_errors, aborts = _click_exception_types()
    try:
        rc = app(args=argv, prog_name="circot", standalone_mode=False)
    except CircotError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as exc:  # typer/click exits for --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click_errors as exc:  # usage errors: missing option, unknown flag or command, bad value
        exc.show()  # type: ignore[attr-defined]
        return int(getattr(exc, "exit_code", 2))
    except aborts:
        typer.echo("aborted", err=True)
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
