"""Images per hour that one process encodes into a gallery: the shipped shapes model, at 1 and 2 threads.

Times :func:`circot.gallery.encode_gallery` with no cache, the path that ``circot index build`` and
``circot eval`` run for every gallery image (read and hash the file, decode, preprocess, one forward of the
image prompt), over the gallery images of a generated shapes world. With ``--queries N`` it also times N
full-mode queries (caption → reasoning → conclusion generated, embedded at ``<emb>``) through
:func:`circot.search.embed_queries`, the query path of ``circot eval``. Each thread count is measured
``--repeats`` times, interleaved, and the median is reported; the ratio of the two thread counts is taken
inside this run.

    .venv/bin/python benchmarks/encode_rate.py --images 256 --queries 32 --repeats 3 [--json out.json]

Sharded runs (``torchrun --nproc_per_node N -m circot index build ...``) encode N such shards at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from circot.data.shapes import generate, load
from circot.gallery import encode_gallery
from circot.search import embed_queries, load_model


def _world(folder: Path, n_images: int) -> tuple[list[Path], list[Path], list[str]]:
    """Gallery image paths (at least ``n_images``) and the val queries of a generated shapes world."""
    n_val = 8
    while True:
        root = generate(folder / f"w{n_val}", n_train=0, n_val=n_val, n_test=0, n_novel=0)
        split = load(root, "val")
        gallery = [Path(split.gallery.paths[i]) for i in split.gallery.ids]
        if len(gallery) >= n_images:
            images = [Path(split.image_path(q.reference)) for q in split.queries]
            return gallery[:n_images], images, [q.text for q in split.queries]
        n_val *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    ap.add_argument("--images", type=int, default=256, help="gallery images per measurement")
    ap.add_argument("--queries", type=int, default=32, help="full-mode queries per measurement (0: none)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--batch-size", type=int, default=32, help="gallery images per forward")
    ap.add_argument("--query-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    load_before = os.getloadavg()[0]
    model = load_model(args.model, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        gallery, q_images, q_texts = _world(Path(tmp), args.images)
        n_q = min(args.queries, len(q_texts))
        encode_gallery(model, gallery[:8], None, args.batch_size, rank=0, world_size=1)  # warm-up
        runs: dict[int, dict[str, list[float]]] = {t: {"gallery_s": [], "queries_s": []} for t in threads}
        for _ in range(args.repeats):
            for t in threads:
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                encode_gallery(model, gallery, None, args.batch_size, rank=0, world_size=1)
                runs[t]["gallery_s"].append(time.perf_counter() - t0)
                if n_q:
                    t0 = time.perf_counter()
                    embed_queries(
                        model, [str(p) for p in q_images[:n_q]], q_texts[:n_q], "full",
                        batch_size=args.query_batch_size,
                    )  # fmt: skip
                    runs[t]["queries_s"].append(time.perf_counter() - t0)
    rows = []
    for t in threads:
        g = statistics.median(runs[t]["gallery_s"])
        row = {
            "threads": t,
            "gallery_images_per_s": round(len(gallery) / g, 2),
            "gallery_images_per_hour": round(3600 * len(gallery) / g),
        }
        if n_q:
            q = statistics.median(runs[t]["queries_s"])
            row["full_queries_per_hour"] = round(3600 * n_q / q)
        rows.append(row)
    result = {
        "model": args.model or "shipped shapes model",
        "fingerprint": model.fingerprint,
        "images": len(gallery),
        "queries": n_q,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }
    if len(rows) > 1:
        result["gallery_speed_ratio"] = round(
            rows[-1]["gallery_images_per_s"] / rows[0]["gallery_images_per_s"], 2
        )
    print("| threads | gallery images/s | gallery images/hour | full-mode queries/hour |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['gallery_images_per_s']} | {r['gallery_images_per_hour']:,} | "
            f"{r.get('full_queries_per_hour', '-'):,} |"
        )
    if "gallery_speed_ratio" in result:
        print(f"gallery: {threads[-1]} threads / {threads[0]} thread(s) = {result['gallery_speed_ratio']}x")
    print(f"1-minute load average before / after: {result['load_average_1min_before_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
