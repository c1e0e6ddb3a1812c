"""``circot train --config FILE [--resume] [key=value ...]``: the two-stage CIR-CoT training entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer


def train_command(
    config: Path | None = typer.Option(None, "--config", "-c", help="Training config (YAML or JSON)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Config overrides as dotted key=value, e.g. optim.batch_size=16 stages.1.steps=500."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in run_dir from its newest checkpoint."
    ),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Shortcut for run_dir=PATH."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and stop."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a CIR-CoT model (stage 1 InfoNCE in fast form, stage 2 CE on the CoT + InfoNCE).

    Multi-GPU: `accelerate launch --config_file configs/accelerate/multi-gpu.yaml -m circot train --config ...`.
    """
    import yaml

    from circot.train.config import load_config

    items = list(overrides or [])
    if run_dir is not None:
        items.append(f"run_dir={run_dir}")
    if resume and config is None and run_dir is not None:
        config = run_dir / "config.yaml"
    cfg = load_config(config, items)
    if dry_run:
        typer.echo(
            json.dumps(cfg.to_dict(), indent=2) if as_json else yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        )
        return
    from circot.train.trainer import train

    result = train(cfg, resume=resume)
    if os.environ.get("RANK", "0") != "0":  # one summary per run: the main process reports
        return
    summary = {
        "run_dir": str(result.run_dir),
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "steps": result.steps,
        "wall_time_s": round(result.wall_time_s, 1),
        "val": {m: r.get("metrics", {}) for m, r in result.final_eval.items()},
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"trained {result.steps} steps in {result.wall_time_s:.0f} s; model: {summary['model_dir']}")
    for mode, metrics in summary["val"].items():
        shown = " ".join(f"{k}={metrics[k]:.2f}" for k in ("R@1", "R@5", "mAP@5") if k in metrics)
        typer.echo(f"val {mode}: {shown}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
