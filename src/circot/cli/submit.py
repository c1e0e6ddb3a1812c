"""``circot submit validate``: check CIRR / CIRCO test-server files before uploading them."""

from __future__ import annotations

import json
from pathlib import Path

import typer

submit_app = typer.Typer(help="Test-server submission files (CIRR, CIRCO).", no_args_is_help=True)


@submit_app.command("validate")
def validate(
    files: list[Path] = typer.Argument(
        ..., help="Submission file(s): CIRR recall and/or recall_subset, or CIRCO."
    ),
    dataset: str = typer.Option(..., "--dataset", "-d", help="cirr or circo."),
    root: Path = typer.Option(..., "--root", "-r", help="Dataset root folder."),
    split: str | None = typer.Option(None, "--split", "-s", help="Split (default: cirr test1, circo test)."),
    as_json: bool = typer.Option(False, "--json", help="Print the reports as JSON."),
) -> None:
    """All query ids present, unique ids of the right length, reference absent (CIRR), CIRR file < 5 MB."""
    from circot.data import load_split
    from circot.errors import CircotError
    from circot.submission import DEFAULT_SPLITS, SUBMISSION_DATASETS, raise_for_reports, validate_files

    if dataset not in SUBMISSION_DATASETS:
        raise CircotError(f"no test server for {dataset!r}; choose one of: {', '.join(SUBMISSION_DATASETS)}")
    loaded = load_split(dataset, root, split or DEFAULT_SPLITS[dataset])
    reports = validate_files(loaded, files)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        for r in reports:
            typer.echo(r.line())
    raise_for_reports(reports)


def register(app: typer.Typer) -> None:
    app.add_typer(submit_app, name="submit")
