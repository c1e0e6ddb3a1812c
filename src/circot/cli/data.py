"""``circot data ...``: dataset commands (check; the shapes generator adds ``data shapes`` below)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from circot.errors import DataError

data_app = typer.Typer(help="Check and prepare datasets.", no_args_is_help=True)


@data_app.command("check")
def check(
    dataset: str = typer.Option(..., "--dataset", "-d", help="fashioniq, cirr, circo or shapes."),
    root: Path = typer.Option(..., "--root", "-r", help="Dataset root folder."),
    split: str | None = typer.Option(None, "--split", "-s", help="One split (default: every split)."),
    decode: bool = typer.Option(
        False, "--decode", help="Decode every image (slow); default decodes a sample."
    ),
    sample: int = typer.Option(
        50, "--sample", min=0, help="How many images per split to decode without --decode."
    ),
    skip_counts: bool = typer.Option(
        False, "--skip-counts", help="Do not compare counts with the official ones (custom subsets)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Report missing or undecodable images and expected vs found counts; exit non-zero when incomplete."""
    from circot.data.check import check_dataset

    report = check_dataset(
        dataset, root, split, decode=decode, sample=sample, official_counts=not skip_counts
    )
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    if not report.ok:
        raise DataError(report.summary())


# --- `circot data shapes` (generator of the shapes world) goes below this line. -------------------------------


@data_app.command("shapes")
def shapes(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (created; must be empty unless --overwrite)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="World seed: held-out combinations, scenes, texts, renderings."
    ),
    n_train: int = typer.Option(20000, "--n-train", help="Training queries."),
    n_val: int = typer.Option(1000, "--n-val", help="Validation queries."),
    n_test: int = typer.Option(1000, "--n-test", help="Test queries."),
    n_novel: int = typer.Option(1000, "--n-novel", help="test-novel queries (three held-out subsets)."),
    image_size: int = typer.Option(112, "--image-size", help="Image side in pixels."),
    workers: int = typer.Option(
        1, "--workers", min=1, help="Rendering processes (the output does not depend on it)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a shapes dataset already in --out."),
    distractors: int = typer.Option(0, "--distractors", help="Random edits of the reference per eval query."),
    intermediate_scenes: bool = typer.Option(
        False,
        "--intermediate-scenes",
        help="Two-step gold reasoning writes out the scene after the first step.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Generate the shapes world (images, annotations, dataset card), with a progress bar."""
    from circot.data.shapes import generate_report

    report = generate_report(
        out, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, n_novel=n_novel,
        image_size=image_size, workers=workers, overwrite=overwrite, progress=not as_json,
        distractors=distractors, intermediate_scenes=intermediate_scenes,
    )  # fmt: skip
    typer.echo(json.dumps(report, indent=2) if as_json else report["summary"])


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
