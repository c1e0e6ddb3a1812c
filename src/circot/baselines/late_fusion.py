"""Late-fusion baseline (row (a) of the results table): a CLIP4Cir-style Combiner over frozen features.

Frozen EfficientNet-Lite0 image features and frozen all-MiniLM-L6-v2 text features are computed once and cached
(:mod:`circot.baselines.features`); only the :class:`~circot.baselines.combiner.Combiner` is trained, with InfoNCE
between the combined query feature and the (projected) target image feature over in-batch targets. Evaluation uses
the project's harness: ``scores = query features @ gallery features.T`` → :func:`circot.metrics.evaluate`.

Typical use (see ``benchmarks/late_fusion.py``)::

    from circot.baselines.late_fusion import train_and_evaluate
    report = train_and_evaluate("/data/shapes", splits=("val", "test-novel"), seed=0)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circot.baselines.combiner import Combiner, CombinerConfig, info_nce
from circot.baselines.features import FeatureCache, ImageFeatureExtractor, file_hash, select_pool, text_hash
from circot.data.records import CIRSplit

logger = logging.getLogger(__name__)


@dataclass
class LateFusionConfig:
    """Everything that defines a late-fusion run (saved beside its results)."""

    image_size: int = 112  # EfficientNet-Lite0 input side (the shapes world renders 112 px)
    pool: str = "avg"  # "avg" | "grid2" | "avg+grid2", see ImageFeatureExtractor
    proj_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.2
    temperature: float = 0.02
    reference_negative: bool = (
        True  # add the batch's reference images as extra negatives (val R@1 1.3 → 15.7)
    )
    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-2
    # Frozen-feature extraction dominates the cost (~15-35 ms per image on one CPU thread); None = every query.
    max_train_queries: int | None = 8000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "circot" / "late_fusion"


class FrozenFeatures:
    """Cached frozen features: images by file content hash, texts by text hash. Encoders load on first need."""

    def __init__(self, cache_dir: str | Path | None = None, image_size: int = 112, pool: str = "avg") -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.image_size, self.pool = image_size, pool
        self._image_encoder: ImageFeatureExtractor | None = None
        self._text_encoder = None
        select_pool(np.zeros((1, ImageFeatureExtractor.dim)), pool)  # validates the name
        self.image_cache = FeatureCache(self.cache_dir / f"images-effnet-lite0-s{image_size}.npz", "float16")
        self.text_cache = FeatureCache(self.cache_dir / "texts-all-MiniLM-L6-v2.npz")
        self.seconds_computing = 0.0
        self.n_computed = 0

    @property
    def image_encoder(self) -> ImageFeatureExtractor:
        if self._image_encoder is None:
            self._image_encoder = ImageFeatureExtractor(self.image_size)
        return self._image_encoder

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from circot.baselines.text_encoder import MiniLMEncoder

            self._text_encoder = MiniLMEncoder()
        return self._text_encoder

    def images(self, paths: Sequence[Path], progress: bool = False) -> np.ndarray:
        keys = [file_hash(p) for p in paths]

        def compute(idx: list[int]) -> np.ndarray:
            t0 = time.perf_counter()
            out = self.image_encoder.encode([paths[i] for i in idx])
            self.seconds_computing += time.perf_counter() - t0
            self.n_computed += len(idx)
            return out

        return select_pool(self.image_cache.get_many(keys, compute, chunk=4096, progress=progress), self.pool)

    def encode_image_now(self, path: Path) -> torch.Tensor:
        """One image, uncached: (1, image_dim) features for ``self.pool`` (used to time a query)."""
        from circot.baselines.features import load_image_tensor

        x = load_image_tensor(path, self.image_size)[None]
        return select_pool(self.image_encoder.encode_tensors(x), self.pool)

    def texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        keys = [text_hash(t) for t in texts]

        def compute(idx: list[int]) -> np.ndarray:
            t0 = time.perf_counter()
            out = self.text_encoder.encode([texts[i] for i in idx])
            self.seconds_computing += time.perf_counter() - t0
            self.n_computed += len(idx)
            return out

        return self.text_cache.get_many(keys, compute, chunk=4096, progress=progress)


@dataclass
class QueryFeatures:
    """Frozen features of a split's queries and gallery (row i of each array = query i / gallery image i)."""

    reference: np.ndarray  # (n, image_dim)
    text: np.ndarray  # (n, 384)
    target: np.ndarray  # (n, image_dim), the first target of each query
    target_ids: np.ndarray  # (n,) int ids of the first targets (the same image has the same id)
    reference_ids: np.ndarray  # (n,) int ids of the references, in the same id space


