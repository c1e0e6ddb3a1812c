"""The CIR-CoT trainer: stages of InfoNCE (+ CoT cross-entropy) through one accelerate loop.

Read top to bottom: :func:`train` resolves the run directory and the model, then runs every stage of the
config with one optimizer and one learning-rate schedule (warm-up then cosine, per stage). A step is one
optimizer update over ``grad_accum`` micro-batches. Each micro-batch embeds

* the queries — ``fast`` rows answer ``<emb>`` at once; ``full`` rows are teacher-forced through a CoT (the
  gold one, the model's own generated one, or one with a corrupted conclusion) and then ``<emb>``;
* the targets — gallery prompt, ``<emb>``;
* optionally the references as hard negatives (the "edit not applied" near miss),

and minimises ``λ_txt·CE(gold CoT tokens) + λ_Info·InfoNCE(query, target)`` with embeddings gathered
across processes. Every ``save_every`` steps the full state (model, optimizer, schedule, RNG, step) is saved
under ``checkpoints/``; ``resume=True`` continues from the newest one, with the same batches.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from circot.data import load_split
from circot.data.records import CIRSplit
from circot.errors import ConfigError, DataError
from circot.prompts import TAGS, CoT, format_cot
from circot.tokenizer import token_id
from circot.train.config import StageSection, TrainConfig, atomic_write_text, load_config
from circot.train.data import (
    IDENTITY_REASONING,
    IDENTITY_TEXT,
    Example,
    ExampleDataset,
    StepBatchSampler,
    build_examples,
    collate,
    cots_for_split,
    identity_example,
    noisy_answer_inputs,
)
from circot.train.losses import IGNORE_INDEX, CoTCrossEntropy, InfoNCELoss

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
INIT_MODEL = "init-model"
FINAL_MODEL = "model"
TRAIN_IMAGE_CACHE = 100_000


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    steps: int
    wall_time_s: float
    final_eval: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------------------


def stage_at(stages: list[StageSection], step: int) -> tuple[int, int]:
    """(stage index, step within the stage) of global ``step``; past the end gives the last stage."""
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps:
            return i, step - start
        start += st.steps
    return len(stages) - 1, stages[-1].steps


def lr_at(stages: list[StageSection], step: int, min_lr_ratio: float) -> float:
    """Absolute learning rate at global ``step``: linear warm-up, then cosine to ``min_lr_ratio·lr``, per stage."""
    i, s = stage_at(stages, step)
    st = stages[i]
    if st.warmup and s < st.warmup:
        return st.lr * (s + 1) / st.warmup
    span = max(1, st.steps - st.warmup)
    progress = min(1.0, (s - st.warmup) / span)
    return st.lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------------------------


class _Forward(nn.Module):
    """The module accelerate wraps (DDP/FSDP/DeepSpeed): one forward embeds a list of built batches, or (a
    perception step) runs the vision tower and the perception head over images.

    It owns the CIRCoT's torch module (and the head, which is trained but never saved with the model) so that
    the wrapped forward (and its gradient hooks) run through it.
    """

    def __init__(self, model: Any, head: nn.Module | None = None):
        super().__init__()
        self.net = model
        self.head = head

    def forward(
        self, batches: list[dict[str, torch.Tensor]] | None = None, perceive: list[Any] | None = None
    ) -> Any:
        if perceive is not None:
            features, _ = self.net.image_features(perceive)
            return self.head(torch.stack(features))
        return [self.net.embed_batch(b, labelled_logits=True) for b in batches or []]


def _corpus(cfg: TrainConfig, examples: list[Example]) -> list[str]:
    texts: list[str] = []
    if cfg.data.dataset == "shapes":
        from circot.data import shapes

        texts.extend(shapes.corpus())
    for ex in examples:
        texts.append(ex.text)
        if ex.cot is not None:
            texts.extend([ex.cot.caption, ex.cot.reasoning, ex.cot.conclusion])
    texts.extend([IDENTITY_TEXT, IDENTITY_REASONING])
    # a set: the tokenizer depends on which texts occur, not on how often or in which order, so runs whose
    # rows differ only in their mix (identity rows, say) get the same tokenizer and the same initial model
    return sorted(set(texts))


def build_model(cfg: TrainConfig, examples: list[Example]) -> Any:
    """A fresh model as the config says (tiny from scratch, or a checkpoint with config overrides)."""
    from circot.model import CIRCoT

    if cfg.model.init == "tiny":
        return CIRCoT.tiny(tokenizer_corpus=_corpus(cfg, examples), seed=cfg.seed, **cfg.model.overrides)
    dtype = getattr(torch, cfg.model.dtype) if cfg.model.dtype else None
    return CIRCoT.from_pretrained(cfg.model.init, dtype=dtype, **cfg.model.overrides)


def _length_groups(rows: list[int], lengths: list[int], groups: int) -> list[list[int]]:
    """Split ``rows`` into ``groups`` sub-batches of similar length, each padded to its own longest row:
    sorted by length, then cut into parts of equal row count."""
    if not rows:
        return []
    ranked = [r for _, r in sorted(zip(lengths, rows, strict=True))]
    if groups <= 1 or len(rows) < 2 * groups:
        return [ranked]
    size = math.ceil(len(ranked) / groups)
    return [ranked[k : k + size] for k in range(0, len(ranked), size)]


def _in_batch_order(q_emb: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Query embeddings computed in the order ``order`` (full groups, then fast rows) back in batch order."""
    perm = torch.as_tensor(order, device=q_emb.device)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(order), device=q_emb.device)
    return q_emb[inv]


