"""Real backbone sizes on this machine: LoRA training steps, adapter save/reload, gallery and query encoding.

    python benchmarks/real_size.py --config qwen2.5-vl-3b                 # one LoRA step of each stage kind
    python benchmarks/real_size.py --config qwen2-vl-2b --threads 2 --out benchmarks/results/real_size_qwen2-vl-2b.json
    python benchmarks/real_size.py --config qwen2.5-vl-7b --device cuda   # the GPU check

``--config`` names a file of ``configs/backbones/`` (the published config.json of that checkpoint) or is a path.
The model is built with random weights in bf16 (:meth:`circot.model.CIRCoT.from_config`, in a child process so
that its memory is not counted twice) and saved as a model directory. Then, in this process, circot's own
``Trainer`` loads it as a user's config would (``model.init`` = that directory, bf16, LoRA r 64 / alpha 128 as
in configs/*-lora.yaml, gradient checkpointing) and trains one stage of each kind for ``--steps`` optimizer
steps at batch ``--batch`` on a small generated shapes world:

- ``fast``: InfoNCE on the fast form (gallery passes for targets and references);
- ``full``: teacher-forced gold CoT, CE + InfoNCE;
- ``caption``: identity rows, CE only.

The trainer saves the LoRA adapter; the script reloads it from disk over the saved base, checks that 4 gallery
images embed the same as in the trained model, and answers one full-mode query with a CoT of at most
``--cot-tokens`` tokens (random weights rarely close the CoT themselves, so that is its length).

Recorded: peak RSS (this process, after training and at the end, the trained model freed before the reload;
the build's child apart), seconds per optimizer step per kind, trainable and
total parameter counts, the adapter's size on disk, the embedding time of 4 images and the query time.
On ``--device cuda``, peak GPU memory too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKBONES = REPO / "configs" / "backbones"
KINDS = {
    "fast": {"mode": "fast", "lambda_txt": 0.0, "lambda_info": 1.0},
    "full": {"mode": "full", "lambda_txt": 1.0, "lambda_info": 1.0},
    "caption": {"mode": "full", "lambda_txt": 1.0, "lambda_info": 0.0, "identity_prob": 1.0},
}
LORA = {"r": 64, "alpha": 128, "dropout": 0.05}  # configs/*-lora.yaml (LamRA's range)


def _rss_gib(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 2**20, 2)  # ru_maxrss is in KiB on Linux


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix != ".json":
        path = BACKBONES / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BACKBONES.glob("*.json")))
        raise SystemExit(f"{name}: no such backbone config (known: {known})")
    return path


def build(config: Path, out: Path, image_size: int, threads: int) -> dict:
    """Child process: random weights of the real shape, saved as a circot model directory."""
    import torch

    from circot.model import CIRCoT

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = CIRCoT.from_config(config, dtype="bfloat16", image_size=image_size)
    built = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.hf.parameters())
    t0 = time.perf_counter()
    model.save_pretrained(out)
    return {
        "build_s": round(built, 1),
        "save_s": round(time.perf_counter() - t0, 1),
        "parameters": n_params,
        "build_peak_rss_gib": _rss_gib(),
    }


def _world(tmp: Path) -> Path:
    from circot.data import shapes

    return shapes.generate(tmp / "world", seed=0, n_train=16, n_val=4, n_test=0, n_novel=0)


def run(args: argparse.Namespace) -> dict:
    import torch

    from circot.data import load_split
    from circot.model import CIRCoT
    from circot.search import embed_queries
    from circot.train.config import TrainConfig
    from circot.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    config = _config_path(args.config)
    tmp = Path(tempfile.mkdtemp(prefix="circot-real-size-", dir=args.workdir))
    base = tmp / "base"
    result: dict = {
        "config": config.stem,
        "device": args.device,
        "threads": args.threads,
        "batch": args.batch,
        "steps_per_kind": args.steps,
        "image_size": args.image_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    # 1. the random model, built and saved by a child process
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child-build",
            str(config),
            str(base),
            str(args.image_size),
            str(args.threads),
        ],
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        raise SystemExit(f"building {config.stem} failed:\n{child.stderr[-3000:]}")
    result["build"] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"built {config.stem}: {result['build']}", file=sys.stderr, flush=True)
    # 2. circot's Trainer on that directory, LoRA, one stage per kind
    world = _world(tmp)
    stages = [
        {"name": kind, "steps": args.steps, "lr": 1e-4, "warmup": 0, **spec} for kind, spec in KINDS.items()
    ]
    cfg = TrainConfig.from_dict(
        {
            "run_dir": str(tmp / "run"),
            "seed": 0,
            "num_threads": args.threads,
            "model": {
                "init": str(base),
                "dtype": "bfloat16",
                "overrides": {"lora": LORA, "gradient_checkpointing": True, "max_cot_tokens": 192},
            },
            "data": {"dataset": "shapes", "root": str(world), "val_split": None, "identity_fraction": 0.25},
            "optim": {"batch_size": args.batch, "max_grad_norm": 1.0, "mixed_precision": "bf16"},
            "loss": {"symmetric": True, "hard_negatives": 1},
            "stages": stages,
            "eval": {"every": 0},
            "log_every": 1,
            "save_every": 0,
        }
    )
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    out = trainer.run()
    result["train_wall_s"] = round(time.perf_counter() - t0, 1)
    model = trainer.model
    result["parameters"] = sum(p.numel() for p in model.model.parameters())
    result["trainable_parameters"] = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    per_step = [1.0 / r["train/steps_per_s"] for r in out.history]
    result["s_per_step"] = {
        kind: round(sum(per_step[i * args.steps : (i + 1) * args.steps]) / args.steps, 2)
        for i, kind in enumerate(KINDS)
    }
    result["train_peak_rss_gib"] = _rss_gib()
    adapter = out.model_dir
    result["adapter_files_mib"] = {
        p.name: round(p.stat().st_size / 2**20, 2) for p in sorted(adapter.iterdir()) if p.is_file()
    }
    result["adapter_mib"] = round(sum(p.stat().st_size for p in adapter.glob("adapter_model*")) / 2**20, 2)
    # 3. the adapter reloads over the saved base and embeds as the trained model does
    images = load_split("shapes", world, "train").gallery.paths
    four = [images[k] for k in sorted(images)[:4]]
    model.eval()
    with torch.no_grad():
        trained = model.encode_images(four, batch_size=4)
    trainer.accelerator.free_memory()  # the accelerator holds the model and optimizer too
    del model, trainer, out
    gc.collect()
    t0 = time.perf_counter()
    reloaded = CIRCoT.from_pretrained(
        adapter, device=args.device, dtype="bfloat16", max_cot_tokens=args.cot_tokens
    )
    result["reload_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    again = reloaded.encode_images(four, batch_size=4)
    result["embed_4_images_s"] = round(time.perf_counter() - t0, 2)
    result["reload_max_abs_diff"] = float(abs(again - trained).max())
    # 4. one full-mode query: the CoT, then the embedding at the <emb> that closes it
    t0 = time.perf_counter()
    q = embed_queries(reloaded, [four[0]], ["make it blue"], mode="full", batch_size=1)
    result["full_query_s"] = round(time.perf_counter() - t0, 2)
    # tokens decoded (random weights mostly pick ids beyond the small tokenizer, which decode to no text)
    result["full_query_cot_tokens"] = len(q.cots[0].token_ids or []) if q.cots[0] else 0
    result["peak_rss_gib"] = _rss_gib()
    if args.device == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-build":
        config, out, size, threads = sys.argv[2:6]
        print(json.dumps(build(Path(config), Path(out), int(size), int(threads))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="configs/backbones/NAME.json or a config.json path")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per stage kind")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cot-tokens", type=int, default=32)
    parser.add_argument(
        "--workdir", default=None, help="where the model directory is written (default: TMPDIR)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the model, adapter and world")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
