"""Retrieval benchmarks: index build speed, search latency against gallery size, end-to-end query latency.

Every speed is reported beside a baseline measured in the same run:

1. build:  ``circot.gallery.build_index`` images/s (cold: encode everything; warm: all embeddings cached) against
           the model's bare ``encode_images`` on the same images.
2. search: faiss exact inner product (``Flat``) against numpy brute force (matrix product + top-k) on random unit
           vectors, gallery 10k → 1M, d = the tiny model's width and 256, query batches of 1 and 64; optionally an
           IVF index (``--ivf``) with its recall@10 against the exact answer.
3. query:  one composed query end to end (batch 1), split into CoT generation, embedding and search, full and
           fast mode, on a small shapes gallery.
4. milvus: (``--milvus``) the Milvus store (milvus-lite, in this process) against the exact faiss store on the
           same random unit vectors, at ``--sizes`` and ``--dims``: build rate (vectors/s through
           ``circot.store.build_store``), query latency at ``--batches`` and recall@10 against exact search, for
           the FLAT (exact) and HNSW collection types.

Usage::

    .venv/bin/python benchmarks/retrieval.py --out benchmarks/results/retrieval.json

Writes JSON and prints a Markdown summary. Uses the shipped model when installed, else a random tiny model of
the same architecture (whose CoT runs to ``max_cot_tokens``: the generation figure is then an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n, step):
        x = rng.standard_normal((min(step, n - s), d), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def numpy_topk(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: scores by one matrix product, top-k by argpartition then a sort of the k."""
    scores = queries @ gallery.T
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)


# ------------------------------------------------------------------------------------------------ search
def bench_search(sizes, dims, batches, k, repeats, ivf, seed=0) -> list[dict]:

    from circot.index import GalleryIndex

    rng = np.random.default_rng(seed)
    rows = []
    for d in dims:
        for n in sizes:
            gallery = _unit(n, d, rng)
            index = GalleryIndex.create(d, "bench")
            t0 = time.perf_counter()
            index.add(gallery, [str(i) for i in range(n)])
            add_s = time.perf_counter() - t0
            approx = None
            if ivf and n >= 100_000:
                nlist = int(4 * np.sqrt(n))
                approx = GalleryIndex.create(d, "bench", factory=f"IVF{nlist},Flat")
                sample = gallery[rng.choice(n, min(n, 40 * nlist), replace=False)]
                t0 = time.perf_counter()
                approx.train(sample)
                approx.add(gallery, [str(i) for i in range(n)])
                approx_build_s = time.perf_counter() - t0
                approx.set_search_params(nprobe=16)
            for b in batches:
                q = _unit(b, d, rng)
                faiss_s = _timeit(lambda q=q, ix=index: ix.faiss_index.search(q, k), repeats)
                wrapper_s = _timeit(lambda q=q, ix=index: ix.search(q, k), repeats)
                numpy_s = _timeit(lambda q=q, g=gallery: numpy_topk(g, q, k), repeats)
                f_rows = index.faiss_index.search(q, k)[1]
                n_rows = numpy_topk(gallery, q, k)[1]
                agree = float(
                    np.mean([len(set(a) & set(bb)) / k for a, bb in zip(f_rows, n_rows, strict=True)])
                )
                row = {
                    "d": d,
                    "n": n,
                    "batch": b,
                    "k": k,
                    "faiss_flat_ms": faiss_s * 1e3,
                    "gallery_index_ms": wrapper_s * 1e3,
                    "numpy_ms": numpy_s * 1e3,
                    "numpy_over_faiss": numpy_s / faiss_s,
                    "wrapper_overhead": wrapper_s / faiss_s,
                    "top_k_agreement": agree,
                    "add_s": add_s,
                    "scan_gb_per_s": n * d * 4 / faiss_s / 1e9,
                }
                if approx is not None:
                    ivf_s = _timeit(lambda q=q, ix=approx: ix.faiss_index.search(q, k), repeats)
                    a_rows = approx.faiss_index.search(q, k)[1]
                    row.update(
                        {
                            "ivf_factory": approx.manifest.factory,
                            "ivf_nprobe": 16,
                            "ivf_ms": ivf_s * 1e3,
                            "flat_over_ivf": faiss_s / ivf_s,
                            "ivf_build_s": approx_build_s,
                            "ivf_recall_at_k": float(
                                np.mean(
                                    [len(set(a) & set(bb)) / k for a, bb in zip(a_rows, f_rows, strict=True)]
                                )
                            ),
                        }
                    )
                rows.append(row)
                print(
                    f"  search d={d} n={n} batch={b}: faiss {row['faiss_flat_ms']:.2f} ms, "
                    f"numpy {row['numpy_ms']:.2f} ms (x{row['numpy_over_faiss']:.2f})",
                    file=sys.stderr,
                )
            del gallery, index, approx
    return rows


