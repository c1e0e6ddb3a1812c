"""``circot export``: write a circot model as a serving engine loads it (merged, or base + LoRA adapter)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        model: str = typer.Option(
            None, "--model", help="Model folder or hub id; default: the shipped shapes model."
        ),
        out: Path = typer.Option(
            ..., "--out", help="Folder to write (replaced if it holds an earlier export)."
        ),
        merged: bool = typer.Option(False, "--merged", help="One checkpoint, LoRA merged in (the default)."),
        adapter: bool = typer.Option(
            False,
            "--adapter",
            help="base/ (with circot's token rows) + adapter/ (LoRA weights); LoRA models.",
        ),
    ) -> None:
        """Export a model for vLLM or SGLang: weights, tokenizer with circot's tags, chat template."""
        from circot.errors import CircotError
        from circot.export import export_model

        if merged and adapter:
            raise CircotError("choose one of --merged and --adapter")
        kind = "adapter" if adapter else "merged"
        written = export_model(model, out, kind)
        typer.echo(f"wrote {kind} export to {written}")
        if kind == "merged":
            typer.echo(f"serve it: vllm serve {written} --served-model-name circot")
        else:
            lora = f"--enable-lora --lora-modules circot={written / 'adapter'}"
            typer.echo(f"serve it: vllm serve {written / 'base'} {lora}")