def _row_chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _take_rows(batch: dict[str, torch.Tensor], rows: range, model: Any) -> dict[str, torch.Tensor]:
    """Rows ``rows`` of a built batch, with their images' pixels (or cached features)."""
    grids = batch["image_grid_thw"]
    out = {
        k: batch[k][rows.start : rows.stop] for k in ("input_ids", "attention_mask", "labels") if k in batch
    }
    out["position_ids"] = batch["position_ids"][:, rows.start : rows.stop]
    out["image_grid_thw"] = grids[rows.start : rows.stop]
    per_image = grids.prod(-1)
    for key, div in (("pixel_values", 1), ("image_features", model.images.merge_size**2)):
        if key in batch:
            ends = torch.cumsum(per_image // div, 0).tolist()
            starts = [0, *ends[:-1]]
            out[key] = batch[key][starts[rows.start] : ends[rows.stop - 1]]
    return out


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _digest(module: nn.Module) -> str:
    """A short hash of a module's weights (two runs log the same one when they share, say, a vision tower)."""
    import hashlib

    from circot.model import hash_weights

    return hash_weights(hashlib.sha256(), module).hexdigest()[:16]


CPUINFO = Path("/proc/cpuinfo")


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool | None:
    """Whether the CPU has bf16 matmul instructions (avx512_bf16 or amx_bf16); None where it cannot tell."""
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _resolve_precision(name: str, cpuinfo: Path = CPUINFO) -> str:
    """``auto``: bf16 on a GPU that has it, else full precision (``bf16`` on a CPU is bf16 autocast).

    bf16 autocast on a CPU without bf16 instructions is emulated: a matmul of the tiny model's MLP shape ran
    about 30× slower than in fp32 on such a CPU, so that case is warned about (the result stays what was asked).
    """
    if name == "bf16" and not torch.cuda.is_available() and cpu_has_native_bf16(cpuinfo) is False:
        logger.warning(
            "optim.mixed_precision is bf16 but this CPU has no bf16 instructions (neither avx512_bf16 nor "
            "amx_bf16): bf16 autocast is emulated and steps can be many times slower than fp32; "
            "optim.mixed_precision=no trains in fp32"
        )
    if name != "auto":
        return name
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


# --------------------------------------------------------------------------------------------------------------
# the run directory
# --------------------------------------------------------------------------------------------------------------


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / STATE_FILE).exists()]
    return ckpts[-1] if ckpts else None


