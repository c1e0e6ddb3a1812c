"""The README results table: every row evaluated on the shapes world by one harness.

Rows (design.md §4, issue 5):
  (a)  late fusion — frozen EfficientNet-Lite0 + all-MiniLM-L6-v2 features, trained CLIP4Cir-style combiner
  (b)  the tiny MLLM trained without CoT, fast mode
  (c)  CIR-CoT, full mode (the model writes caption → reasoning → conclusion, then <emb>), embedded by the
       model's own rule (its config's fast_weight w blends in the fast embedding)
  (c°) the same CoTs embedded at <emb> alone (w = 0, the paper's rule); only for a model whose w > 0
  (c') the same model, fast mode (no CoT)
  (c*) the same model fed the gold CoT (the ceiling when the reasoning is right)

Every retrieval number comes from ``circot.metrics.evaluate`` on query × gallery cosine scores over the whole
gallery of each split. Usage (the commands that made README's table are in benchmarks/README.md):

    python benchmarks/results_table.py --world data/shapes \\
        --cot-run runs/shapes-tiny-cot --nocot-run runs/shapes-tiny-nocot \\
        --late-fusion-json benchmarks/results/late_fusion.json \\
        --out benchmarks/results.md --json benchmarks/results.json

``--cot-model DIR`` / ``--nocot-model DIR`` evaluate a model directory without its run (training time then comes
from ``--cot-train-time`` / ``--nocot-train-time`` or the model's card). Without ``--late-fusion-json`` row (a) is
trained here by ``circot.baselines.late_fusion.train_and_evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circot.data import load_split
from circot.data.records import CIRSplit
from circot.index import atomic_write_bytes

logger = logging.getLogger("results_table")

FAMILIES = ("attribute", "add", "remove", "move", "swap", "relational", "set", "two_step")
SUBSETS = ("novel_pairs", "more_objects", "novel_combos")
ROWS = {
    "a": "(a) late fusion",
    "b": "(b) no-CoT MLLM, fast",
    "c": "(c) CIR-CoT, full",
    "c_cot": "(c°) CIR-CoT, full, <emb> of the CoT alone",
    "c_fast": "(c′) CIR-CoT model, fast",
    "c_gold": "(c*) CIR-CoT model fed gold CoT",
}


def _train_time(run: Path | None, explicit: float | None) -> float | None:
    if explicit is not None:
        return explicit
    if run is not None and (run / "final_eval.json").exists():
        return float(json.loads((run / "final_eval.json").read_text())["training_wall_time_s"])
    return None


def perception_probe(run: Path | None) -> dict[str, float] | None:
    """The last per-attribute val accuracy of the run's perception head (its vision tower is frozen after
    the perception stage, so this is the shipped tower's)."""
    path = run / "metrics.jsonl" if run is not None else None
    if path is None or not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith("val_perception/") for k in rec):
            last = {k.split("/", 1)[1]: v for k, v in rec.items() if k.startswith("val_perception/")}
            last["step"] = rec["step"]
    return last


def query_latency_ms(model: Any, split: CIRSplit, mode: str, n: int, cots: list | None = None) -> float:
    """Median wall time of one query at batch size 1 (reference image read + CoT generation if full + embed)."""
    qs = split.queries[:n]
    model.encode_queries(
        [split.image_path(qs[0].reference)], [qs[0].text], mode=mode, batch_size=1
    )  # warm-up
    times = []
    for i, q in enumerate(qs):
        t0 = time.perf_counter()
        model.encode_queries(
            [split.image_path(q.reference)],
            [q.text],
            mode=mode,
            batch_size=1,
            cots=[cots[i]] if cots is not None else None,
        )
        times.append(1000 * (time.perf_counter() - t0))
    return float(statistics.median(times))


def top1_hits(
    split: CIRSplit, scores: np.ndarray, targets: list[tuple[str, ...]] | None = None
) -> np.ndarray:
    """Whether each query's best-scoring gallery image is one of its ground truths (``targets``: other
    ground truths per query, e.g. those of the query whose conclusion it was given)."""
    ids = split.gallery.ids
    best = np.asarray(scores).argmax(axis=1)
    gts = targets if targets is not None else [q.targets for q in split.queries]
    return np.array([ids[b] in set(t) for b, t in zip(best, gts, strict=True)])


