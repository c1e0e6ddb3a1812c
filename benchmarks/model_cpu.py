"""CPU speed of the tiny default CIR-CoT model: gallery images/s, fast vs full query latency, batch 1 vs batched.

Random weights never write ``<emb>``, so every full-mode query generates exactly ``--cot-tokens`` tokens (set it to
the CoT length you expect; the shapes world's gold CoTs are ~40–70 tokens). Every measurement is repeated
``--repeats`` times, interleaved with the others, and the median is reported, with ratios taken inside this run.

    .venv/bin/python benchmarks/model_cpu.py --threads 1 --repeats 5 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from circot.model import CIRCoT

FALLBACK_CORPUS = [
    "a small red circle left of a big blue square",
    "make the circle green and move it to the right",
    "remove the small yellow triangle",
    "add a blue triangle below the circle",
] * 10
TEXT = "make the small red circle blue and move it to the left of the square"


def build_model(cot_tokens: int, seed: int) -> CIRCoT:
    try:
        from circot.data.shapes import corpus

        texts = list(corpus())
    except (ImportError, AttributeError):
        texts = FALLBACK_CORPUS
    return CIRCoT.tiny(tokenizer_corpus=texts, seed=seed, max_cot_tokens=cot_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cot-tokens", type=int, default=48)
    ap.add_argument("--n-gallery", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="query batch size for the batched rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (fairer on a machine shared with other jobs)",
    )
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model = build_model(args.cot_tokens, args.seed)
    rng = np.random.default_rng(args.seed)
    images = [
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)) for _ in range(args.n_gallery)
    ]
    refs, texts = images[: args.batch], [TEXT] * args.batch

    def decode_ms(lean: bool) -> float:
        model.lean_decoding = lean
        try:
            return 1000 * _time(lambda: model.generate_reasoning(refs[:1], texts[:1]))
        finally:
            model.lean_decoding = True

    cases = {
        "preprocess images/s": lambda: args.n_gallery / _time(lambda: model.images(images)),
        "gallery images/s (batch 32)": lambda: args.n_gallery / _time(lambda: model.encode_images(images)),
        "fast ms/query (batch 1)": lambda: (
            1000 * _time(lambda: model.encode_queries(refs[:1], texts[:1], "fast"))
        ),
        f"fast ms/query (batch {args.batch})": lambda: (
            1000
            * _time(lambda: model.encode_queries(refs, texts, "fast", batch_size=args.batch))
            / args.batch
        ),
        "full ms/query (batch 1)": lambda: (
            1000 * _time(lambda: model.encode_queries(refs[:1], texts[:1], "full"))
        ),
        f"full ms/query (batch {args.batch})": lambda: (
            1000
            * _time(lambda: model.encode_queries(refs, texts, "full", batch_size=args.batch))
            / args.batch
        ),
        "generate ms (batch 1, lean steps)": lambda: decode_ms(True),
        "generate ms (batch 1, transformers steps)": lambda: decode_ms(False),
    }
    for fn in cases.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeats):
        for name, fn in cases.items():
            samples[name].append(fn())
    res = {name: statistics.median(v) for name, v in samples.items()}
    b = args.batch
    ratios = {
        "full/fast latency (batch 1)": res["full ms/query (batch 1)"] / res["fast ms/query (batch 1)"],
        f"full batch 1 / batch {b} per query": res["full ms/query (batch 1)"]
        / res[f"full ms/query (batch {b})"],
        f"fast batch 1 / batch {b} per query": res["fast ms/query (batch 1)"]
        / res[f"fast ms/query (batch {b})"],
        "transformers / lean generation": res["generate ms (batch 1, transformers steps)"]
        / res["generate ms (batch 1, lean steps)"],
    }
    info = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "clock": args.clock,
        "torch": torch.__version__,
        "parameters": model.num_parameters(),
        "cot_tokens": args.cot_tokens,
        "repeats": args.repeats,
        "vocab": len(model.tokenizer),
    }
    print("| measure | value |\n|---|---|")
    for k, v in {**res, **ratios}.items():
        print(f"| {k} | {v:.2f} |")
    print(json.dumps(info))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"results": res, "ratios": ratios, "info": info}, fh, indent=2)


_clock = time.perf_counter


def _time(fn) -> float:
    t0 = _clock()
    fn()
    return _clock() - t0


if __name__ == "__main__":
    main()
