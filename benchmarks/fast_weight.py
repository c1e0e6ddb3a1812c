"""Choose full mode's query settings on val: ``fast_weight`` w, the blend (1 - w) x the CoT's <emb> embedding + w x
the fast one, and ``cot_samples`` k, sampled CoTs averaged into the greedy one's embedding (at a sampling temperature).

    python benchmarks/fast_weight.py --world data/shapes --model src/circot/assets/shapes-tiny \
        --out benchmarks/results/fast_weight.md --json benchmarks/results/fast_weight.json [--cot-samples 0,2,4]

Each query is embedded in fast mode once and in full mode once per k and temperature (w = 0), over the split's whole
gallery. The embeddings are unit vectors and renormalising a blend scales a query's scores by one positive number,
so ranking by (1 - w) * s_cot + w * s_fast ranks exactly as the blended embedding does: one evaluation per mode
serves the whole w grid. The best setting has the highest R@1, then mAP@5, then the fewest samples, the smaller w.
Run it on val only; test splits are for reporting. With ``--latency-queries N`` it also times full-mode queries at
batch size 1 with neither blend nor samples and at the chosen setting, interleaved in one run.
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


def _configure(
    model, fast_weight: float = 0.0, cot_samples: int = 0, temperature: float | None = None
) -> None:
    model.config.fast_weight, model.config.cot_samples = fast_weight, cot_samples
    if temperature is not None:
        model.config.sampling_temperature = temperature


def scores_per_setting(
    model, split, batch_size: int, samples: list[int], temperatures: list[float]
) -> tuple[np.ndarray, dict[tuple[int, float | None], np.ndarray]]:
    """Query x gallery cosine scores in fast mode, and in full mode (w = 0) for each (k, temperature)."""
    paths = [split.gallery.path(i) for i in split.gallery.ids]
    gallery = model.encode_images(paths, batch_size=batch_size)
    refs = [split.image_path(q.reference) for q in split.queries]
    texts = [q.text for q in split.queries]

    def scores(mode: str, what: str) -> np.ndarray:
        t0 = time.perf_counter()
        emb = model.encode_queries(refs, texts, mode=mode, batch_size=batch_size)
        logger.info("%s: %s in %.0f s", split.split, what, time.perf_counter() - t0)
        return np.asarray(emb, np.float32) @ gallery.T

    _configure(model)
    fast = scores("fast", "fast mode")
    full = {}
    for k in samples:
        for t in temperatures if k else [None]:  # no samples: the temperature plays no part
            _configure(model, 0.0, k, t)
            full[(k, t)] = scores("full", f"full mode, {k} sampled CoTs (temperature {_temp(t)})")
    _configure(model)
    return fast, full


def full_mode_latency(model, split, best: dict, n: int, repeats: int) -> dict[str, float]:
    """Median ms of one full-mode query (image read, CoT, embedding) with neither blend nor samples and at the
    ``best`` setting, the two timed in turn for each query so that the machine's load falls on both alike."""
    import statistics

    queries = split.queries[:n]
    plain = {"fast_weight": 0.0, "cot_samples": 0, "temperature": best["temperature"]}
    times: dict[str, list[float]] = {"w0": [], "best": []}
    for _ in range(repeats):
        for q in queries:
            for key, setting in (("w0", plain), ("best", best)):
                _configure(model, setting["fast_weight"], setting["cot_samples"], setting["temperature"])
                t0 = time.perf_counter()
                model.encode_queries([split.image_path(q.reference)], [q.text], mode="full", batch_size=1)
                times[key].append(1000.0 * (time.perf_counter() - t0))
    _configure(model)
    return {
        "w0": statistics.median(times["w0"]),
        "best": statistics.median(times["best"]),
        "n": len(times["w0"]),
    }


def _temp(t: float | None) -> str:
    return "—" if t is None else f"{t:.2f}"


def _numbers(text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: not a comma-separated list of {kind.__name__} values: {text!r}") from None
    if not values:
        raise SystemExit(f"error: an empty list: {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, type=Path)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--cot-samples", default="0", help="Comma-separated k values to try (default 0).")
    ap.add_argument(
        "--temperatures", default=None, help="Comma-separated sampling temperatures (default: the model's)."
    )
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

    samples = _numbers(args.cot_samples, int)
    if min(samples) < 0:
        raise SystemExit(f"error: --cot-samples must be >= 0, got {args.cot_samples!r}")
    model = CIRCoT.from_pretrained(args.model).eval()
    fingerprint = model.fingerprint  # the temperatures tried are in the config, so in the fingerprint
    temperatures = (
        _numbers(args.temperatures, float) if args.temperatures else [model.config.sampling_temperature]
    )
    if min(temperatures) <= 0:
        raise SystemExit(f"error: --temperatures must be > 0, got {args.temperatures!r}")
    split = load_split("shapes", args.world, args.split)
    fast, full = scores_per_setting(model, split, args.batch_size, samples, temperatures)
    grid = []
    for (k, t), s_full in full.items():
        for w in GRID:
            m = evaluate(split, (1.0 - w) * s_full + w * fast).metrics
            row = {"cot_samples": k, "temperature": t, "fast_weight": w}
            grid.append({**row, "R@1": m["R@1"], "R@5": m["R@5"], "mAP@5": m["mAP@5"]})
            logger.info("k = %d, T = %s, w = %.2f: R@1 %.1f", k, _temp(t), w, m["R@1"])
    best = max(grid, key=lambda r: (r["R@1"], r["mAP@5"], -r["cot_samples"], -r["fast_weight"]))
    latency = None
    if args.latency_queries:
        latency = full_mode_latency(model, split, best, args.latency_queries, args.latency_repeats)
    report = {
        "model": str(args.model),
        "fingerprint": fingerprint,
        "split": args.split,
        "n_queries": len(split.queries),
        "grid": grid,
        "best": best,
        "latency_ms": latency,
        "command": "python " + " ".join(sys.argv),
    }
    lines = [
        f"# Full mode's fast_weight and cot_samples on {args.split} (model {fingerprint}, "
        f"{len(split.queries)} queries)",
        "",
        "| k | temperature | w | R@1 | R@5 | mAP@5 |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['cot_samples']} | {_temp(r['temperature'])} | {r['fast_weight']:.2f} | {r['R@1']:.1f} | "
            f"{r['R@5']:.1f} | {r['mAP@5']:.1f} |"
            for r in grid
        ),
        "",
        f"Best: k = {best['cot_samples']}, temperature {_temp(best['temperature'])}, w = {best['fast_weight']:.2f} "
        "(R@1, then mAP@5, then the fewer samples, then the smaller w).",
        "",
        *(
            [
                f"Full-mode query latency at batch size 1 (median of {latency['n']} timings, {args.threads} "
                f"thread(s)): {latency['w0']:.1f} ms at k = 0, w = 0; {latency['best']:.1f} ms at the best "
                f"setting ({latency['best'] / latency['w0']:.3f}x).",
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
    logger.info("best: %s; wrote %s and %s", best, args.out, args.json)


if __name__ == "__main__":
    main()