def steering_partners(split: CIRSplit) -> list[int]:
    """For each query, another query of the split whose gold conclusion (target scene) differs: the next one
    in a fixed shuffled order."""
    from circot.data import shapes

    n = len(split.queries)
    order = np.random.default_rng(0).permutation(n)
    conclusions = [shapes.gold_cot(q).conclusion for q in split.queries]
    partner = [0] * n
    for k, i in enumerate(order):
        for step in range(1, n):
            j = int(order[(k + step) % n])
            if conclusions[j] != conclusions[i]:
                partner[int(i)] = j
                break
    return partner


def faithfulness(
    model: Any, split: CIRSplit, gallery: np.ndarray, cots: list, hits: np.ndarray, batch_size: int
) -> dict[str, Any]:
    """Does retrieval follow the reasoning?

    - P(R@1 hit | conclusion exactly right) and P(R@1 hit | conclusion wrong), over the model's own CoT;
    - steering: query i gets its own gold caption and reasoning but the gold conclusion of another query j
      (another target scene, same gallery); the share of queries whose top-1 image is j's target.
    """
    from circot.data import shapes
    from circot.prompts import CoT

    gold = [shapes.gold_cot(q) for q in split.queries]
    exact = np.array(
        [
            shapes.score_cot([c or CoT()], [g])["conclusion_exact"] == 1.0
            for c, g in zip(cots, gold, strict=True)
        ]
    )
    out: dict[str, Any] = {
        "n_conclusion_right": int(exact.sum()),
        "n_conclusion_wrong": int((~exact).sum()),
        "p_hit_if_conclusion_right": 100.0 * float(hits[exact].mean()) if exact.any() else None,
        "p_hit_if_conclusion_wrong": 100.0 * float(hits[~exact].mean()) if (~exact).any() else None,
    }
    partner = steering_partners(split)
    steered = [CoT(caption=g.caption, reasoning=g.reasoning, conclusion=gold[j].conclusion)
               for g, j in zip(gold, partner, strict=True)]  # fmt: skip
    refs = [split.image_path(q.reference) for q in split.queries]
    texts = [q.text for q in split.queries]
    emb = model.encode_queries(refs, texts, mode="full", batch_size=batch_size, cots=steered)
    scores = np.asarray(emb, dtype=np.float32) @ gallery.T
    to_partner = top1_hits(split, scores, [split.queries[j].targets for j in partner])
    to_own = top1_hits(split, scores)
    out["steering_R@1"] = 100.0 * float(to_partner.mean())
    out["steering_own_target_R@1"] = 100.0 * float(to_own.mean())
    return out


@contextlib.contextmanager
def fast_weight(model: Any, w: float) -> Iterator[None]:
    """``model`` embeds full-mode queries with this ``fast_weight`` inside the block."""
    kept = model.config.fast_weight
    model.config.fast_weight = w
    try:
        yield
    finally:
        model.config.fast_weight = kept


