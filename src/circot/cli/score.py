"""``circot score``: official metrics of a predictions file in the test-server format."""

from __future__ import annotations

from pathlib import Path

import typer


def score(
    dataset: str = typer.Option(..., "--dataset", "-d", help="fashioniq, cirr, circo or shapes."),
    root: Path = typer.Option(..., "--root", "-r", help="Dataset root folder."),
    split: str = typer.Option(..., "--split", "-s", help="A split with ground truth (e.g. val)."),
    predictions: list[Path] = typer.Option(
        ...,
        "--predictions",
        "-p",
        help="Predictions file(s), several after one flag (--predictions RECALL SUBSET) or the flag repeated; "
        "CIRR: recall file and optionally recall_subset.",
    ),
    more_predictions: list[Path] = typer.Argument(
        None, hidden=True, help="Further predictions files given after --predictions."
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the metrics (percentages) to this file."
    ),
) -> None:
    """Score predictions: CIRR recall(+recall_subset) files, the CIRCO ids file, FashionIQ/shapes JSON rankings."""
    from circot.data import load_split
    from circot.data._io import write_json_atomic
    from circot.submission import score_predictions

    predictions = [*predictions, *(more_predictions or [])]
    loaded = load_split(dataset, root, split)
    result = score_predictions(loaded, predictions)
    typer.echo(result.format())
    if json_out is not None:
        write_json_atomic(json_out, {k: round(v, 4) for k, v in result.metrics.items()}, indent=2)


def register(app: typer.Typer) -> None:
    app.command("score")(score)
