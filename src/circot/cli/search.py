"""``circot search``: one composed query against an index, with the model's reasoning."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from circot.cli import reasoning


def format_result(result, width: int = 100) -> str:
    """Human-readable text of a :class:`circot.search.QueryResult`."""
    import textwrap

    lines = [f"query: {result.text!r} ({result.mode} mode)"]
    if result.cot is not None:
        given = " (given)" if result.cot_given else ""
        for name in ("caption", "reasoning", "conclusion"):
            body = getattr(result.cot, name) or "(empty)"
            lines.append(
                textwrap.fill(
                    body, width, initial_indent=f"  {name + given:>12}: ", subsequent_indent=" " * 16
                )
            )
        if not result.cot.well_formed:
            lines.append(f"  {'warning':>12}: malformed reasoning ({'; '.join(result.cot.problems)})")
    lines.append("results:")
    for h in result.hits:
        lines.append(f"  {h.rank:>3}. {h.score:+.4f}  {h.id}")
    t = result.timings
    lines.append(
        f"time: {t.get('total_s', 0) * 1000:.0f} ms (reasoning {t.get('cot_s', 0) * 1000:.0f}, "
        f"embedding {t.get('embed_s', 0) * 1000:.0f}, search {t.get('search_s', 0) * 1000:.1f})"
    )
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_command(
        index: str = typer.Option(
            ...,
            "--store",
            "--index",
            help="Index from `circot index build`: a folder (faiss), a milvus-lite file.db or milvus://host/NAME.",
        ),
        image: Path = typer.Option(..., "--image", help="Reference image."),
        text: str = typer.Option(..., "--text", help="Modification text, e.g. 'make the circle red'."),
        k: int = typer.Option(10, "--k", min=1, help="Number of results."),
        mode: str = typer.Option("full", "--mode", help="full: reason then embed; fast: embed directly."),
        model: str = typer.Option(None, "--model", help="Model; default: the one recorded in the index."),
        conclusion: str = typer.Option(
            None, "--conclusion", help="Use this conclusion instead of generating the reasoning (full mode)."
        ),
        device: str = typer.Option("auto", "--device", help="Torch device."),
        mmap: bool = typer.Option(True, "--mmap/--no-mmap", help="Memory-map the index where faiss allows."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        reasoner_kind: str = reasoning.REASONER,
        base_url: str = reasoning.BASE_URL,
        reasoner_model: str = reasoning.REASONER_MODEL,
        reasoner_key_env: str = reasoning.REASONER_KEY_ENV,
        fast_weight: float = reasoning.FAST_WEIGHT,
        cot_samples: int = reasoning.COT_SAMPLES,
        cot_choice: str = reasoning.COT_CHOICE,
    ) -> None:
        """Find the gallery images that match IMAGE changed as TEXT says; print the reasoning and the ranking."""
        from circot.errors import CircotError
        from circot.search import MODES, load_model, search_query
        from circot.store import open_store

        if mode not in MODES:
            raise CircotError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        reasoner = reasoning.build(reasoner_kind, base_url, reasoner_model, reasoner_key_env)
        gallery = open_store(index, mmap=mmap)
        net = load_model(model or gallery.manifest.model, device, fast_weight, cot_samples, cot_choice)
        cot = None
        if conclusion is not None:
            cot = {"caption": "", "reasoning": "", "conclusion": conclusion}
        try:
            result = search_query(net, gallery, image, text, k=k, mode=mode, cot=cot, reasoner=reasoner)
        finally:
            reasoner.close()
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=1))
        else:
            typer.echo(format_result(result))