def evaluate_mllm(
    model: Any, split: CIRSplit, rows: list[str], batch_size: int, latency_n: int
) -> dict[str, dict[str, Any]]:
    """Rows b / c / c_cot / c_fast / c_gold of one model on one split (c_cot reuses row c's CoTs, so it
    comes after c)."""
    from circot.data import shapes
    from circot.metrics import evaluate
    from circot.search import matrix_best_match, shown_cots

    paths = [split.gallery.path(i) for i in split.gallery.ids]
    t0 = time.perf_counter()
    gallery = model.encode_images(paths, batch_size=batch_size, show_progress_bar=True)
    logger.info("%s: gallery of %d images in %.0f s", split.split, len(paths), time.perf_counter() - t0)
    refs = [split.image_path(q.reference) for q in split.queries]
    texts = [q.text for q in split.queries]
    gold = [shapes.gold_cot(q) for q in split.queries]
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        if row == "c":
            emb, cots = model.encode_queries(
                refs, texts, mode="full", batch_size=batch_size, return_reasoning=True, show_progress_bar=True
            )
            # the CoT the product shows (the greedy one, or by the config's cot_choice one of its samples)
            cots = shown_cots(model, cots, matrix_best_match(gallery))
            res["cot"] = shapes.score_cot(cots, gold)
            res["examples"] = [
                {"query_id": q.query_id, "text": q.text, "generated": c.to_dict(), "gold": g.to_dict()}
                for q, c, g in list(zip(split.queries, cots, gold, strict=True))[:5]
            ]
            # reasoning quality per family and subset, to read beside R@1 per family
            res["cot_per_group"] = shapes.score_cot_by_group(cots, gold, split.queries)
            latency_mode, latency_cots = "full", None
        elif row == "c_cot":
            with fast_weight(model, 0.0):
                emb = model.encode_queries(refs, texts, mode="full", batch_size=batch_size, cots=cots)
            latency_mode, latency_cots = "", None
        elif row == "c_gold":
            emb = model.encode_queries(refs, texts, mode="full", batch_size=batch_size, cots=gold)
            latency_mode, latency_cots = "full", gold
        else:  # b, c_fast
            emb = model.encode_queries(refs, texts, mode="fast", batch_size=batch_size)
            latency_mode, latency_cots = "fast", None
        scores = np.asarray(emb, dtype=np.float32) @ gallery.T
        result = evaluate(split, scores)
        res["metrics"] = result.metrics
        if row in ("c", "c_cot"):
            with fast_weight(model, model.config.fast_weight if row == "c" else 0.0):
                res["faithfulness"] = faithfulness(
                    model, split, gallery, cots, top1_hits(split, scores), batch_size
                )
        res["n_queries"] = result.n_queries
        res["eval_seconds"] = time.perf_counter() - t0
        if latency_n and latency_mode:
            res["query_latency_ms"] = query_latency_ms(model, split, latency_mode, latency_n, latency_cots)
        logger.info(
            "%s %s: R@1 %.2f (%.0f s)",
            split.split,
            row,
            result.metrics.get("R@1", float("nan")),
            res["eval_seconds"],
        )
        out[row] = res
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _anatomy(split: str, groups: dict[str, dict[str, float]]) -> list[str]:
    """Where (c)'s shown CoT goes wrong: exact match of each part per edit family and subset, and the
    conclusion's when the caption and the reasoning are both right."""
    from circot.data.shapes import conclusion_given_read_right

    lines = [
        "",
        f"Where the reasoning of (c) goes wrong ({split}, exact match of each part of the shown CoT, %):",
        "",
        "| group | n | caption | reasoning | conclusion | conclusion when caption and reasoning are right (n) |",
        "|---|---|---|---|---|---|",
    ]
    for group, s in groups.items():
        given, n_read = conclusion_given_read_right(s)
        lines.append(
            f"| {group.split('=', 1)[1]} | {int(s['n'])} | {_fmt(100 * s['caption_exact'])} | "
            f"{_fmt(100 * s['reasoning_exact'])} | {_fmt(100 * s['conclusion_exact'])} | "
            f"{_fmt(None if given is None else 100 * given)} ({n_read}) |"
        )
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# Results on the shapes world", ""]
    rows = report["rows"]
    meta = report["meta"]
    lines += [
        f"World: `{meta['world']}` (generator {meta.get('generator_version')}, seed {meta.get('seed')}); "
        f"machine: {meta['machine']}; torch threads {meta['threads']}.",
        "Retrieval metrics in %, over each split's whole gallery (targets, duplicates, references, unedited "
        "re-renderings, near misses, random scenes). Query latency: median ms per query at batch size 1.",
        "",
    ]
    for split in report["splits"]:
        rows = report["rows"]
        lines += [f"## {split}", ""]
        lines += [
            "| row | R@1 | R@5 | mAP@5 | caption EM | caption F1 | conclusion EM | training wall time | "
            "query latency (ms) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, label in ROWS.items():
            r = rows.get(key, {}).get(split)
            if r is None:
                continue
            m = r["metrics"]
            cot = r.get("cot", {})
            train_s = rows[key].get("train_wall_time_s")
            lines.append(
                f"| {label} | {_fmt(m.get('R@1'))} | {_fmt(m.get('R@5'))} | {_fmt(m.get('mAP@5'))} | "
                f"{_fmt(100 * cot['caption_exact']) if cot and 'caption_exact' in cot else '—'} | "
                f"{_fmt(100 * cot['caption_f1']) if cot else '—'} | {_fmt(100 * cot['conclusion_exact']) if cot else '—'} | "
                f"{_fmt(train_s / 60 if train_s else None)} min | {_fmt(r.get('query_latency_ms'))} |"
            )
        lines += ["", f"R@1 per edit family ({split}):", ""]
        fams = list(FAMILIES)
        subsets = list(SUBSETS) if split == "test-novel" else []
        header = fams + subsets
        lines += ["| row | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        for key, label in ROWS.items():
            r = rows.get(key, {}).get(split)
            if r is None:
                continue
            m = r["metrics"]
            cells = [_fmt(m.get(f"R@1|family={f}")) for f in fams] + [
                _fmt(m.get(f"R@1|subset={s}")) for s in subsets
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        c = rows.get("c", {}).get(split)
        groups = (c or {}).get("cot_per_group") or {}
        # conclusion EM per family; a table JSON written before cot_per_group (--merge) keeps its own key
        em = {g.split("=", 1)[1]: v["conclusion_exact"] for g, v in groups.items() if g.startswith("family=")}
        em = em or (c or {}).get("conclusion_exact_per_family") or {}
        if em:
            cells = [_fmt(100 * em[f]) if f in em else "—" for f in fams] + ["" for _ in subsets]
            lines.append("| (c) conclusion EM | " + " | ".join(cells) + " |")
        w, k = rows.get("c", {}).get("fast_weight"), rows.get("c", {}).get("cot_samples")
        if w or k:
            cot = "the state at the `<emb>` after its CoT"
            if k:
                cot = (
                    f"the mean of the `<emb>` embeddings of its greedy CoT and of k = {k} CoTs sampled at temperature "
                    f"{rows['c'].get('sampling_temperature')} (the model's cot_samples, chosen on val; the CoT scored "
                    + (
                        "and shown is the one of these whose own embedding best matches a gallery image, the "
                        "model's cot_choice)"
                        if rows["c"].get("cot_choice") == "gallery"
                        else "and shown is the greedy one)"
                    )
                )
            lines += [
                "",
                f"Row (c) embeds each query as the model does by default: (1 − w) × {cot} + w × its fast-mode "
                f"embedding, w = {w} (the model's fast_weight, chosen on val); (c°) embeds the same shown CoTs at "
                "`<emb>` alone (w = 0, no samples: the paper's rule). (c*) uses w as (c) does.",
            ]
        for key in ("c", "c_cot"):
            r = rows.get(key, {}).get(split)
            if not (r and r.get("faithfulness")):
                continue
            f = r["faithfulness"]
            lines += [
                "",
                f"Faithfulness of {ROWS[key].split()[0]} ({split}): P(R@1 hit | conclusion exactly right) = "
                f"{_fmt(f['p_hit_if_conclusion_right'])} % (n = {f['n_conclusion_right']}); P(R@1 hit | conclusion "
                f"wrong) = {_fmt(f['p_hit_if_conclusion_wrong'])} % (n = {f['n_conclusion_wrong']}); steering (own "
                f"gold caption and reasoning, another query's gold conclusion): that query's target first for "
                f"{_fmt(f['steering_R@1'])} %, the query's own target first for {_fmt(f['steering_own_target_R@1'])} %.",
            ]
        if groups:
            lines += _anatomy(split, groups)
        lines.append("")
    probes = [(ROWS[k], rows[k]["perception"]) for k in ("b", "c") if rows.get(k, {}).get("perception")]
    if probes:
        lines += ["## Perception probe (val images, per grid cell, %)", ""]
        lines += [
            "| model | occupancy | colour | shape | size | every cell right | at step |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, pr in probes:
            lines.append(
                f"| {label} | {_fmt(pr.get('occupancy'), 2)} | {_fmt(pr.get('color'), 2)} | {_fmt(pr.get('shape'), 2)} | "
                f"{_fmt(pr.get('size'), 2)} | {_fmt(pr.get('scene'), 2)} | {pr.get('step')} |"
            )
        lines.append("")
    lines += [
        "Notes: row (a)'s training time is the combiner's only (its frozen features were extracted beforehand) and its",
        "latency is the baseline's own measurement (mean ms per query at batch size 1: image read, EfficientNet-Lite0,",
        "MiniLM, combiner). Latencies were measured on a shared 2-core machine under load: compare them within a row",
        "group, not across runs. (c) full-mode latency includes generating the CoT (up to max_cot_tokens tokens).",
        "",
    ]
    lines += ["## Commands", "", "```", *report["meta"]["commands"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", required=True, type=Path)
    ap.add_argument("--splits", nargs="+", default=["val", "test-novel"])
    ap.add_argument("--cot-run", type=Path)
    ap.add_argument("--cot-model", type=Path)
    ap.add_argument("--cot-train-time", type=float)
    ap.add_argument("--nocot-run", type=Path)
    ap.add_argument("--nocot-model", type=Path)
    ap.add_argument("--nocot-train-time", type=float)
    ap.add_argument(
        "--late-fusion-json", type=Path, help="row (a) from benchmarks/late_fusion.py (else trained here)"
    )
    ap.add_argument("--late-fusion-cache", type=Path, help="frozen-feature cache of the late-fusion baseline")
    ap.add_argument("--skip-late-fusion", action="store_true")
    ap.add_argument("--max-queries", type=int, default=None, help="first N queries per split (default all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--latency-queries", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="JSON files of earlier runs of this script whose rows to add",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results.md"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from circot.model import CIRCoT

    splits = {}
    for name in args.splits:
        s = load_split("shapes", args.world, name)
        if args.max_queries:
            s.queries = s.queries[: args.max_queries]
        splits[name] = s
    any_split = next(iter(splits.values()))
    rows: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()

    # (a) late fusion
    if not args.skip_late_fusion:
        if args.late_fusion_json:
            lf = json.loads(args.late_fusion_json.read_text())
        else:
            from circot.baselines.late_fusion import train_and_evaluate

            lf = train_and_evaluate(
                args.world, splits=args.splits, num_threads=args.threads, cache_dir=args.late_fusion_cache
            )
        rows["a"] = {"train_wall_time_s": lf["train"]["wall_time_s"]}
        for name, r in lf["splits"].items():
            if name in splits:
                rows["a"][name] = {
                    "metrics": r["metrics"],
                    "n_queries": r["n_queries"],
                    "query_latency_ms": r.get("query_latency_ms", {}).get("total"),
                }

    # (b) no-CoT
    nocot_dir = args.nocot_model or (args.nocot_run / "model" if args.nocot_run else None)
    if nocot_dir:
        model = CIRCoT.from_pretrained(nocot_dir).eval()
        rows["b"] = {
            "model": str(nocot_dir),
            "fingerprint": model.fingerprint,
            "train_wall_time_s": _train_time(args.nocot_run, args.nocot_train_time),
            "perception": perception_probe(args.nocot_run),
        }
        for name, s in splits.items():
            rows["b"][name] = evaluate_mllm(model, s, ["b"], args.batch_size, args.latency_queries)["b"]

    # (c), (c'), (c*)
    cot_dir = args.cot_model or (args.cot_run / "model" if args.cot_run else None)
    if cot_dir:
        model = CIRCoT.from_pretrained(cot_dir).eval()
        train_s = _train_time(args.cot_run, args.cot_train_time)
        cfg = model.config
        keys = (
            ["c", "c_cot", "c_fast", "c_gold"]
            if cfg.fast_weight or cfg.cot_samples
            else ["c", "c_fast", "c_gold"]
        )
        for key in keys:
            rows[key] = {
                "model": str(cot_dir),
                "fingerprint": model.fingerprint,
                "fast_weight": cfg.fast_weight,
                "cot_samples": cfg.cot_samples,
                "sampling_temperature": cfg.sampling_temperature,
                "cot_choice": cfg.cot_choice,
                "train_wall_time_s": train_s,
                "perception": perception_probe(args.cot_run),
            }
        for name, s in splits.items():
            res = evaluate_mllm(model, s, keys, args.batch_size, args.latency_queries)
            for key, r in res.items():
                rows[key][name] = r

    import sys

    commands: list[str] = []
    for path in args.merge:
        earlier = json.loads(path.read_text())
        for key, row in earlier["rows"].items():
            rows.setdefault(key, row)
        commands += earlier["meta"]["commands"]
    commands.append("python " + " ".join(sys.argv))
    rows = {k: rows[k] for k in ROWS if k in rows}
    report = {
        "meta": {
            "world": str(args.world),
            "generator_version": any_split.conventions.get("generator_version"),
            "seed": any_split.conventions.get("seed"),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared)",
            "threads": args.threads,
            "seconds": time.perf_counter() - t_all,
            "commands": commands,
        },
        "splits": list(splits),
        "rows": rows,
    }
    atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    atomic_write_bytes(args.out, render_markdown(report).encode("utf-8"))
    logger.info("wrote %s and %s", args.out, args.json)


if __name__ == "__main__":
    main()
