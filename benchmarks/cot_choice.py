"""Which of full mode's CoTs to show: conclusion exact match of each rule for picking one of a query's CoTs.

    python benchmarks/cot_choice.py --world data/shapes --split val --json benchmarks/results/cot_choice_val.json

A model with ``cot_samples`` k > 0 writes k + 1 CoTs per query (the greedy one and k samples), each with its own
``<emb>`` embedding; the query's embedding averages them, so the ranking does not depend on which one is shown.
The rules (the first is ``cot_choice: greedy``, the second ``cot_choice: gallery``):

- greedy: the greedy CoT;
- gallery: the CoT whose own embedding's best score over the split's gallery is highest;
- gallery margin: the CoT whose best gallery score leads its second best by most;
- nearest query: the CoT whose own embedding is nearest the query's embedding (the one ranked with);
- nearest fast: the CoT whose own embedding is nearest the query's fast-mode embedding;
- vote: the most common conclusion (its first CoT; ties to the earlier CoT).

"any" is the share of queries with a right conclusion among their CoTs (what a perfect rule would get). Each
query's samples are seeded by the query itself (:meth:`circot.model.CIRCoT._sample_seeds`), so the figures do not
depend on the batch size. Deterministic for a given model, world and machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch


def pick(rule: str, cands: list[Any], query: np.ndarray, fast: np.ndarray, gallery: np.ndarray) -> int:
    """The index of the CoT ``rule`` shows among ``cands`` (greedy first)."""
    from circot.data.shapes.cot import canonical_description
    from circot.search import choose_cots, matrix_best_match

    if rule == "greedy":
        return 0
    if rule == "gallery":  # the product's own rule
        shown = choose_cots([cands[0]], matrix_best_match(gallery))[0]
        return next(i for i, c in enumerate(cands) if c is shown)
    embs = np.stack([c.embedding for c in cands])
    if rule == "gallery margin":
        top2 = np.sort(embs @ gallery.T, axis=1)[:, -2:]
        return int(np.argmax(top2[:, 1] - top2[:, 0]))
    if rule == "nearest query":
        return int(np.argmax(embs @ query))
    if rule == "nearest fast":
        return int(np.argmax(embs @ fast))
    if rule == "vote":
        keys = [canonical_description(c.conclusion) for c in cands]
        best = max(Counter(keys).values())
        return next(i for i, k in enumerate(keys) if keys.count(k) == best)
    raise ValueError(rule)


RULES = ("greedy", "gallery", "gallery margin", "nearest query", "nearest fast", "vote")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True, help="a shapes world (circot data shapes --out DIR)")
    ap.add_argument("--split", default="val")
    ap.add_argument(
        "--model", default=None, help="a circot model directory (default: the shipped tiny model)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from circot.data import load_split
    from circot.data.shapes.cot import canonical_description, gold_cot
    from circot.errors import CircotError
    from circot.index import atomic_write_bytes
    from circot.model import CIRCoT

    try:
        split = load_split("shapes", str(args.world), args.split)
    except CircotError as exc:
        sys.exit(f"error: {exc}")
    model = CIRCoT.from_pretrained(args.model).eval()
    if not model.config.cot_samples:
        sys.exit(
            f"error: model {model.fingerprint} samples no CoTs (cot_samples 0): there is nothing to choose"
        )
    refs = [split.image_path(q.reference) for q in split.queries]
    texts = [q.text for q in split.queries]
    gallery = model.encode_images(
        [split.gallery.path(i) for i in split.gallery.ids], batch_size=args.batch_size
    )
    fast = model.encode_queries(refs, texts, mode="fast", batch_size=args.batch_size)
    queries, cots = model.encode_queries(
        refs, texts, mode="full", batch_size=args.batch_size, return_reasoning=True, show_progress_bar=True
    )
    right = dict.fromkeys(RULES, 0)
    any_right = 0
    for q, c, emb, f in zip(split.queries, cots, queries, fast, strict=True):
        cands = [c, *c.samples]
        gold = canonical_description(gold_cot(q).conclusion)
        ok = [canonical_description(x.conclusion) == gold for x in cands]
        any_right += any(ok)
        for rule in RULES:
            right[rule] += ok[pick(rule, cands, emb, f, gallery)]
    n = len(split.queries)
    cfg = model.config
    report = {
        "model": args.model or "shapes-tiny (shipped)",
        "fingerprint": model.fingerprint,
        "split": args.split,
        "queries": n,
        "cot_samples": cfg.cot_samples,
        "sampling_temperature": cfg.sampling_temperature,
        "conclusion_exact": {rule: round(100.0 * r / n, 2) for rule, r in right.items()},
        "any_right": round(100.0 * any_right / n, 2),
    }
    print(
        f"{report['model']} [{model.fingerprint}], {args.split}, {n} queries, k = {cfg.cot_samples} samples"
    )
    for rule, v in report["conclusion_exact"].items():
        print(f"  {rule:14s} {v:6.2f}")
    print(f"  {'any':14s} {report['any_right']:6.2f}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main()