def split_features(
    split: CIRSplit,
    features: FrozenFeatures,
    max_queries: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> QueryFeatures:
    """Features of the queries that have a target (optionally a seeded random subset of ``max_queries``)."""
    queries = [q for q in split.queries if q.targets]
    if max_queries is not None and len(queries) > max_queries:
        order = np.random.default_rng(seed).permutation(len(queries))[:max_queries]
        queries = [queries[i] for i in sorted(order)]
    images = sorted({q.reference for q in queries} | {q.targets[0] for q in queries})
    feats = features.images([split.image_path(i) for i in images], progress=progress)
    row = {image_id: i for i, image_id in enumerate(images)}
    ref = feats[[row[q.reference] for q in queries]]
    tgt_rows = np.array([row[q.targets[0]] for q in queries], dtype=np.int64)
    return QueryFeatures(
        reference=ref,
        text=features.texts([q.text for q in queries], progress=progress),
        target=feats[tgt_rows],
        target_ids=tgt_rows,
        reference_ids=np.array([row[q.reference] for q in queries], dtype=np.int64),
    )


@dataclass
class LateFusionModel:
    """A trained combiner with the feature settings it was trained on."""

    config: LateFusionConfig
    combiner: Combiner
    history: list[float] = field(default_factory=list)  # mean training loss per epoch
    train_seconds: float = 0.0
    n_train_queries: int = 0

    @torch.inference_mode()
    def query_features(self, reference: np.ndarray, text: np.ndarray) -> np.ndarray:
        self.combiner.eval()
        return self.combiner(torch.from_numpy(reference), torch.from_numpy(text)).numpy()

    @torch.inference_mode()
    def gallery_features(self, images: np.ndarray) -> np.ndarray:
        self.combiner.eval()
        return self.combiner.encode_image(torch.from_numpy(images)).numpy()


def fit_combiner(
    data: QueryFeatures, config: LateFusionConfig, progress: bool = False
) -> tuple[Combiner, list[float]]:
    """Train a fresh Combiner on precomputed features; returns it and the mean loss per epoch."""
    torch.manual_seed(config.seed)
    combiner = Combiner(
        CombinerConfig(
            image_dim=data.reference.shape[1],
            text_dim=data.text.shape[1],
            proj_dim=config.proj_dim,
            hidden_dim=config.hidden_dim,
            dropout=config.dropout,
        )
    )
    ref, txt = torch.from_numpy(data.reference), torch.from_numpy(data.text)
    tgt, tid = torch.from_numpy(data.target), torch.from_numpy(data.target_ids)
    rid = torch.from_numpy(data.reference_ids)
    n = ref.shape[0]
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    total = steps_per_epoch * config.epochs
    opt = torch.optim.AdamW(combiner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))),
    )
    gen = torch.Generator().manual_seed(config.seed)
    history: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.epochs, desc="combiner", unit="epoch")
    combiner.train()
    for _ in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
            if len(idx) < 2:
                continue
            q = combiner(ref[idx], txt[idx])
            t = combiner.encode_image(tgt[idx])
            if config.reference_negative:
                # the batch's references join the candidates as extra negatives
                t = torch.cat([t, combiner.encode_image(ref[idx])])
                ids = torch.cat([tid[idx], rid[idx]])
            else:
                ids = tid[idx]
            loss = info_nce(q, t, config.temperature, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    if bar is not None:
        bar.close()
    combiner.eval()
    return combiner, history


def _load(world_root: str | Path, split: str) -> CIRSplit:
    from circot.data import load_split

    return load_split("shapes", world_root, split)


def train(
    world_root: str | Path,
    config: LateFusionConfig | None = None,
    cache_dir: str | Path | None = None,
    features: FrozenFeatures | None = None,
    progress: bool = False,
) -> LateFusionModel:
    """Train the combiner on the shapes world's train split (frozen features are cached in ``cache_dir``)."""
    config = config or LateFusionConfig()
    features = features or FrozenFeatures(cache_dir, config.image_size, config.pool)
    split = _load(world_root, "train")
    data = split_features(split, features, config.max_train_queries, config.seed, progress)
    t0, cpu0 = time.perf_counter(), time.process_time()
    combiner, history = fit_combiner(data, config, progress)
    seconds = time.perf_counter() - t0
    logger.info("combiner training: %.1f s wall, %.1f s CPU", seconds, time.process_time() - cpu0)
    logger.info(
        "combiner trained on %d queries in %.1f s; final loss %.4f", len(data.text), seconds, history[-1]
    )
    return LateFusionModel(config, combiner, history, seconds, len(data.text))


def evaluate(
    model: LateFusionModel,
    world_root: str | Path | None = None,
    split: str | CIRSplit = "val",
    cache_dir: str | Path | None = None,
    features: FrozenFeatures | None = None,
    progress: bool = False,
):
    """Evaluate on one split in the shared harness; returns :class:`circot.metrics.EvalResult`."""
    from circot.metrics import evaluate as evaluate_scores

    if isinstance(split, str):
        if world_root is None:
            raise ValueError("world_root is needed when split is given by name")
        split = _load(world_root, split)
    features = features or FrozenFeatures(cache_dir, model.config.image_size, model.config.pool)
    gallery = features.images([split.gallery.paths[i] for i in split.gallery.ids], progress=progress)
    references = features.images([split.image_path(q.reference) for q in split.queries], progress=progress)
    texts = features.texts([q.text for q in split.queries], progress=progress)
    scores = model.query_features(references, texts) @ model.gallery_features(gallery).T
    return evaluate_scores(split, scores)


def query_latency_ms(
    model: LateFusionModel, split: CIRSplit, features: FrozenFeatures, n_queries: int = 50
) -> dict[str, float]:
    """Mean time per query at batch size 1, uncached: read + encode the reference image, encode the text, combine.

    Returns ``{"total": ms, "image": ms, "text": ms, "combiner": ms}`` (wall clock) and ``"cpu_total"``: the
    process CPU time per query, which a machine shared with other jobs inflates far less than the wall clock.
    """
    text_encoder = features.text_encoder
    queries = split.queries[:n_queries]
    features.encode_image_now(split.image_path(queries[0].reference))  # warm-up
    text_encoder.encode([queries[0].text])
    model.combiner.eval()
    timings = {"image": 0.0, "text": 0.0, "combiner": 0.0}
    cpu0 = time.process_time()
    for q in queries:
        t0 = time.perf_counter()
        img = features.encode_image_now(split.image_path(q.reference))
        t1 = time.perf_counter()
        txt = torch.from_numpy(text_encoder.encode([q.text]))
        t2 = time.perf_counter()
        with torch.inference_mode():
            model.combiner(img, txt)
        t3 = time.perf_counter()
        timings["image"] += t1 - t0
        timings["text"] += t2 - t1
        timings["combiner"] += t3 - t2
    cpu = time.process_time() - cpu0
    out = {k: 1000 * v / len(queries) for k, v in timings.items()}
    out["total"] = sum(out.values())
    out["cpu_total"] = 1000 * cpu / len(queries)
    return out


def train_and_evaluate(
    world_root: str | Path,
    splits: Sequence[str] = ("val", "test-novel"),
    seed: int = 0,
    config: LateFusionConfig | None = None,
    cache_dir: str | Path | None = None,
    latency_queries: int = 50,
    num_threads: int | None = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Train on the train split, evaluate on ``splits``; the results-table row as a JSON-ready dict.

    Returns ``{"config", "train": {...}, "features": {...}, "splits": {name: {"metrics", "n_queries",
    "conventions", "query_latency_ms", "train_wall_time_s"}}}``. ``train_wall_time_s`` is the combiner's training
    time (frozen features precomputed); the one-off feature extraction time of this run is in ``features``.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    config = config or LateFusionConfig(seed=seed)
    if config.seed != seed:
        config = LateFusionConfig(**{**config.to_dict(), "seed": seed})
    features = FrozenFeatures(cache_dir, config.image_size, config.pool)
    model = train(world_root, config, features=features, progress=progress)
    report: dict[str, Any] = {
        "row": "late fusion (EfficientNet-Lite0 + all-MiniLM-L6-v2, CLIP4Cir-style combiner)",
        "config": config.to_dict(),
        "train": {
            "n_queries": model.n_train_queries,
            "wall_time_s": model.train_seconds,
            "loss_per_epoch": model.history,
        },
        "splits": {},
    }
    for name in splits:
        split = _load(world_root, name)
        result = evaluate(model, split=split, features=features, progress=progress)
        latency = query_latency_ms(model, split, features, latency_queries) if latency_queries else {}
        report["splits"][name] = {
            "metrics": result.metrics,
            "n_queries": result.n_queries,
            "conventions": result.conventions,
            "train_wall_time_s": model.train_seconds,
            "query_latency_ms": latency,
        }
    report["features"] = {
        "seconds_computing_this_run": features.seconds_computing,
        "items_computed_this_run": features.n_computed,
        "cache_dir": str(features.cache_dir),
    }
    return report
