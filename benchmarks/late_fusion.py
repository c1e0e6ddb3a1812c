"""Row (a) of the results table: the late-fusion baseline on the shapes world.

Trains the CLIP4Cir-style combiner over frozen EfficientNet-Lite0 / all-MiniLM-L6-v2 features on the train split
and evaluates it on val and test-novel with circot.metrics (scores = query features @ gallery features.T).

    python benchmarks/late_fusion.py --world /path/to/shapes --out benchmarks/results/late_fusion.json

Frozen features are cached (``--cache-dir``); the first run spends most of its time extracting them. Settings were
chosen on val only (``--sweep`` writes the val-only comparison); test-novel is never used for a choice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch

from circot.baselines.late_fusion import (
    FrozenFeatures,
    LateFusionConfig,
    LateFusionModel,
    evaluate,
    fit_combiner,
    split_features,
    train_and_evaluate,
)
from circot.data import load_split

# Val-only sweep: each entry overrides the defaults of LateFusionConfig.
SWEEP = [
    {},
    {"reference_negative": True},
    {"pool": "grid2", "reference_negative": True},
    {"pool": "avg+grid2", "reference_negative": True},
    {"temperature": 0.01, "reference_negative": True},
    {"temperature": 0.05, "reference_negative": True},
    {"reference_negative": True, "dropout": 0.5},
    {"reference_negative": True, "epochs": 30},
    {"reference_negative": True, "epochs": 8},
    {"reference_negative": True, "proj_dim": 512, "hidden_dim": 1024},
    {"reference_negative": True, "weight_decay": 0.1},
]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def config_from_args(args: argparse.Namespace, **overrides) -> LateFusionConfig:
    values = {
        f.name: getattr(args, f.name)
        for f in fields(LateFusionConfig)
        if getattr(args, f.name, None) is not None
    }
    return LateFusionConfig(**{**values, **overrides})


def sweep(args: argparse.Namespace) -> dict:
    """Train each SWEEP setting and score it on val only."""
    rows = []
    train_split, val_split = (
        load_split("shapes", args.world, "train"),
        load_split("shapes", args.world, "val"),
    )
    chosen = SWEEP if args.sweep_only is None else [SWEEP[i] for i in args.sweep_only]
    for override in chosen:
        cfg = config_from_args(args, **override)
        feats = FrozenFeatures(args.cache_dir, cfg.image_size, cfg.pool)
        data = split_features(train_split, feats, cfg.max_train_queries, cfg.seed, progress=args.progress)
        t0 = time.perf_counter()
        combiner, history = fit_combiner(data, cfg, progress=args.progress)
        seconds = time.perf_counter() - t0
        model = LateFusionModel(cfg, combiner, history, seconds, len(data.text))
        result = evaluate(model, split=val_split, features=feats, progress=args.progress)
        m = result.metrics
        logging.info(
            "%s: val R@1 %.2f R@5 %.2f (%.0f s)", override or "defaults", m["R@1"], m["R@5"], seconds
        )
        rows.append(
            {
                "override": override,
                "config": cfg.to_dict(),
                "val": m,
                "train_wall_time_s": seconds,
                "final_loss": history[-1],
            }
        )
    if args.out.exists():  # keep the rows of earlier sweep runs that were not re-run
        previous = json.loads(args.out.read_text())
        earlier = previous.get("rows", [])
        for r in earlier:  # rows written before each row carried its full config
            r.setdefault("config", {**previous.get("defaults", {}), **r["override"]})
        rerun = [r["override"] for r in rows]
        rows = [r for r in earlier if r["override"] not in rerun] + rows
    rows.sort(key=lambda r: SWEEP.index(r["override"]) if r["override"] in SWEEP else len(SWEEP))
    return {"split": "val", "defaults": LateFusionConfig().to_dict(), "rows": rows}


def _parser_for(annotation: str):
    if annotation == "bool":
        return lambda s: s.lower() in ("1", "true", "yes")
    return {"int": int, "int | None": int, "float": float}.get(annotation, str)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, type=Path, help="shapes world folder (circot data shapes ...)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/late_fusion.json"))
    p.add_argument("--splits", nargs="+", default=["val", "test-novel"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="frozen-feature cache (default ~/.cache/circot)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-queries", type=int, default=50)
    p.add_argument("--sweep", action="store_true", help="val-only comparison of the SWEEP settings instead")
    p.add_argument("--sweep-only", type=int, nargs="+", default=None, help="run these SWEEP entries only")
    p.add_argument("--progress", action="store_true")
    for f in fields(LateFusionConfig):
        if f.name == "seed":
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_parser_for(str(f.type)), default=None
        )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "command": " ".join(
            ["python", "benchmarks/late_fusion.py", *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    if args.sweep:
        report = sweep(args)
    else:
        report = train_and_evaluate(
            args.world,
            splits=tuple(args.splits),
            seed=args.seed,
            config=config_from_args(args, seed=args.seed),
            cache_dir=args.cache_dir,
            latency_queries=args.latency_queries,
            num_threads=args.threads,
            progress=args.progress,
        )
        for name, res in report["splits"].items():
            m = res["metrics"]
            logging.info(
                "%s: R@1 %.2f R@5 %.2f mAP@5 %.2f | latency %.1f ms/query",
                name, m["R@1"], m["R@5"], m["mAP@5"], res["query_latency_ms"].get("total", float("nan")),
            )  # fmt: skip
    report["environment"] = env
    write_json(args.out, report)
    logging.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
