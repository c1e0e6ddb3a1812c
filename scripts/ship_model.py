"""Copy a trained model into the package as the shipped default, weights stored in float16.

    python scripts/ship_model.py runs/shapes-tiny-cot-continue2/model
    python scripts/ship_model.py src/circot/assets/shapes-tiny --table benchmarks/results.json \
        --training "circot train --config configs/shapes-tiny-cot.yaml (...)"
    python scripts/ship_model.py src/circot/assets/shapes-tiny --fast-weight 0.3 [--cot-samples 2 \
        --sampling-temperature 0.7 --cot-choice gallery]

The first form ships a run's model; the second rewrites the shipped model's card with the figures the results
table measured on it (row c, c°, c' and c* of benchmarks/results_table.py); the third sets the query settings val
chose (benchmarks/fast_weight.py): the blend of the fast embedding into full mode's, the sampled CoTs averaged
in, and which CoT is shown (benchmarks/cot_choice.py). Storing float16 halves the size; the model computes in
float32 when loaded, and storing again what was loaded is lossless, so the fingerprint the table recorded stays
the shipped model's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROWS = {"c": "full", "c_cot": "full, <emb> of the CoT alone", "c_fast": "fast", "c_gold": "gold CoT"}
METRICS = ("R@1", "R@5", "mAP@5")
COT_METRICS = {
    "caption_exact": "caption exact match",
    "caption_f1": "caption F1",
    "conclusion_exact": "conclusion exact match",
    "well_formed": "well-formed CoT",
}


def card_results(table: dict, fingerprint: str, training: str | None) -> dict[str, str | float]:
    """Model-card rows from a results-table JSON, only for rows measured on this very model."""
    out: dict[str, str | float] = {}
    if training:
        out["training"] = training
    for row, label in ROWS.items():
        entry = table["rows"].get(row)
        if entry is None:
            continue
        if entry.get("fingerprint") != fingerprint:
            sys.exit(
                f"{row}: the table was measured on model {entry.get('fingerprint')}, not on {fingerprint}"
            )
        for split in table["splits"]:
            res = entry.get(split, {})
            for m in METRICS:
                if m in res.get("metrics", {}):
                    out[f"shapes {split} {label} {m}"] = res["metrics"][m]
            for key, name in COT_METRICS.items():
                if key in res.get("cot", {}):  # a share in the table; in % here like the retrieval metrics
                    out[f"shapes {split} {name} (%)"] = 100 * res["cot"][key]
            steer = res.get("faithfulness", {}).get("steering_R@1")
            if steer is not None:
                out[f"shapes {split} {label} steering R@1 (another query's gold conclusion)"] = steer
    return out


def main() -> None:
    from circot.config import COT_CHOICES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model directory to ship")
    ap.add_argument("--dest", type=Path, default=Path("src/circot/assets/shapes-tiny"))
    ap.add_argument("--table", type=Path, help="results-table JSON measured on the shipped model")
    ap.add_argument("--training", help="how the model was trained (a line for the card)")
    ap.add_argument(
        "--fast-weight",
        type=float,
        help="full mode's blend of the fast embedding (benchmarks/fast_weight.py)",
    )
    ap.add_argument(
        "--cot-samples", type=int, help="sampled CoTs full mode averages in (benchmarks/fast_weight.py)"
    )
    ap.add_argument("--sampling-temperature", type=float, help="the temperature of those samples")
    ap.add_argument("--cot-choice", choices=COT_CHOICES, help="which of those CoTs full mode shows")
    args = ap.parse_args()

    from circot.errors import CircotError
    from circot.model import CIRCoT

    settings = {
        "fast_weight": args.fast_weight,
        "cot_samples": args.cot_samples,
        "sampling_temperature": args.sampling_temperature,
        "cot_choice": args.cot_choice,
    }
    over = {k: v for k, v in settings.items() if v is not None}
    try:
        model = CIRCoT.from_pretrained(args.model, **over)
    except CircotError as e:
        sys.exit(f"error: {args.model}: {e}")
    results = None
    if args.table:
        results = card_results(json.loads(args.table.read_text()), model.fingerprint, args.training)
    elif args.training:
        results = {"training": args.training}
    out = model.save_pretrained(args.dest, results=results, storage_dtype="fp16")
    stored = CIRCoT.from_pretrained(out)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"shipped {args.model} -> {out}: fingerprint {stored.fingerprint}, {size:.1f} MB")


if __name__ == "__main__":
    main()