# ------------------------------------------------------------------------------------------------ milvus
# collection type -> (build options, search options to measure on the same collection)
MILVUS_INDEXES = {
    "FLAT": ("", {"": ""}),
    "HNSW": ("&index=HNSW&M=16&efConstruction=200", {"ef=64": "&ef=64", "ef=512": "&ef=512"}),
}


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


def _measure(store, batch_q, k, repeats, recall_q, truth) -> dict:
    row = {f"batch{b}_ms": _timeit(lambda q=q: store.search(q, k), repeats) * 1e3 for b, q in batch_q.items()}
    row["recall_at_k"] = _recall(store.search(recall_q, k)[1], truth)
    return row


def bench_milvus(sizes, dims, batches, k, repeats, work: Path, seed=0, n_recall=256) -> list[dict]:
    """Per (d, n): the exact faiss store (baseline) and milvus-lite collections, all through circot.store."""
    from circot.store import build_store, open_store

    rng = np.random.default_rng(seed)
    rows = []
    for d in dims:
        for n in sizes:
            gallery = _unit(n, d, rng)
            ids = [str(i) for i in range(n)]
            recall_q = _unit(n_recall, d, rng)
            truth = numpy_topk(gallery, recall_q, k)[1].astype(str)
            batch_q = {b: _unit(b, d, rng) for b in batches}
            stores = {"faiss Flat (exact)": (str(work / f"faiss-{d}-{n}"), {"": ""})}
            for name, (build_options, searches) in MILVUS_INDEXES.items():
                uri = f"milvus-lite://{work / f'm-{d}-{n}.db'}?collection=c{name}{build_options}"
                stores[f"milvus-lite {name}"] = (uri, searches)
            group = []
            for name, (uri, searches) in stores.items():
                t0 = time.perf_counter()
                with build_store(uri, d, "bench") as store:
                    store.add(gallery, ids)
                build_s = time.perf_counter() - t0
                for label, options in searches.items():
                    store = open_store(uri + options)
                    row = {"d": d, "n": n, "k": k, "store": f"{name} {label}".strip(), "build_s": build_s}
                    row["build_vectors_per_s"] = n / build_s
                    row.update(_measure(store, batch_q, k, repeats, recall_q, truth))
                    if hasattr(store, "close"):
                        store.close()
                    group.append(row)
                    print(
                        f"  milvus d={d} n={n} {row['store']}: build {row['build_vectors_per_s']:.0f} vectors/s, "
                        + ", ".join(f"batch {b} {row[f'batch{b}_ms']:.2f} ms" for b in batches)
                        + f", recall@{k} {row['recall_at_k']:.3f}",
                        file=sys.stderr,
                    )
            base = group[0]  # exact faiss
            for r in group:
                for b in batches:
                    r[f"batch{b}_over_faiss"] = r[f"batch{b}_ms"] / base[f"batch{b}_ms"]
                r["build_faiss_over_this"] = base["build_vectors_per_s"] / r["build_vectors_per_s"]
            rows += group
            del gallery
    return rows


# ------------------------------------------------------------------------------------------------ model
def _model():
    from circot.loading import default_model_path
    from circot.model import CIRCoT

    if (default_model_path() / "circot_config.json").is_file():
        return CIRCoT.from_pretrained(None), "shipped shapes-tiny"
    return CIRCoT.tiny(seed=0), "random tiny (untrained; same architecture as the shipped model)"


