"""Choose full mode's ``fast_weight`` on val: R@1 of (1 - w) x the CoT's <emb> embedding + w x the fast one.

    python benchmarks/fast_weight.py --world data/shapes --model src/circot/assets/shapes-tiny \\
        --out benchmarks/results/fast_weight.md --json benchmarks/results/fast_weight.json

Each query is embedded twice, once in full mode with the CoT's embedding alone (w = 0) and once in fast mode, over
the split's whole gallery. Both embeddings are unit vectors and renormalising a blend scales a query's scores by one
positive number, so ranking by (1 - w) * s_cot + w * s_fast ranks exactly as the blended embedding does: one
evaluation per mode serves the whole grid. Run it on val only; test splits are for reporting. With
``--latency-queries N`` it also times full-mode queries at batch size 1 at w = 0 and at the chosen w, interleaved
in one run (the blend costs one more forward over the fast prompt).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from circot.data import load_split
from circot.metrics import evaluate

logger = logging.getLogger("fast_weight")
GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)


def scores_per_mode(model, split, batch_size: int) -> dict[str, np.ndarray]:
    """Query x gallery cosine scores in full mode (w = 0) and in fast mode."""
    paths = [split.gallery.path(i) for i in split.gallery.ids]
    gallery = model.encode_images(paths, batch_size=batch_size)
    refs = [split.image_path(q.reference) for q in split.queries]
    texts = [q.text for q in split.queries]
    model.config.fast_weight = 0.0
    out = {}
    for mode in ("full", "fast"):
        t0 = time.perf_counter()
        emb = model.encode_queries(refs, texts, mode=mode, batch_size=batch_size)
        out[mode] = np.asarray(emb, np.float32) @ gallery.T
        logger.info("%s: %s mode in %.0f s", split.split, mode, time.perf_counter() - t0)
    return out


def full_mode_latency(model, split, w: float, n: int, repeats: int) -> dict[str, float]:
    """Median ms of one full-mode query (image read, CoT, embedding) at w = 0 and at ``w``, the two timed in
    turn for each query so that the machine's load falls on both alike."""
    import statistics

    queries = split.queries[:n]
    times: dict[str, list[float]] = {"w0": [], "best": []}
    for _ in range(repeats):
        for q in queries:
            for key, weight in (("w0", 0.0), ("best", w)):
                model.config.fast_weight = weight
                t0 = time.perf_counter()
                model.encode_queries([split.image_path(q.reference)], [q.text], mode="full", batch_size=1)
                times[key].append(1000.0 * (time.perf_counter() - t0))
    model.config.fast_weight = 0.0
    return {
        "w0": statistics.median(times["w0"]),
        "best": statistics.median(times["best"]),
        "n": len(times["w0"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, type=Path)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latency-queries", type=int, default=0)
    ap.add_argument("--latency-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from circot.index import atomic_write_bytes
    from circot.model import CIRCoT

    model = CIRCoT.from_pretrained(args.model).eval()
    split = load_split("shapes", args.world, args.split)
    s = scores_per_mode(model, split, args.batch_size)
    grid = []
    for w in GRID:
        m = evaluate(split, (1.0 - w) * s["full"] + w * s["fast"]).metrics
        grid.append({"fast_weight": w, "R@1": m["R@1"], "R@5": m["R@5"], "mAP@5": m["mAP@5"]})
        logger.info("w = %.2f: R@1 %.1f", w, m["R@1"])
    best = max(grid, key=lambda r: (r["R@1"], r["mAP@5"], -r["fast_weight"]))
    latency = None
    if args.latency_queries:
        latency = full_mode_latency(
            model, split, best["fast_weight"], args.latency_queries, args.latency_repeats
        )
    report = {
        "model": str(args.model),
        "fingerprint": model.fingerprint,
        "split": args.split,
        "n_queries": len(split.queries),
        "grid": grid,
        "best": best,
        "latency_ms": latency,
        "command": "python " + " ".join(sys.argv),
    }
    lines = [
        f"# Full mode's fast_weight on {args.split} (model {model.fingerprint}, {len(split.queries)} queries)",
        "",
        "| w | R@1 | R@5 | mAP@5 |",
        "|---|---|---|---|",
        *(f"| {r['fast_weight']:.2f} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['mAP@5']:.1f} |" for r in grid),
        "",
        f"Best: w = {best['fast_weight']:.2f} (R@1, then mAP@5, then the smaller w).",
        "",
        *(
            [
                f"Full-mode query latency at batch size 1 (median of {latency['n']} timings, {args.threads} "
                f"thread(s)): {latency['w0']:.1f} ms at w = 0, {latency['best']:.1f} ms at w = "
                f"{best['fast_weight']:.2f} ({latency['best'] / latency['w0']:.3f}x).",
                "",
            ]
            if latency
            else []
        ),
        "```",
        report["command"],
        "```",
        "",
    ]
    atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    atomic_write_bytes(args.out, "\n".join(lines).encode("utf-8"))
    logger.info("best w = %.2f; wrote %s and %s", best["fast_weight"], args.out, args.json)


if __name__ == "__main__":
    main()