def _drop_records_after(path: Path, step: int) -> None:
    """Remove the records of steps after ``step`` (a resumed run logs those steps again; the killed run's lines
    would be counted twice). Rewritten atomically; a line that is not JSON (the one a kill tore) is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record and make it durable (a crash right after a log line keeps the line)."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------------------
# evaluation on val
# --------------------------------------------------------------------------------------------------------------


def _subset(split: CIRSplit, max_queries: int | None) -> CIRSplit:
    if max_queries is None or max_queries >= len(split.queries):
        return split
    return CIRSplit(
        dataset=split.dataset,
        split=split.split,
        root=split.root,
        queries=split.queries[:max_queries],
        gallery=split.gallery,
        conventions=dict(split.conventions),
        extra_paths=split.extra_paths,
    )


def evaluate_model(
    model: Any,
    split: CIRSplit,
    modes: list[str],
    batch_size: int = 64,
    max_queries: int | None = None,
    gallery_emb: np.ndarray | None = None,
) -> dict[str, Any]:
    """Retrieval metrics (and CoT scores in full mode on shapes) of ``model`` on ``split`` in each mode.

    Returns ``{mode: {"metrics": {...}, "cot": {...}}}`` plus the gallery embeddings under ``"_gallery"``.
    """
    from circot.metrics import evaluate
    from circot.search import embed_queries

    if not modes:
        return {"_gallery": gallery_emb}
    sub = _subset(split, max_queries)
    if gallery_emb is None:
        paths = [split.gallery.path(i) for i in split.gallery.ids]
        gallery_emb = model.encode_images(paths, batch_size=batch_size)
    refs = [sub.image_path(q.reference) for q in sub.queries]
    texts = [q.text for q in sub.queries]
    out: dict[str, Any] = {}
    for mode in modes:
        res: dict[str, Any] = {}
        queries = embed_queries(model, refs, texts, mode, batch_size=batch_size)
        emb = queries.embeddings
        if mode == "full" and split.dataset == "shapes" and all("gold_cot" in q.extras for q in sub.queries):
            from circot.data import shapes

            res["cot"] = shapes.score_cot(queries.cots, [shapes.gold_cot(q) for q in sub.queries])
        scores = np.asarray(emb, dtype=np.float32) @ np.asarray(gallery_emb, dtype=np.float32).T
        res["metrics"] = evaluate(sub, scores).metrics
        out[mode] = res
    out["_gallery"] = gallery_emb
    return out


# --------------------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _TrainSet:
    """What the stages that train on one root draw from."""

    examples: list[Example]
    family_cum: dict[tuple[tuple[str, float], ...], list[float]]
    perception: Any = None


class Trainer:
    """Holds everything one run needs; :meth:`run` trains from step 0 or from the newest checkpoint."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.resume = resume
        self._extends = False
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = Accelerator(
            # without a GPU, accelerate joins the processes of a launcher (torchrun) only when told CPU
            cpu=not torch.cuda.is_available(),
            # stages leave different parameters out of the graph (no LM head without CE, the perception head)
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
            mixed_precision=_resolve_precision(cfg.optim.mixed_precision),
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
        )
        set_seed(cfg.seed)
        self.is_main = self.accelerator.is_main_process
        self._check_run_dir()

    # -- set-up ------------------------------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        existing = self.run_dir / "config.yaml"
        if self.resume:
            if not existing.exists():
                raise ConfigError(f"--resume: {self.run_dir} holds no run (no config.yaml)")
            self._check_resumed_config(existing)
        elif latest_checkpoint(self.run_dir) is not None or (self.run_dir / FINAL_MODEL).exists():
            raise ConfigError(
                f"run_dir {str(self.run_dir)!r} already holds a run; use --resume or another run_dir"
            )

    def _check_resumed_config(self, existing: Path) -> None:
        """A resumed run may change how it is run (threads, logging, stop_after) and append stages; what the
        steps already taken depended on must stay as it was."""
        stored = load_config(existing).to_dict()
        given = self.cfg.to_dict()
        for key in ("seed", "model", "data", "optim", "loss"):
            if stored.get(key) != given.get(key):
                raise ConfigError(
                    f"--resume: {key} differs from the run's own {existing}; a resumed run keeps what its steps"
                    " were trained with (start a new run_dir instead)"
                )
        old, new = stored["stages"], given["stages"]
        if new[: len(old)] != old:
            pairs = enumerate(zip(old, new, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(old), len(new)))
            raise ConfigError(
                f"--resume: stages[{at}] differs from the run's own {existing}; a resumed run may only append"
                " stages after the ones it was started with"
            )
        self._extends = len(new) > len(old)

    def _load_data(self) -> None:
        cfg = self.cfg.data
        roots = list(dict.fromkeys([cfg.root] + [self.cfg.stage_root(st) for st in self.cfg.stages]))
        self._train_sets = {root: self._load_train_set(root) for root in roots}
        self._use_train_set(cfg.root)
        self.val_split = None
        if cfg.val_split:
            self.val_split = load_split(cfg.dataset, cfg.root, cfg.val_split, **cfg.options)
        self.perception_val = None
        if cfg.val_split and self.cfg.has_perception:
            from circot.train.perception import load_perception_data

            self.perception_val = load_perception_data(
                cfg.root, cfg.val_split, limit=self.cfg.eval.perception_images
            )

    def _load_train_set(self, root: str) -> _TrainSet:
        """The training examples under ``root`` (and its perception images, and the family draws, of the stages
        that train on it)."""
        cfg = self.cfg.data
        from circot.annotate import read_annotations

        stages = [(i, st) for i, st in enumerate(self.cfg.stages) if self.cfg.stage_root(st) == root]
        train_split = load_split(cfg.dataset, root, cfg.train_split, **cfg.options)
        if cfg.max_train_queries is not None:
            train_split.queries = train_split.queries[: cfg.max_train_queries]
        # the shapes world always has its gold CoT: it also names each target's scene (duplicates share a key)
        needs_cot = (
            any(st.mode == "full" for st in self.cfg.stages)
            or cfg.identity_fraction > 0
            or cfg.dataset == "shapes"
        )
        cots = None
        if needs_cot or cfg.annotations:
            ann = read_annotations(cfg.annotations) if cfg.annotations else None
            cots = cots_for_split(train_split, ann, cfg.annotations)
        examples = build_examples(
            train_split,
            cots,
            max_text_chars=cfg.max_text_chars,
            max_cot_chars=cfg.max_cot_chars,
            identity_fraction=cfg.identity_fraction,
            seed=self.cfg.seed,
        )
        logger.info(
            "training examples: %d (%s/%s under %s)", len(examples), cfg.dataset, cfg.train_split, root
        )
        family_cum: dict[tuple[tuple[str, float], ...], list[float]] = {}
        families = {e.family or "" for e in examples}
        for i, st in stages:
            key = tuple(sorted(st.family_weights.items()))
            if not key or key in family_cum:
                continue
            unknown = sorted(set(st.family_weights) - families)
            if unknown:
                raise ConfigError(
                    f"stages.{i} ({st.name}).family_weights: no training example of family "
                    f"{', '.join(map(repr, unknown))} (families: {', '.join(sorted(families))})"
                )
            cum = list(itertools.accumulate(st.family_weights.get(e.family or "", 1.0) for e in examples))
            if cum[-1] <= 0:
                raise ConfigError(f"stages.{i} ({st.name}).family_weights: every example has weight 0")
            family_cum[key] = cum
        perception = None
        if any(st.mode == "perception" for _, st in stages):
            from circot.train.perception import load_perception_data

            perception = load_perception_data(root, cfg.train_split)
            logger.info("perception images: %d (%s under %s)", len(perception.paths), cfg.train_split, root)
        return _TrainSet(examples, family_cum, perception)

    def _use_train_set(self, root: str) -> None:
        train_set = self._train_sets[root]
        self.examples = train_set.examples
        self._family_cum = train_set.family_cum
        self.perception_train = train_set.perception

    def _setup_model(self, start_step: int) -> None:
        from circot.model import CIRCoT

        init_dir = self.run_dir / INIT_MODEL
        if self.resume and init_dir.exists():
            self.model = CIRCoT.from_pretrained(init_dir, device="cpu")
        else:
            self.model = build_model(self.cfg, self.examples)
            if self.is_main:
                self.model.save_pretrained(init_dir)
            self.accelerator.wait_for_everyone()
        self.model.to(self.accelerator.device)
        if self.cfg.model.text_attention:
            self.model.hf.set_attn_implementation({"text_config": self.cfg.model.text_attention})
        # decoded training images are kept in memory (~37 KB each at 112 px) while the vision tower trains: every
        # image is read from disk once. A frozen tower's outputs are cached instead (see `_enter_stage`).
        self._pixel_cache_size = max(self.model.images.cache_size, TRAIN_IMAGE_CACHE)
        self.model.images.set_cache_size(self._pixel_cache_size)
        self.temperature = self.cfg.loss.temperature or float(self.model.config.temperature)
        self.info_nce = InfoNCELoss(self.temperature, symmetric=self.cfg.loss.symmetric, gather=True)
        self.cross_entropy = CoTCrossEntropy(token_id(self.model.tokenizer, TAGS["conclusion"][0]))
        # tokens that token noise never replaces: the added tokens (tags, <emb>, the chat's specials), stop tokens
        protected = {
            *self.model.tokenizer.added_tokens_decoder,
            self.model.emb_token_id,
            *self.model.stop_token_ids,
        }
        self._protected_ids = torch.tensor(sorted(protected), dtype=torch.long)
        self._noise_words = {
            tuple(st.token_noise_words): self._single_token_ids(
                st.token_noise_words, f"stages.{i} ({st.name})"
            )
            for i, st in enumerate(self.cfg.stages)
            if st.token_noise_words
        }
        head = None
        if self.cfg.has_perception:
            from circot.train.perception import PerceptionHead

            torch.manual_seed(self.cfg.seed + 1)
            head = PerceptionHead(self.model.embedding_dim).to(self.accelerator.device)
        self.forward = _Forward(self.model, head)
        # stage freezing acts only inside this set (LoRA leaves the base weights out of it)
        self._trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        self._vision_cache: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self._vision_cache_bytes = 0
        self._vision_frozen = False
        params = [p for p in self.forward.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.cfg.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=1.0,
            betas=tuple(self.cfg.optim.betas),
        )
        self.forward, self.optimizer = self.accelerator.prepare(self.forward, opt)
        del start_step

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int) -> None:
        ckpt = self.run_dir / CHECKPOINTS / f"step-{step:07d}"
        self.accelerator.save_state(str(ckpt))
        if self.is_main:
            state = {"step": step, "wall_time_s": self._wall(), "time": time.time()}
            atomic_write_text(ckpt / STATE_FILE, json.dumps(state) + "\n")
            done = sorted(
                (self.run_dir / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1])
            )
            for old in done[: max(0, len(done) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self) -> int:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", self.run_dir)
            return 0
        self.accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / STATE_FILE).read_text())
        step = int(state["step"])
        self._wall_before = float(state.get("wall_time_s", 0.0))
        if self.is_main:
            _drop_records_after(self.run_dir / "metrics.jsonl", step)
        logger.info("resumed from %s (step %d)", ckpt, step)
        return step

    # -- one micro-batch -----------------------------------------------------------------------------------------

    def _refresh_generated(self, stage: StageSection, step: int) -> None:
        """Generate the model's own CoT for a pool of training queries (stage with cot_source=generated)."""
        rng = random.Random(self.cfg.seed * 7919 + step)
        candidates = [i for i, e in enumerate(self.examples) if not e.identity]
        pool = rng.sample(candidates, min(stage.generated_pool, len(candidates)))
        exs = [self.examples[i] for i in pool]
        was_training = self.model.training
        self.model.eval()
        t0 = time.time()
        with torch.no_grad():
            cots = self.model.generate_reasoning(
                [e.reference for e in exs], [e.text for e in exs], batch_size=self.cfg.eval.batch_size
            )
        self.model.train(was_training)
        self.generated = {i: c for i, c in zip(pool, cots, strict=True)}
        exact = sum(c.conclusion == e.cot.conclusion for c, e in zip(cots, exs, strict=True)) / max(
            1, len(exs)
        )
        logger.info(
            "generated CoT for %d queries in %.0fs (conclusion exact %.3f)", len(exs), time.time() - t0, exact
        )
        self._log({"gen/conclusion_exact": exact}, step)

    def _image_inputs(self, paths: list[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Vision-tower outputs of ``paths`` while the tower is frozen (None: it trains, so the batch carries
        pixels), computed without gradients under the training autocast. They are kept, with their grids, up
        to ``optim.vision_cache_mb`` (the tiny shapes model needs 8 KB an image; a 7B model's 448-pixel image
        several MB), so that each image is encoded once per frozen stretch."""
        if not self._vision_frozen:
            return None
        found = {str(p): self._vision_cache[str(p)] for p in paths if str(p) in self._vision_cache}
        missing = list(dict.fromkeys(str(p) for p in paths if str(p) not in found))
        if missing:
            with torch.no_grad(), self.accelerator.autocast():
                feats, grids = self.model.image_features(missing)
            budget = self.cfg.optim.vision_cache_mb * 1e6
            for key, f, g in zip(missing, feats, grids.tolist(), strict=True):
                found[key] = (f.detach().float(), g)
                size = found[key][0].numel() * 4
                if self._vision_cache_bytes + size <= budget:
                    self._vision_cache[key] = found[key]
                    self._vision_cache_bytes += size
        picked = [found[str(p)] for p in paths]
        return torch.cat([f for f, _ in picked]), torch.tensor([g for _, g in picked])

    def _perception_step(self, step: int, stage: StageSection) -> dict[str, torch.Tensor]:
        from circot.train.perception import perception_loss, random_grayscale

        paths, labels = self.perception_train.batch(step, self.cfg.optim.batch_size, self.cfg.seed)
        images: list[Any] = paths
        if stage.grayscale_prob:
            grey = torch.Generator().manual_seed(self.cfg.seed * 7_000_003 + step)
            images, labels = random_grayscale(paths, labels, stage.grayscale_prob, grey)
        with self.accelerator.autocast():
            logits = self.forward(perceive=images)
        loss = perception_loss(logits, labels.to(self.accelerator.device))
        return {"perception": loss, "total": loss}

    def _family_draw(self, stage: StageSection, rng: random.Random, n: int) -> list[int]:
        """Example indices for a micro-batch of ``n`` rows, drawn with replacement by ``stage.family_weights``.
        Every process draws the global batch from the same generator and takes its slice."""
        cum = self._family_cum[tuple(sorted(stage.family_weights.items()))]
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        picks = rng.choices(range(len(self.examples)), cum_weights=cum, k=n * world)
        return picks[rank * n : (rank + 1) * n]

    def _micro_step(
        self, batch: dict[str, list[Any]], stage: StageSection, rng: random.Random, scale: float | None = None
    ) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch (``total`` to backpropagate). With ``optim.contrastive_chunk`` and a
        ``scale`` (the factor of the backward, 1 / grad_accum), the step backpropagates by itself in chunks and
        says so with a ``backward_done`` entry."""
        model = self.model
        examples: list[Example] = list(batch["example"])
        indices: list[int] = batch["index"]
        n = len(examples)
        if stage.family_weights:
            indices = self._family_draw(stage, rng, n)
            examples = [self.examples[j] for j in indices]
        if stage.identity_prob:
            for i in range(n):
                if not examples[i].identity and rng.random() < stage.identity_prob:
                    examples[i] = identity_example(examples[i])
        contrastive = stage.lambda_info > 0
        fast_rows = list(range(n))
        full_rows: list[int] = []
        if stage.mode == "full":
            fast_rows = [i for i in range(n) if rng.random() < stage.fast_fraction]
            full_rows = [i for i in range(n) if i not in set(fast_rows)]
        cots: dict[int, CoT] = {}
        supervised: set[int] = set()
        for i in full_rows:
            ex = examples[i]
            cot, sup = ex.cot, True
            if (
                stage.cot_source == "generated"
                and not ex.identity
                and indices[i] in self.generated
                and rng.random() < stage.generated_fraction
            ):
                cot, sup = self.generated[indices[i]], False
            elif stage.steer_prob and not ex.identity and rng.random() < stage.steer_prob:
                # another query's conclusion, and its target: retrieval must follow what the conclusion says
                other = self.examples[rng.randrange(len(self.examples))]
                if other.target_key != ex.target_key and other.cot is not None:
                    cot = CoT(
                        caption=ex.cot.caption, reasoning=ex.cot.reasoning, conclusion=other.cot.conclusion
                    )
                    examples[i] = replace(ex, target=other.target, target_key=other.target_key)
                    sup = False
            elif stage.corrupt_prob and not ex.identity and rng.random() < stage.corrupt_prob:
                other = self.examples[rng.randrange(len(self.examples))].cot
                cot = CoT(caption=ex.cot.caption, reasoning=ex.cot.reasoning, conclusion=other.conclusion)
                sup = False
            cots[i] = cot
            if sup:
                supervised.add(i)
        refs = [e.reference for e in examples]
        targets = [e.target for e in examples]
        built: list[dict[str, torch.Tensor]] = []
        order: list[int] = []
        n_full = 0
        for rows in _length_groups(
            full_rows, [len(format_cot(cots[i])) for i in full_rows], self.cfg.optim.length_groups
        ):
            b = model.build_batch(
                [refs[i] for i in rows],
                [examples[i].text for i in rows],
                cots=[cots[i] for i in rows],
                mode="full",
                image_features=self._image_inputs([refs[i] for i in rows]),
            )
            if "labels" in b and not supervised.issuperset(rows):
                keep = torch.tensor([i in supervised for i in rows], dtype=torch.bool)
                b["labels"] = b["labels"].masked_fill(~keep[:, None], IGNORE_INDEX)
            if stage.token_noise:
                noise = torch.Generator().manual_seed(rng.getrandbits(63))
                b["input_ids"] = noisy_answer_inputs(
                    b["input_ids"],
                    b["labels"],
                    stage.token_noise,
                    self._protected_ids,
                    noise,
                    words=self._noise_words.get(tuple(stage.token_noise_words)),
                )
            built.append(b)
            order.extend(rows)
            n_full += 1
        if fast_rows:
            built.append(
                model.build_batch(
                    [refs[i] for i in fast_rows],
                    [examples[i].text for i in fast_rows],
                    mode="fast",
                    image_features=self._image_inputs([refs[i] for i in fast_rows]),
                )
            )
            order.extend(fast_rows)
        n_query = len(built)
        use_hard = contrastive and self.cfg.loss.hard_negatives > 0
        if contrastive:  # the targets, and the references (hard negatives), in one gallery pass
            images = targets + refs if use_hard else targets
            built.append(model.build_batch(images, mode="gallery", image_features=self._image_inputs(images)))
        device = self.accelerator.device
        built = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in built]
        if contrastive and self.cfg.optim.contrastive_chunk and scale is not None:
            return self._grad_cache_step(built, n_query, n_full, order, examples, stage, use_hard, scale)
        with self.accelerator.autocast():
            outs = self.forward(built)
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=device)
        if contrastive:
            q_emb = _in_batch_order(torch.cat([outs[j][0] for j in range(n_query)], dim=0), order)
            info = self._contrastive(q_emb, outs[n_query][0], examples, use_hard)
            # every process computes the loss of the global batch but backpropagates its own rows only; DDP
            # averages gradients over processes, so scaling by the process count gives the global gradient.
            losses["info_nce"] = info
            total = total + stage.lambda_info * info * self.accelerator.num_processes
        if n_full and stage.lambda_txt > 0:
            ce = self.cross_entropy.over_batches(
                [(outs[j][1], built[j]["labels"]) for j in range(n_full)], stage.conclusion_weight
            )
            losses["cot_ce"] = ce
            total = total + stage.lambda_txt * ce
        losses["total"] = total
        return losses

    def _contrastive(
        self, q_emb: torch.Tensor, gallery: torch.Tensor, examples: list[Example], use_hard: bool
    ) -> torch.Tensor:
        """InfoNCE of the batch: ``gallery`` holds the targets' embeddings, then (``use_hard``) the references'."""
        n = len(examples)
        keys = torch.as_tensor([e.target_key for e in examples], device=q_emb.device)
        hard = mask = None
        if use_hard:
            # every reference of the batch (the "edit not applied" near miss) is a negative of every query,
            # unless it shows the query's target scene (identity rows, or a reference equal to a target)
            hard = gallery[n:]
            ref_keys = torch.as_tensor([e.reference_key for e in examples], device=q_emb.device)
            mask = keys[:, None] != ref_keys[None, :]
        return self.info_nce(q_emb, gallery[:n], target_keys=keys, hard_negatives=hard, hard_mask=mask)

    def _grad_cache_step(
        self,
        built: list[dict[str, torch.Tensor]],
        n_query: int,
        n_full: int,
        order: list[int],
        examples: list[Example],
        stage: StageSection,
        use_hard: bool,
        scale: float,
    ) -> dict[str, torch.Tensor]:
        """The same gradient as the plain step, with at most ``optim.contrastive_chunk`` rows per forward
        (GradCache, Gao et al. 2021): embed every chunk without gradients, take the loss's gradient with respect
        to the embeddings, then run each chunk again with gradients and backpropagate its share. The random
        state of each chunk's first pass is replayed in its second (dropout). Runs the backward itself."""
        size = int(self.cfg.optim.contrastive_chunk)
        pieces = [(j, r) for j, b in enumerate(built) for r in _row_chunks(b["input_ids"].shape[0], size)]
        states, parts = [], {}
        with torch.no_grad(), self.accelerator.autocast():
            for j, rows in pieces:
                states.append(_rng_state())
                chunk = {k: v for k, v in _take_rows(built[j], rows, self.model).items() if k != "labels"}
                parts.setdefault(j, []).append(self.forward([chunk])[0][0].float())
        leaves = [torch.cat(parts[j]).requires_grad_() for j in range(len(built))]
        q_emb = _in_batch_order(torch.cat(leaves[:n_query]), order)
        info = self._contrastive(q_emb, leaves[n_query], examples, use_hard)
        (stage.lambda_info * info * self.accelerator.num_processes).backward()
        weight = stage.conclusion_weight
        ce_weight = sum(
            float(self.cross_entropy.token_weights(built[j]["labels"], weight).sum()) for j in range(n_full)
        )
        ce_sum = torch.zeros((), device=info.device)
        for i, (j, rows) in enumerate(pieces):
            _set_rng_state(states[i])
            chunk = _take_rows(built[j], rows, self.model)
            with self.accelerator.autocast():
                emb, logits = self.forward([chunk])[0]
            surrogate = (emb.float() * leaves[j].grad[rows.start : rows.stop]).sum()
            if j < n_full and stage.lambda_txt > 0 and logits is not None and ce_weight:
                part, _ = self.cross_entropy.weighted_sum(logits, chunk["labels"], weight)
                surrogate = surrogate + stage.lambda_txt * part / ce_weight
                ce_sum = ce_sum + part.detach()
            ctx = self.accelerator.no_sync(self.forward) if i < len(pieces) - 1 else _null()
            with ctx:
                self.accelerator.backward(surrogate * scale)
        losses = {"info_nce": info.detach()}
        total = stage.lambda_info * info.detach() * self.accelerator.num_processes
        if n_full and stage.lambda_txt > 0:
            losses["cot_ce"] = ce_sum / max(1.0, ce_weight)
            total = total + stage.lambda_txt * losses["cot_ce"]
        losses["total"] = total
        losses["backward_done"] = torch.ones(())
        return losses

    # -- logging -------------------------------------------------------------------------------------------------

    def _log(self, values: dict[str, float], step: int) -> None:
        if self.is_main:
            self.accelerator.log(values, step=step)
            _append_jsonl(self.run_dir / "metrics.jsonl", {"step": step, **values})

    def _evaluate(self, step: int, final: bool = False) -> dict[str, Any]:
        if self.val_split is None:
            return {}
        result: dict[str, Any] = {}
        if self.is_main:
            self.model.eval()
            t0 = time.time()
            max_q = self.cfg.eval.final_max_queries if final else self.cfg.eval.max_queries
            flat: dict[str, float] = {}
            head = self.accelerator.unwrap_model(self.forward).head
            if head is not None and self.perception_val is not None:
                from circot.train.perception import evaluate_perception

                acc = evaluate_perception(self.model, head, self.perception_val, self.cfg.eval.batch_size)
                flat.update({f"val_perception/{k}": v for k, v in acc.items()})
            stage = self.cfg.stages[stage_at(self.cfg.stages, max(0, step - 1))[0]]
            modes = [] if stage.mode == "perception" and not final else list(self.cfg.eval.modes)
            with torch.no_grad():
                res = evaluate_model(self.model, self.val_split, modes, self.cfg.eval.batch_size, max_q)
            res.pop("_gallery", None)
            self.model.train()
            for mode, r in res.items():
                for k in ("R@1", "R@5", "mAP@5"):
                    if k in r["metrics"]:
                        flat[f"val_{mode}/{k}"] = r["metrics"][k]
                for k, v in r.get("cot", {}).items():
                    flat[f"val_{mode}/cot_{k}"] = v
            self._log(flat, step)
            logger.info(
                "eval @%d (%.0fs): %s",
                step,
                time.time() - t0,
                " ".join(f"{k}={v:.2f}" for k, v in flat.items()),
            )
            result = res
        self.accelerator.wait_for_everyone()
        return result

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from circot.progress import progress_bar

        cfg = self.cfg
        self._t_start = time.time()
        self._wall_before = 0.0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume or self._extends:
                cfg.save(self.run_dir / "config.yaml")
        self.accelerator.wait_for_everyone()
        self._load_data()
        self._setup_model(0)
        start = self._load_checkpoint() if self.resume else 0
        self.accelerator.init_trackers("tb")
        total = cfg.total_steps
        budget = cfg.time_budget_s
        accum = cfg.optim.grad_accum
        # one batch stream per training root, all advanced every step, so that batches depend on the step alone
        streams = {}
        for root, train_set in self._train_sets.items():
            sampler = StepBatchSampler(
                len(train_set.examples),
                cfg.optim.batch_size,
                start * accum,
                (total if budget is None else 10**9) * accum,
                seed=cfg.seed,
                num_processes=self.accelerator.num_processes,
                process_index=self.accelerator.process_index,
            )
            loader = torch.utils.data.DataLoader(
                ExampleDataset(train_set.examples),
                batch_sampler=sampler,
                collate_fn=collate,
                num_workers=cfg.data.num_workers,
            )
            streams[root] = iter(loader)
        self.generated: dict[int, CoT] = {}
        self.model.train()
        bar = progress_bar(total=total, initial=start, disable=not self.is_main, desc="train", unit="step")
        history: list[dict[str, Any]] = []
        prev_stage = None
        t_log, running = time.time(), {}
        step = start
        while True:
            # progress through the schedule: the step, or (time budget) the share of the budget spent
            progress = step if budget is None else int(total * self._shared_wall() / budget)
            if progress >= total:
                break
            stage_idx, in_stage = stage_at(cfg.stages, progress)
            stage = cfg.stages[stage_idx]
            if stage_idx != prev_stage:
                self._enter_stage(
                    stage_idx, fresh=(in_stage == 0) if budget is None else prev_stage is not None
                )
                prev_stage = stage_idx
                self._last_regen = None
            if stage.cot_source == "generated" and (
                self._last_regen is None or in_stage - self._last_regen >= stage.regenerate_every
            ):
                self._refresh_generated(stage, step)
                self._last_regen = in_stage
            lr = lr_at(cfg.stages, progress, cfg.optim.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            rng = random.Random(cfg.seed * 1_000_003 + step)
            for micro in range(accum):
                drawn = {root: next(stream) for root, stream in streams.items()}
                batch = drawn[cfg.stage_root(stage)]
                ctx = self.accelerator.no_sync(self.forward) if micro < accum - 1 else _null()
                with ctx:
                    if stage.mode == "perception":
                        losses = self._perception_step(step * accum + micro, stage)
                    else:
                        losses = self._micro_step(batch, stage, rng, scale=1.0 / accum)
                    if losses.pop("backward_done", None) is None:
                        self.accelerator.backward(losses["total"] / accum)
                for k, v in losses.items():
                    running[k] = running.get(k, 0.0) + float(v.detach()) / accum
            if cfg.optim.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.forward.parameters(), cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1 if budget is None else max(0, min(total, progress + 1) - bar.n))
            if step % cfg.log_every == 0 or (budget is None and step == total):
                n_steps = cfg.log_every if step % cfg.log_every == 0 else (step - start) % cfg.log_every or 1
                record = {f"train/{k}": v / n_steps for k, v in running.items()}
                record["train/lr"] = lr
                record["train/steps_per_s"] = n_steps / max(1e-9, time.time() - t_log)
                record["train/stage"] = stage_idx
                record["train/progress"] = progress
                self._log(record, step)
                bar.set_postfix(
                    {k.split("/")[1]: f"{v:.3f}" for k, v in record.items() if k.endswith(("nce", "_ce"))}
                )
                history.append({"step": step, **record})
                running, t_log = {}, time.time()
            finished = budget is None and step >= total
            if cfg.eval.every and step % cfg.eval.every == 0 and not finished:
                self._evaluate(step)
            if cfg.save_every and step % cfg.save_every == 0 and not finished:
                self._save_checkpoint(step)
            if cfg.stop_after is not None and step >= cfg.stop_after and not finished:
                bar.close()
                if not (cfg.save_every and step % cfg.save_every == 0):
                    self._save_checkpoint(step)
                logger.info("stopping after step %d as asked (stop_after); continue with --resume", step)
                self.accelerator.end_training()
                return TrainResult(self.run_dir, None, step, self._wall(), {}, history)
        bar.close()
        self._save_checkpoint(step)
        final = self._evaluate(step, final=True)
        model_dir = self._save_final(final, self._wall(), step)
        self.accelerator.end_training()
        return TrainResult(self.run_dir, model_dir, step, self._wall(), final, history)

    def _shared_wall(self) -> float:
        """Wall time of the run so far, as the main process measures it (the same on every process)."""
        wall = torch.tensor([self._wall()], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            dist.broadcast(wall, src=0)
        return float(wall.item())

    def _wall(self) -> float:
        """Training wall time so far, over every invocation of this run."""
        return round(self._wall_before + time.time() - self._t_start, 1)

    def _single_token_ids(self, words: list[str], where: str) -> torch.Tensor:
        """The token ids of ``words`` as they follow a space in running text; each must be one token."""
        ids = []
        for word in dict.fromkeys(words):
            tokens = self.model.tokenizer.encode(" " + word, add_special_tokens=False)
            if len(tokens) != 1:
                raise ConfigError(
                    f"{where}.token_noise_words: {word!r} is {len(tokens)} tokens of this model's tokenizer,"
                    " not one"
                )
            ids.append(tokens[0])
        return torch.tensor(ids, dtype=torch.long)

    def _enter_stage(self, stage_idx: int, fresh: bool) -> None:
        st = self.cfg.stages[stage_idx]
        logger.info(
            "stage %d/%d: %s (%s, %d steps)", stage_idx + 1, len(self.cfg.stages), st.name, st.mode, st.steps
        )
        if fresh and stage_idx > 0:
            self.optimizer.optimizer.state.clear()  # fresh moments for a new objective
        self._use_train_set(self.cfg.stage_root(st))
        for name, p in self.model.named_parameters():
            if name not in self._trainable:
                continue
            p.requires_grad_(not any(name.startswith(prefix) for prefix in st.freeze))
        # a deep-stack tower (Qwen3-VL) feeds more than its merged tokens: it runs, without gradients, every step
        was_frozen = self._vision_frozen
        frozen = not any(p.requires_grad for p in self.model.hf.model.visual.parameters())
        self._vision_frozen = frozen and not self.model.has_deepstack
        # decoded pixels are kept only while the tower trains; frozen, its cached outputs stand in for them
        self.model.images.set_cache_size(0 if self._vision_frozen else self._pixel_cache_size)
        if not self._vision_frozen:  # the tower may change: what was cached is stale
            self._vision_cache.clear()
            self._vision_cache_bytes = 0
        elif not was_frozen:  # cached outputs stay valid over consecutive frozen stages
            logger.info(
                "vision tower frozen (weights %s): its outputs are cached per training image",
                _digest(self.model.hf.model.visual),
            )

    def _save_final(self, final: dict[str, Any], wall: float, steps: int) -> Path | None:
        model_dir = self.run_dir / FINAL_MODEL
        if self.is_main:
            results = {
                mode: {"metrics": r.get("metrics", {}), "cot": r.get("cot", {})} for mode, r in final.items()
            }
            info = {
                "dataset": self.cfg.data.dataset,
                "val_split": self.cfg.data.val_split,
                "steps": steps,
                "processes": self.accelerator.num_processes,
                "training_wall_time_s": round(wall, 1),
                "eval": results,
            }
            card: dict[str, Any] = {
                "training steps": info["steps"],
                "training wall time (s)": info["training_wall_time_s"],
            }
            for mode, r in results.items():
                for k, v in {**r["metrics"], **{f"cot {k}": v for k, v in r["cot"].items()}}.items():
                    card[f"{self.cfg.data.dataset} {self.cfg.data.val_split} {mode} {k}"] = v
            self.model.save_pretrained(model_dir, results=card)
            atomic_write_text(self.run_dir / "final_eval.json", json.dumps(info, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return model_dir


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train as ``cfg`` says; ``resume`` continues the run in ``cfg.run_dir`` from its newest checkpoint."""
    if cfg.data.dataset not in ("shapes", "fashioniq", "cirr"):
        raise DataError(
            f"data.dataset: training supports shapes, fashioniq and cirr, not {cfg.data.dataset!r}"
        )
    return Trainer(cfg, resume=resume).run()


__all__ = ["TrainResult", "Trainer", "evaluate_model", "latest_checkpoint", "lr_at", "stage_at", "train"]