def bench_build(model, world: Path, work: Path, batch_size: int, repeats: int) -> dict:
    from circot.data.shapes import load
    from circot.gallery import build_index

    split = load(world, "test")
    paths = [str(split.gallery.paths[i]) for i in split.gallery.ids]
    n = len(paths)
    bare_s = _timeit(lambda: model.encode_images(paths, batch_size=batch_size), repeats)
    cold = []
    for r in range(repeats):
        t0 = time.perf_counter()
        build_index(
            model, split.gallery, work / f"ix-cold-{r}", cache_dir=work / f"cache-{r}", batch_size=batch_size
        )
        cold.append(time.perf_counter() - t0)
    cold_s = statistics.median(cold)
    warm_s = _timeit(
        lambda: build_index(
            model, split.gallery, work / "ix-warm", cache_dir=work / "cache-0", batch_size=batch_size
        ),
        repeats,
    )
    return {
        "images": n,
        "batch_size": batch_size,
        "encode_images_per_s": n / bare_s,
        "build_cold_images_per_s": n / cold_s,
        "build_warm_images_per_s": n / warm_s,
        "cold_over_bare": cold_s / bare_s,
        "bare_over_warm": bare_s / warm_s,
    }


def bench_query(model, world: Path, work: Path, n_queries: int) -> dict:
    from circot.data.shapes import load
    from circot.gallery import build_index
    from circot.search import search_query

    split = load(world, "test")
    index = build_index(model, split.gallery, work / "ix-q", cache_dir=work / "cache-0")
    out = {}
    for mode in ("full", "fast"):
        parts = {"cot_s": [], "embed_s": [], "search_s": [], "total_s": []}
        tokens = []
        queries = split.queries[: n_queries + 1]
        for i, q in enumerate(queries):
            r = search_query(model, index, split.image_path(q.reference), q.text, k=10, mode=mode)
            if i == 0:
                continue  # warm-up
            for key in parts:
                parts[key].append(r.timings[key])
            if r.cot is not None:
                tokens.append(len(model.tokenizer(r.cot.raw, add_special_tokens=False)["input_ids"]))
        med = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
        out[mode] = {
            "queries": len(parts["total_s"]),
            "cot_ms": med["cot_s"],
            "embed_ms": med["embed_s"],
            "search_ms": med["search_s"],
            "total_ms": med["total_s"],
            "cot_tokens": statistics.median(tokens) if tokens else 0,
            "gallery": len(index),
        }
    out["full_over_fast"] = out["full"]["total_ms"] / out["fast"]["total_ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", default="10000,100000,1000000", help="gallery sizes of the search and milvus parts"
    )
    ap.add_argument("--dims", default="", help="comma-separated; default: the tiny model's width and 256")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/faiss/BLAS threads (default 1: on a shared machine extra threads spin and slow torch down)",
    )
    ap.add_argument("--ivf", action="store_true", help="also an IVF index (n >= 100k) with its recall")
    ap.add_argument(
        "--milvus", action="store_true", help="also the Milvus store (milvus-lite) against exact faiss"
    )
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: search,build,query")
    ap.add_argument("--queries", type=int, default=10, help="end-to-end queries per mode")
    ap.add_argument("--world-queries", type=int, default=48, help="shapes test queries (gallery ~6x)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # before numpy's BLAS starts its threads
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    try:  # numpy's BLAS was loaded with the module: limit its pool too when threadpoolctl is around
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {
        "command": "python benchmarks/retrieval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": threads,
            "platform": platform.platform(),
            "load_avg_start": os.getloadavg(),
        },
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    model = None
    if not {"build", "query"} <= skip:
        model, model_name = _model()
        result["model"] = {"name": model_name, "fingerprint": model.fingerprint, "dim": model.embedding_dim}
    dims = [int(x) for x in args.dims.split(",") if x] or [model.embedding_dim if model else 128, 256]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if model is not None:
            from circot.data.shapes import generate

            world = generate(work / "world", seed=1, n_train=0, n_val=0, n_test=args.world_queries, n_novel=0)
            if "build" not in skip:
                print("build...", file=sys.stderr)
                result["build"] = bench_build(model, world, work, 32, max(1, args.repeats // 2))
            if "query" not in skip:
                print("query...", file=sys.stderr)
                result["query"] = bench_query(model, world, work, args.queries)
        if "search" not in skip:
            print("search...", file=sys.stderr)
            result["search"] = bench_search(
                [int(x) for x in args.sizes.split(",")],
                dims,
                [int(x) for x in args.batches.split(",")],
                args.k,
                args.repeats,
                args.ivf,
            )
        if args.milvus:
            print("milvus...", file=sys.stderr)
            import pymilvus

            result["pymilvus"] = pymilvus.__version__
            result["milvus"] = bench_milvus(
                [int(x) for x in args.sizes.split(",")],
                dims,
                [int(x) for x in args.batches.split(",")],
                args.k,
                args.repeats,
                work,
            )
    result["machine"]["load_avg_end"] = os.getloadavg()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"`{r['command']}` — {r['machine']['cpus']} CPUs, {r['machine']['threads']} threads, "
        f"load average {r['machine']['load_avg_start'][0]:.1f} → {r['machine']['load_avg_end'][0]:.1f}"
    ]
    if "model" in r:
        lines.append(f"model: {r['model']['name']} (d={r['model']['dim']})")
    if "build" in r:
        b = r["build"]
        lines += [
            "",
            "| index build | images/s | ratio |",
            "|---|---:|---:|",
            f"| bare `encode_images` (baseline) | {b['encode_images_per_s']:.0f} | 1.00 |",
            f"| `build_index`, cold (hash + encode + cache + faiss + save) | {b['build_cold_images_per_s']:.0f} "
            f"| {1 / b['cold_over_bare']:.2f} |",
            f"| `build_index`, warm (all cached) | {b['build_warm_images_per_s']:.0f} | {b['bare_over_warm']:.1f} |",
        ]
    if "search" in r:
        lines += [
            "",
            "| d | gallery | batch | numpy ms (baseline) | faiss Flat ms | numpy / faiss | `GalleryIndex.search` ms "
            "| numpy / GalleryIndex | IVF ms (recall@10 vs exact) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for s in r["search"]:
            ivf = f"{s['ivf_ms']:.2f} ({s['ivf_recall_at_k']:.2f})" if "ivf_ms" in s else ""
            lines.append(
                f"| {s['d']} | {s['n']:,} | {s['batch']} | {s['numpy_ms']:.2f} | {s['faiss_flat_ms']:.2f} | "
                f"{s['numpy_over_faiss']:.2f} | {s['gallery_index_ms']:.2f} | "
                f"{s['numpy_ms'] / s['gallery_index_ms']:.2f} | {ivf} |"
            )
    if "milvus" in r:
        batches = sorted(
            int(key[5:-3]) for key in r["milvus"][0] if key.startswith("batch") and key.endswith("_ms")
        )
        lines += [
            "",
            "| d | gallery | store | build vectors/s | faiss build rate / this | "
            + " | ".join(f"batch {b} ms | / faiss" for b in batches)
            + f" | recall@{r['milvus'][0]['k']} vs exact |",
            "|---:|---:|---|---:|---:|" + "---:|---:|" * len(batches) + "---:|",
        ]
        for m in r["milvus"]:
            lines.append(
                f"| {m['d']} | {m['n']:,} | {m['store']} | {m['build_vectors_per_s']:,.0f} | "
                f"{m['build_faiss_over_this']:.1f} | "
                + " | ".join(f"{m[f'batch{b}_ms']:.2f} | {m[f'batch{b}_over_faiss']:.1f}" for b in batches)
                + f" | {m['recall_at_k']:.3f} |"
            )
    if "query" in r:
        q = r["query"]
        lines += [
            "",
            "| mode | CoT generation ms | embedding ms | search ms | total ms | CoT tokens |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for mode in ("full", "fast"):
            m = q[mode]
            lines.append(
                f"| {mode} | {m['cot_ms']:.1f} | {m['embed_ms']:.1f} | {m['search_ms']:.2f} | "
                f"{m['total_ms']:.1f} | {m['cot_tokens']:.0f} |"
            )
        lines.append(f"\nfull / fast: {q['full_over_fast']:.1f}x (gallery of {q['full']['gallery']} images)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
