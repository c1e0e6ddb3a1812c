"""Copy a trained model into the package as the shipped default, weights stored in float16.

    python scripts/ship_model.py runs/shapes-tiny-cot-continue2/model
    python scripts/ship_model.py src/circot/assets/shapes-tiny --table benchmarks/results.json \
        --training "circot train --config configs/shapes-tiny-cot.yaml (...)"
    python scripts/ship_model.py src/circot/assets/shapes-tiny --fast-weight 0.3 [--cot-samples 2 \
        --sampling-temperature 0.7 --cot-choice gallery]
    python scripts/ship_model.py src/circot/assets/shapes-tiny --soup runs/a/model [--soup runs/b/model]

The first form ships a run's model; the second rewrites the shipped model's card with the figures the results
table measured on it (row c, c°, c' and c* of benchmarks/results_table.py); the third sets the query settings val
chose (benchmarks/fast_weight.py): the blend of the fast embedding into full mode's, the sampled CoTs averaged
in, and which CoT is shown (benchmarks/cot_choice.py). The fourth ships a weight average (a uniform "soup" of the
model and each ``--soup`` model: the same architecture and tokenizer, e.g. runs continued from it); the config,
tokenizer and query settings are the first model's. Storing float16 halves the size; the model computes in
float32 when loaded, and storing again what was loaded is lossless, so the fingerprint the table recorded stays
the shipped model's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

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


def average_weights(model: Any, others: list[Any], names: list[Path]) -> None:
    """Set ``model``'s weights to the uniform mean of its own and those of ``others``; exits naming the first
    model directory whose tokenizer, tensor names, shapes or integer tensors differ."""
    import torch

    own = model.hf.state_dict()
    vocab = model.tokenizer.get_vocab()
    states = []
    for other, name in zip(others, names, strict=True):
        state = other.hf.state_dict()
        if other.tokenizer.get_vocab() != vocab:
            sys.exit(f"error: {name}: its tokenizer differs from the first model's")
        one_only = sorted(own.keys() ^ state.keys())
        if one_only:
            sys.exit(f"error: {name}: tensor {one_only[0]} is in one model only")
        for key, v in own.items():
            if state[key].shape != v.shape:
                sys.exit(
                    f"error: {name}: tensor {key} has shape {tuple(state[key].shape)}, not {tuple(v.shape)}"
                )
            if not v.is_floating_point() and not torch.equal(state[key], v):
                sys.exit(f"error: {name}: integer tensor {key} differs")
        states.append(state)
    done = set()  # tied tensors (e.g. embeddings and lm_head) share storage: average each storage once
    with torch.no_grad():
        for key, v in own.items():
            if v.is_floating_point() and v.data_ptr() not in done:
                done.add(v.data_ptr())
                v.copy_(sum((s[key].float() for s in states), v.float()) / (1 + len(states)))


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
    ap.add_argument(
        "--soup",
        type=Path,
        action="append",
        default=[],
        help="a model to average in (repeatable): ship the uniform mean of the weights",
    )
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
    if args.soup:
        others = []
        for path in args.soup:
            try:
                others.append(CIRCoT.from_pretrained(path))
            except CircotError as e:
                sys.exit(f"error: {path}: {e}")
        average_weights(model, others, args.soup)
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
