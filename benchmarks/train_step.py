"""Training throughput: optimizer steps/s per kind of step, today's code against a baseline commit, in one run.

    python benchmarks/train_step.py --root data/shapes                      # baseline f7e6048 vs the work tree
    python benchmarks/train_step.py --root data/shapes --threads 1 2 --steps 12 --out benchmarks/results/train_step.json

For each code version (the baseline is checked out into a temporary git worktree and run in a subprocess with
its own ``src`` first on the path), each thread count and each kind of step, the script builds the tiny shapes
model (vision depth 4, batch 48) through that version's own ``Trainer``, runs warm-up steps until every
training image of a small fixed subset has been seen once (so that in-memory caches are warm, as they are after
the first epoch of a real run), then times ``--steps`` optimizer steps. Kinds:

- ``fast``: fast form, InfoNCE with the references as hard negatives (two gallery passes per step);
- ``full``: the default recipe's joint step (teacher-forced gold CoT, CE + InfoNCE, 20 % fast rows);
- ``caption``: captioning (identity rows, CE only, no gallery pass);
- ``perception`` (new code only): vision tower + perception head.

Variants of the new code switch one lever at a time (``--variants``): ``fp32`` (no bf16 autocast),
``vision-trained`` (the vision tower trains, no feature cache), ``groups-1`` (no length grouping), ``groups-3`` (three length groups instead of two), ``sdpa`` (the
language model's SDPA attention instead of eager), ``compile`` (``torch.compile`` of the language model,
dynamic shapes; its compilation happens in the warm-up steps). The profile splits the wall time of the timed ``full`` steps into image
preprocessing, vision tower, language model, loss and backward (wrappers around the model's methods; the
remainder is optimizer and bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("fast", "full", "caption", "perception")
BASE_STAGES = {
    "fast": {"name": "fast", "mode": "fast", "lambda_txt": 0.0, "lambda_info": 1.0},
    "full": {"name": "full", "mode": "full", "lambda_txt": 1.0, "lambda_info": 1.0, "fast_fraction": 0.2},
    "caption": {
        "name": "caption",
        "mode": "full",
        "lambda_txt": 1.0,
        "lambda_info": 0.0,
        "identity_prob": 1.0,
    },
    "perception": {"name": "perception", "mode": "perception"},
}
# what the new code's default recipe adds to every language-model step
NEW_RECIPE = {"freeze": ["model.model.visual"]}
VARIANTS = {
    "new": {},
    "fp32": {"mixed_precision": "no"},
    "vision-trained": {"freeze": []},
    "groups-1": {"length_groups": 1},
    "sdpa": {"attn": "sdpa"},
    "groups-3": {"length_groups": 3},
    "compile": {"compile": True},
}


# ----------------------------------------------------------------------------------------------- one measurement
def measure(root: str, kind: str, threads: int, steps: int, new: bool, variant: dict) -> dict:
    """Runs inside the process of one code version: time ``steps`` optimizer steps of one kind."""
    import random

    import torch

    from circot.train.config import TrainConfig
    from circot.train.data import ExampleDataset, StepBatchSampler, collate
    from circot.train.trainer import Trainer

    torch.set_num_threads(threads)
    stage = {**BASE_STAGES[kind], "steps": 10_000, "lr": 1e-3}
    optim = {"batch_size": 48, "max_grad_norm": 1.0}
    if new:
        if kind != "perception":
            stage["freeze"] = variant.get("freeze", NEW_RECIPE["freeze"])
        optim["mixed_precision"] = variant.get("mixed_precision", "bf16")
        optim["length_groups"] = variant.get("length_groups", 2)
    n_queries = 240  # 5 batches: warm-up covers every image once
    run_dir = tempfile.mkdtemp(prefix="circot-bench-")
    cfg = TrainConfig.from_dict(
        {
            "run_dir": run_dir,
            "seed": 0,
            "num_threads": threads,
            "model": {"init": "tiny", "overrides": {"vision_depth": 4, "max_cot_tokens": 192}},
            "data": {"dataset": "shapes", "root": root, "val_split": None, "max_train_queries": n_queries},
            "optim": optim,
            "loss": {"symmetric": True, "hard_negatives": 1},
            "stages": [stage],
            "eval": {"every": 0},
            "save_every": 0,
        }
    )
    tr = Trainer(cfg)
    tr._load_data()
    if kind == "perception":
        tr.perception_train = tr.perception_train.head(n_queries * 2)
    tr._setup_model(0)
    if new:
        tr.model.hf.set_attn_implementation({"text_config": variant.get("attn", "eager")})
    if variant.get("compile"):
        tr.model.hf.model.language_model.compile(dynamic=True)
    tr._enter_stage(0, fresh=True)
    st = cfg.stages[0]
    model = tr.model
    model.train()
    loader = iter(
        torch.utils.data.DataLoader(
            ExampleDataset(tr.examples),
            batch_sampler=StepBatchSampler(len(tr.examples), 48, 0, 10**6, seed=0),
            collate_fn=collate,
        )
    )
    timers = {"preprocess": 0.0, "vision": 0.0, "language model": 0.0, "loss": 0.0, "backward": 0.0}

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t0

        setattr(obj, name, wrapper)

    class TimedImages(type(model.images)):  # a special method is looked up on the type, not the instance
        def __call__(self, images):
            t0 = time.perf_counter()
            try:
                return super().__call__(images)
            finally:
                timers["preprocess"] += time.perf_counter() - t0

    model.images.__class__ = TimedImages
    timed(model, "_image_features", "vision")
    timed(model, "_hidden", "language model")
    timed(tr.info_nce, "forward", "loss")
    timed(tr.cross_entropy, "forward", "loss")
    if hasattr(tr.cross_entropy, "over_batches"):
        timed(tr.cross_entropy, "over_batches", "loss")

    def one(step: int) -> None:
        batch = next(loader)
        if kind == "perception":
            losses = tr._perception_step(step)
        else:
            losses = tr._micro_step(batch, st, random.Random(step))
        t0 = time.perf_counter()
        tr.accelerator.backward(losses["total"])
        timers["backward"] += time.perf_counter() - t0
        tr.accelerator.clip_grad_norm_(tr.forward.parameters(), 1.0)
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)

    warm = (n_queries * (2 if kind == "perception" else 1)) // 48 + 1
    for s in range(warm):
        one(s)
    for k in timers:
        timers[k] = 0.0
    t0 = time.perf_counter()
    for s in range(warm, warm + steps):
        one(s)
    wall = time.perf_counter() - t0
    profile = {k: round(v / steps, 4) for k, v in timers.items()}
    profile["other"] = round(wall / steps - sum(profile.values()), 4)
    return {"steps_per_s": round(steps / wall, 4), "s_per_step": round(wall / steps, 4), "profile_s": profile}


# ----------------------------------------------------------------------------------------------- orchestration
def _run_version(src: Path, args: argparse.Namespace, new: bool, variant_name: str, kind: str, threads: int):
    payload = json.dumps(
        {
            "root": str(Path(args.root).resolve()),
            "kind": kind,
            "threads": threads,
            "steps": args.steps,
            "new": new,
            "variant": VARIANTS[variant_name] if new else {},
        }
    )
    env = {**os.environ, "PYTHONPATH": str(src), "CIRCOT_BENCH": payload}
    proc = subprocess.run(
        [sys.executable, __file__, "--child"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant_name}/{kind}/{threads}: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/shapes")
    ap.add_argument("--baseline", default="f7e6048", help="git commit of today's code before this work")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument(
        "--variants", nargs="*", default=["fp32", "vision-trained", "groups-1", "groups-3", "sdpa", "compile"]
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        p = json.loads(os.environ["CIRCOT_BENCH"])
        print(json.dumps(measure(p["root"], p["kind"], p["threads"], p["steps"], p["new"], p["variant"])))
        return
    worktree = Path(tempfile.mkdtemp(prefix="circot-baseline-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.baseline],
        check=True,
        capture_output=True,
    )
    rows = []
    try:
        for threads in args.threads:
            for kind in args.kinds:
                versions = [("baseline", worktree / "src", False)] if kind != "perception" else []
                versions.append(("new", REPO / "src", True))
                if kind == "full":
                    versions += [(v, REPO / "src", True) for v in args.variants]
                for name, src, is_new in versions:
                    r = _run_version(src, args, is_new, name if is_new else "new", kind, threads)
                    rows.append({"code": name, "kind": kind, "threads": threads, **r})
                    print(
                        f"{threads} thread(s) {kind:10s} {name:15s} {r['steps_per_s']:.3f} steps/s "
                        f"profile {r['profile_s']}",
                        flush=True,
                    )
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True
        )
    summary = {}
    for threads in args.threads:
        for kind in args.kinds:
            base = [
                r for r in rows if r["threads"] == threads and r["kind"] == kind and r["code"] == "baseline"
            ]
            new = [r for r in rows if r["threads"] == threads and r["kind"] == kind and r["code"] == "new"]
            if base and new:
                summary[f"{kind}@{threads}"] = round(new[0]["steps_per_s"] / base[0]["steps_per_s"], 2)
    print("speed-up new/baseline:", summary)
    if args.out:
        out = {
            "baseline": args.baseline,
            "batch_size": 48,
            "steps": args.steps,
            "rows": rows,
            "speedup_new_over_baseline": summary,
        }
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
