"""``circot demo``: composed retrieval with visible reasoning on a small generated gallery, offline."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_command(
        workdir: Path = typer.Option(
            None,
            "--workdir",
            help="Where the demo gallery, index and report go; default ~/.cache/circot/demo.",
        ),
        model: str = typer.Option(
            None, "--model", help="Model folder or hub id; default: the shipped shapes model."
        ),
        queries: int = typer.Option(6, "--queries", min=1, help="Number of composed queries to run."),
        k: int = typer.Option(5, "--k", min=1, help="Results shown per query."),
        mode: str = typer.Option("full", "--mode", help="full: reason then embed; fast: embed directly."),
        report: Path = typer.Option(
            None, "--report", help="HTML report path; default <workdir>/report.html."
        ),
        device: str = typer.Option("cpu", "--device", help="Torch device."),
        threads: int = typer.Option(
            1,
            "--threads",
            min=0,
            help="CPU threads for torch (0: torch's default); one is plenty for the tiny model.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Run a handful of composed queries on a small shapes gallery and show the reasoning behind each result."""
        from circot.demo import format_demo, run_demo
        from circot.errors import CircotError
        from circot.search import MODES

        if mode not in MODES:
            raise CircotError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        if threads:
            import torch

            torch.set_num_threads(threads)
        result = run_demo(
            workdir, model=model, n_queries=queries, k=k, mode=mode, report=report, device=device
        )
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=1))
        else:
            typer.echo(format_demo(result))
