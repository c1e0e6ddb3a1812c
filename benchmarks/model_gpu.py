"""What a user pays at real size: a Qwen2.5-VL-3B-shaped CIR-CoT model (random weights, bf16) on one GPU.

Reports gallery images/s, fast- and full-mode query latency (full = a ``--cot-tokens`` CoT, 128 by default; random
weights never write ``<emb>``, so every query generates exactly that many tokens), batched full-mode throughput and
peak GPU memory. Medians over ``--repeats``. Needs a CUDA GPU with ~12 GB free; ``--smoke`` runs a scaled-down
config on any device (a check that the script works, not a measurement).

    python benchmarks/model_gpu.py [--json out.json]
    python benchmarks/model_gpu.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from circot.config import CIRCoTConfig
from circot.model import CIRCoT
from circot.processing import make_image_processor
from circot.tokenizer import train_bpe_tokenizer

# Qwen2.5-VL-3B-Instruct's published shape (text 2048×36, GQA 16/2; vision 1280×32, window attention).
QWEN25_VL_3B = {
    "text": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
    },
}
SMOKE = {
    "text": {**QWEN25_VL_3B["text"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}},
    "vision": {**QWEN25_VL_3B["vision"], "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
               "out_hidden_size": 64, "fullatt_block_indexes": [1]},
}  # fmt: skip
CORPUS = [
    "a woman in a red dress",
    "make the dress blue and sleeveless",
    "a dog on a sofa",
    "remove the hat",
] * 20


def build(shape: dict, image_size: int, device: str, dtype: torch.dtype, cot_tokens: int) -> CIRCoT:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = train_bpe_tokenizer(CORPUS, vocab_size=512)
    ids = tokenizer.get_vocab()
    text = {
        **shape["text"],
        "vocab_size": max(shape["text"]["vocab_size"], len(tokenizer)),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    hf_config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=shape["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(hf_config, dtype=dtype)
    hf.eval()
    pixels = image_size * image_size
    config = CIRCoTConfig(
        base_model="random Qwen2.5-VL-3B shape",
        model_type="qwen2_5_vl",
        min_pixels=pixels,
        max_pixels=pixels,
        max_cot_tokens=cot_tokens,
    )
    return CIRCoT(hf, tokenizer, make_image_processor(pixels, pixels), config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--image-size", type=int, default=448, help="square images; 448 px = 256 visual tokens")
    ap.add_argument("--cot-tokens", type=int, default=128)
    ap.add_argument("--n-gallery", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--smoke", action="store_true", help="scaled-down config: checks the script, measures nothing"
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cuda = args.device.startswith("cuda")
    shape = SMOKE if args.smoke else QWEN25_VL_3B
    model = build(shape, args.image_size, args.device, dtype, args.cot_tokens)
    rng = np.random.default_rng(0)
    size = (args.image_size, args.image_size, 3)
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for _ in range(args.n_gallery)]
    refs, texts = images[: args.batch], ["make the dress blue and sleeveless"] * args.batch

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    b = args.batch
    cases = {
        "gallery images/s (batch 32)": lambda: args.n_gallery / timed(lambda: model.encode_images(images)),
        "fast ms/query (batch 1)": lambda: (
            1000 * timed(lambda: model.encode_queries(refs[:1], texts[:1], "fast"))
        ),
        f"full ms/query (batch 1, {args.cot_tokens}-token CoT)": lambda: (
            1000 * timed(lambda: model.encode_queries(refs[:1], texts[:1], "full"))
        ),
        f"full ms/query (batch {b}, {args.cot_tokens}-token CoT)": lambda: (
            1000 * timed(lambda: model.encode_queries(refs, texts, "full", batch_size=b)) / b
        ),
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for fn in cases.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            samples[name].append(fn())
    res = {k: statistics.median(v) for k, v in samples.items()}
    full1 = res[f"full ms/query (batch 1, {args.cot_tokens}-token CoT)"]
    res["full/fast latency (batch 1)"] = full1 / res["fast ms/query (batch 1)"]
    res["ms per generated token (batch 1)"] = full1 / args.cot_tokens
    info = {
        "device": torch.cuda.get_device_name() if cuda else args.device,
        "dtype": args.dtype,
        "parameters": model.num_parameters(),
        "image_size": args.image_size,
        "smoke": args.smoke,
        "torch": torch.__version__,
    }
    if cuda:
        info["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("| measure | value |\n|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.2f} |")
    print(json.dumps(info))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"results": res, "info": info}, fh, indent=2)


if __name__ == "__main__":
    main()
