"""``circot annotate``: three-stage CoT annotations of a dataset split by a teacher model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("annotate")
    def annotate_command(
        dataset: str = typer.Option(..., "--dataset", help="fashioniq, cirr or shapes."),
        root: Path = typer.Option(..., "--root", help="The dataset's root folder (official layout)."),
        split: str = typer.Option(..., "--split", help="The split to annotate (e.g. train)."),
        teacher: str = typer.Option(
            ..., "--teacher", help="openai (an OpenAI-compatible endpoint), hf, or shapes."
        ),
        out: Path = typer.Option(..., "--out", help="Output JSONL; rejects go to <out>.rejects.jsonl."),
        base_url: str = typer.Option(
            None, "--base-url", help="openai: endpoint, e.g. http://localhost:8000/v1."
        ),
        model: str = typer.Option(None, "--model", help="openai: served model name; hf: hub id or folder."),
        api_key_env: str = typer.Option(
            "OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (optional)."
        ),
        concurrency: int = typer.Option(
            8, "--concurrency", min=1, help="Triplets annotated at the same time."
        ),
        limit: int = typer.Option(None, "--limit", min=1, help="Only the first N queries of the split."),
        verify: bool = typer.Option(
            False, "--verify", help="Ask the teacher to judge each conclusion vs the target."
        ),
        retry_rejects: bool = typer.Option(
            False, "--retry-rejects", help="Annotate rejected triplets again."
        ),
        timeout: float = typer.Option(120.0, "--timeout", help="openai: seconds per request."),
        max_retries: int = typer.Option(
            6, "--max-retries", help="openai: retries per request (429/5xx/timeouts)."
        ),
        max_tokens: int = typer.Option(300, "--max-tokens", help="Most tokens per stage answer."),
        temperature: float = typer.Option(0.2, "--temperature", help="openai: sampling temperature."),
        max_image_side: int = typer.Option(
            None, "--max-image-side", help="Downscale larger images (pixels)."
        ),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="hf: requests per generate call."),
        device: str = typer.Option("cpu", "--device", help="hf: torch device."),
        dtype: str = typer.Option(None, "--dtype", help="hf: torch dtype, e.g. bfloat16."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Annotate a split with caption / reasoning / conclusion (resumable; rerun to finish)."""
        from circot.annotate import run_annotation

        if teacher == "hf":
            from circot.search import check_device

            check_device(device)

        report = run_annotation(
            dataset,
            root,
            split,
            teacher,
            out,
            base_url=base_url,
            model=model,
            api_key_env=api_key_env,
            concurrency=concurrency,
            limit=limit,
            verify=verify,
            retry_rejects=retry_rejects,
            timeout=timeout,
            max_retries=max_retries,
            max_tokens=max_tokens,
            temperature=temperature,
            max_image_side=max_image_side,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress and sys.stderr.isatty(),
        )
        typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
