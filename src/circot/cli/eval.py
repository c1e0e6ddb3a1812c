"""``circot eval``: a whole benchmark split with the official metrics (and the reasoning scores on shapes)."""

from __future__ import annotations

from pathlib import Path

import typer

from circot.cli import reasoning


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        dataset: str = typer.Option(..., "--dataset", help="shapes, fashioniq, cirr or circo."),
        root: Path = typer.Option(..., "--root", help="Dataset root folder (official layout)."),
        split: str = typer.Option(..., "--split", help="Split name, e.g. val, test, test-novel, test1."),
        model: str = typer.Option(
            None, "--model", help="Model folder or hub id; default: the shipped shapes model."
        ),
        mode: str = typer.Option("full", "--mode", help="full: reason then embed; fast: embed directly."),
        json_file: Path = typer.Option(
            None, "--json", help="Also write the report (with each query's CoT) here."
        ),
        submission: Path = typer.Option(
            None,
            "--submission",
            help="Write test-server files (CIRR, CIRCO) or predictions (FashionIQ, shapes) here.",
        ),
        limit: int = typer.Option(
            None, "--limit", min=1, help="Evaluate only the first N queries (quick check)."
        ),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Queries per batch."),
        gallery_batch_size: int = typer.Option(
            32, "--gallery-batch-size", min=1, help="Gallery images per batch."
        ),
        cache: Path = typer.Option(
            None, "--cache", help="Cache folder; default $CIRCOT_CACHE or ~/.cache/circot."
        ),
        no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor fill the caches."),
        device: str = typer.Option("auto", "--device", help="Torch device."),
        reasoner_kind: str = reasoning.REASONER,
        base_url: str = reasoning.BASE_URL,
        reasoner_model: str = reasoning.REASONER_MODEL,
        reasoner_key_env: str = reasoning.REASONER_KEY_ENV,
        fast_weight: float = reasoning.FAST_WEIGHT,
        cot_samples: int = reasoning.COT_SAMPLES,
        cot_choice: str = reasoning.COT_CHOICE,
        store: str = typer.Option(
            None,
            "--store",
            help="Rank through this index (a folder, file.db or milvus://host/NAME; built from the gallery "
            "when missing) instead of scoring every gallery image exactly.",
        ),
    ) -> None:
        """Evaluate a model on a benchmark split; prints the metrics table and the conventions behind it.

        Sharded: `torchrun --nproc_per_node N -m circot eval ...` (or `accelerate launch --num_processes N
        -m circot eval ...` on GPUs): each process embeds a shard of the gallery and of the queries into
        shard files in the cache folder's `work` folder; rank 0 merges and scores. A rerun reuses the
        shards already written.
        """
        from circot.data import dataset_module
        from circot.errors import CircotError
        from circot.evaluate import evaluate
        from circot.index import atomic_write_json
        from circot.search import MODES, load_model, model_reference

        if mode not in MODES:
            raise CircotError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
        module = dataset_module(dataset)
        if split not in module.SPLITS:
            raise CircotError(
                f"{dataset}: unknown split {split!r}; choose one of: {', '.join(module.SPLITS)}"
            )
        if not root.exists():
            raise CircotError(f"{dataset}: root folder {str(root)!r} does not exist")
        reasoner = reasoning.build(reasoner_kind, base_url, reasoner_model, reasoner_key_env, batch_size)
        net = load_model(model, device, fast_weight, cot_samples, cot_choice)
        try:
            report = evaluate(
                net,
                dataset,
                root,
                split,
                mode=mode,
                batch_size=batch_size,
                gallery_batch_size=gallery_batch_size,
                cache_dir=cache,
                use_cache=not no_cache,
                submission_dir=submission,
                limit=limit,
                model_ref=model_reference(model),
                progress=True,
                reasoner=reasoner,
                store=store,
            )
        finally:
            reasoner.close()
        if report is None:  # a rank other than 0 of a sharded run: its shards are written, rank 0 reports
            return
        if json_file is not None:
            atomic_write_json(json_file, report.to_dict(with_cots=True))
        typer.echo(report.format())
        if json_file is not None:
            typer.echo(f"wrote {json_file}")
