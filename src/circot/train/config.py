"""The training configuration: typed dataclasses read from YAML or JSON, overridden by ``key=value`` flags.

A run directory always holds the resolved configuration (``config.yaml``) it was trained with, so a run can
be reproduced and resumed from its folder alone.

Layout (every field has a default; see ``configs/`` for complete examples)::

    run_dir: runs/shapes-tiny-cot
    seed: 0
    model: {init: tiny, overrides: {...}, dtype: null}
    data: {dataset: shapes, root: data/shapes, train_split: train, val_split: val, annotations: null, ...}
    optim: {batch_size: 64, grad_accum: 1, weight_decay: 0.01, max_grad_norm: 1.0, mixed_precision: auto}
    loss: {temperature: null, symmetric: false, hard_negatives: 0}
    stages:
      - {name: align, mode: fast, steps: 1000, lr: 1e-3, warmup: 100, lambda_txt: 0.0, lambda_info: 1.0}
      - {name: cot, mode: full, steps: 2000, lr: 5e-4, warmup: 100, lambda_txt: 1.0, lambda_info: 1.0}
    eval: {every: 500, max_queries: 300, modes: [fast]}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from circot.errors import ConfigError

STAGE_MODES = ("fast", "full", "perception")
QUERY_MODES = ("fast", "full")
COT_SOURCES = ("gold", "generated")
PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class ModelSection:
    """Where the model starts from.

    ``init``: ``tiny`` (a fresh tiny Qwen2-VL with a BPE trained on the dataset's text), a model directory, or a
    hub id. ``overrides``: fields passed to ``CIRCoT.tiny`` (vision depth, hidden size...) or, for a checkpoint,
    :class:`circot.config.CIRCoTConfig` fields (``lora``, ``gradient_checkpointing``, ``max_pixels``...).
    ``dtype``: weights' dtype when loading a checkpoint (``bfloat16`` for big backbones), None = float32.
    ``text_attention``: the language model's attention implementation while training (``eager``, ``sdpa``;
    None keeps the model's). On CPU, eager attention trains the tiny model faster than SDPA, whose CPU
    flash-attention backward dominated a step (benchmarks/train_step.py); it is not saved with the model.
    """

    init: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    text_attention: str | None = None


@dataclass
class DataSection:
    """The training and validation data.

    ``annotations`` / ``val_annotations``: CoT JSONL files (``circot annotate``) for FashionIQ/CIRR; for
    ``shapes`` the gold CoT of the world is used when they are None. ``max_*``: cut the splits (first N queries;
    None = all). ``identity_fraction``: share of extra training rows whose text asks for no change and whose
    target is the reference image itself (a captioning/perception task in the CoT format; needs a dataset
    that can describe its images, i.e. shapes).
    """

    dataset: str = "shapes"
    root: str = "data/shapes"
    train_split: str = "train"
    val_split: str | None = "val"
    annotations: str | None = None
    val_annotations: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_train_queries: int | None = None
    max_text_chars: int = 400
    max_cot_chars: int = 2000
    identity_fraction: float = 0.0
    num_workers: int = 0


@dataclass
class OptimSection:
    batch_size: int = 32
    grad_accum: int = 1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    min_lr_ratio: float = 0.05
    # full-mode rows of a batch are split into this many sub-batches of similar CoT length (less padding)
    length_groups: int = 1
    # memory kept for the frozen vision tower's outputs (per process, on the training device)
    vision_cache_mb: float = 2048.0
    # GradCache: at most this many rows per forward in a contrastive step, the gradient of the whole batch
    # (large contrastive batches on limited memory; LamRA forwards in chunks of 32); None = one forward
    contrastive_chunk: int | None = None


@dataclass
class LossSection:
    """``temperature``: τ of InfoNCE (None: the model config's). ``hard_negatives``: 0 = in-batch targets
    only; 1 = also the batch's reference images (each is the "edit not applied" near miss of its query), shared
    by every query except where a reference shows the query's target scene."""

    temperature: float | None = None
    symmetric: bool = False
    hard_negatives: int = 0


@dataclass
class StageSection:
    """One training stage.

    ``mode``: ``fast`` (the query answers ``<emb>`` at once; InfoNCE only) or ``full`` (teacher-forced CoT then
    ``<emb>``; CE + InfoNCE). ``fast_fraction``: in a full stage, the share of rows trained in fast form too
    (so that one model serves both modes). ``cot_source``: ``gold`` or ``generated`` — in a generated stage the
    embedding is computed after the model's own greedy CoT (regenerated every ``regenerate_every`` steps for a
    pool of ``generated_pool`` queries) while the CE still reads the gold CoT; ``generated_fraction`` of the rows
    use it. ``corrupt_prob``: chance that a row's conclusion is replaced by another query's (its CE is then
    skipped), so the embedding learns not to trust a wrong conclusion blindly. ``identity_prob``: chance that a
    row becomes the identity row of its target (the target image as the query, "keep the scene as it is", its
    description as caption and conclusion): a perception task; 1.0 with ``lambda_info: 0`` is a pure captioning
    stage that teaches the model to see (the gallery passes of the contrastive loss are then skipped).
    ``steer_prob``: chance that a full row takes another query's conclusion *and* that query's target (no CE
    on the row): the embedding learns to follow the conclusion it reads, so that editing the reasoning steers
    retrieval. ``mode: perception`` (shapes world only): the vision tower and a small head that is not saved
    learn every grid cell's occupancy, colour, shape and size from the scene graphs, over the train split's
    images (batches of ``optim.batch_size``); the language model is untouched. ``freeze``: parameter-name
    prefixes kept fixed in this stage (``model.model.visual`` is the vision tower; while it is frozen its
    outputs are computed once per training image and cached). ``conclusion_weight``: in the CE, each token of
    the conclusion (from ``<conclusion>`` to ``<emb>``) counts this many times against once for the caption's
    and reasoning's (1 = the plain token mean). ``family_weights``: ``{family: weight}``; when set, the stage's
    rows are drawn afresh with replacement, each training example with probability proportional to its
    family's weight (1 for a family not named; identity rows are the family ``identity``), so that a stage can
    dwell on the edits the model gets wrong. ``train_root``: the stage draws its rows (or, in a perception
    stage, its images) from the training split under this root instead of ``data.root`` (same dataset, split
    name and options; None = ``data.root``); validation and the tokenizer of a fresh model stay ``data.root``'s,
    so that a later stage can train on a larger split of the same world. ``token_noise``: in a full stage, the
    share of the teacher-forced CoT's word tokens (not its tags, nor ``<emb>``) that the model reads as another
    word of the batch's CoTs while it still predicts the right one: word dropout, so that the next word is
    read off the image and the text rather than off the word before it (a colour–shape pair never seen in
    training is otherwise written as a seen one). ``token_noise_words``: when set, token noise replaces only
    these words (each one token of the model's tokenizer, after a space), each by another of them: noise on
    the colour words alone breaks the colour-to-shape bigram and leaves the rest of the CoT, which the
    conclusion copies, as written. ``grayscale_prob`` (perception stages): the share of each batch's images that
    the tower sees in grey, each mixed from its red, green and blue channels with random weights, their colour
    labels ignored: shape must then be read without hue or a fixed brightness, so that a colour–shape pair
    never seen in training is not read as a seen one (no held-out pair is ever shown).
    """

    name: str = "stage"
    mode: str = "fast"
    steps: int = 100
    lr: float = 1e-3
    warmup: int = 0
    lambda_txt: float = 1.0
    lambda_info: float = 1.0
    fast_fraction: float = 0.0
    cot_source: str = "gold"
    generated_fraction: float = 0.5
    generated_pool: int = 2048
    regenerate_every: int = 500
    corrupt_prob: float = 0.0
    identity_prob: float = 0.0
    steer_prob: float = 0.0
    conclusion_weight: float = 1.0
    family_weights: dict[str, float] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)
    train_root: str | None = None
    token_noise: float = 0.0
    token_noise_words: list[str] = field(default_factory=list)
    grayscale_prob: float = 0.0


@dataclass
class EvalSection:
    """Periodic evaluation on the val split (R@k by :func:`circot.metrics.evaluate`); ``modes`` among
    fast/full; ``max_queries`` keeps it quick (the gallery is cut to those queries' images)."""

    every: int = 500
    max_queries: int | None = 300
    # val images scored by the perception head (per-attribute accuracy) when the run has a perception stage
    perception_images: int = 512
    modes: list[str] = field(default_factory=lambda: ["fast"])
    batch_size: int = 64
    final_max_queries: int | None = None


@dataclass
class TrainConfig:
    run_dir: str = "runs/circot"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    stages: list[StageSection] = field(default_factory=lambda: [StageSection()])
    eval: EvalSection = field(default_factory=EvalSection)
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    num_threads: int | None = None
    # stop this invocation after this global step (a checkpoint is saved; `--resume` continues) — for jobs
    # that run in time slices
    stop_after: int | None = None
    # train for this many seconds of wall time instead of a step count: the stages and the learning-rate
    # schedule advance with the share of the budget spent (stage i gets steps_i / total of it). Runs end on
    # time whatever the machine's load; they are not step-for-step reproducible.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError("stages: at least one stage is needed")
        for i, st in enumerate(self.stages):
            where = f"stages.{i} ({st.name})"
            if st.mode not in STAGE_MODES:
                raise ConfigError(f"{where}.mode must be one of {STAGE_MODES}, got {st.mode!r}")
            if st.cot_source not in COT_SOURCES:
                raise ConfigError(f"{where}.cot_source must be one of {COT_SOURCES}, got {st.cot_source!r}")
            if st.mode != "perception" and st.lambda_info == 0 and (st.mode != "full" or st.lambda_txt <= 0):
                raise ConfigError(
                    f"{where}: lambda_info 0 needs a full stage with lambda_txt > 0 (nothing to learn)"
                )
            # written so that NaN fails too (every comparison with NaN is false)
            if not 0 < st.conclusion_weight < math.inf:
                raise ConfigError(
                    f"{where}.conclusion_weight must be a finite number > 0, got {st.conclusion_weight}"
                )
            for family, w in st.family_weights.items():
                if not 0 <= w < math.inf:
                    raise ConfigError(
                        f"{where}.family_weights.{family} must be a finite number >= 0, got {w}"
                    )
            if st.train_root is not None and not str(st.train_root).strip():
                raise ConfigError(f"{where}.train_root must be a folder (or null for data.root)")
            if st.steps < 0 or st.warmup < 0 or not 0 < st.lr < math.inf:
                raise ConfigError(f"{where}: steps and warmup must be >= 0 and lr a finite number > 0")
            for name in (
                "fast_fraction",
                "generated_fraction",
                "corrupt_prob",
                "identity_prob",
                "steer_prob",
            ):
                if not 0.0 <= getattr(st, name) <= 1.0:
                    raise ConfigError(f"{where}.{name} must be in [0, 1]")
            if not 0.0 <= st.token_noise < 1.0:
                raise ConfigError(f"{where}.token_noise must be in [0, 1), got {st.token_noise}")
            if not 0.0 <= st.grayscale_prob <= 1.0 or (st.grayscale_prob and st.mode != "perception"):
                raise ConfigError(f"{where}.grayscale_prob must be in [0, 1], and only in a perception stage")
            if st.token_noise_words and (st.token_noise == 0 or len(set(st.token_noise_words)) < 2):
                raise ConfigError(
                    f"{where}.token_noise_words needs token_noise > 0 and at least two different words"
                )
        if self.optim.vision_cache_mb < 0:
            raise ConfigError("optim.vision_cache_mb must be >= 0")
        if self.optim.contrastive_chunk is not None and self.optim.contrastive_chunk < 1:
            raise ConfigError("optim.contrastive_chunk must be >= 1 (or null)")
        if self.optim.batch_size < 1 or self.optim.grad_accum < 1 or self.optim.length_groups < 1:
            raise ConfigError("optim.batch_size, optim.grad_accum and optim.length_groups must be >= 1")
        if self.model.text_attention not in (None, "eager", "sdpa"):
            raise ConfigError("model.text_attention must be eager, sdpa or null")
        if self.optim.mixed_precision not in PRECISIONS:
            raise ConfigError(f"optim.mixed_precision must be one of {PRECISIONS}")
        if not 0.0 <= self.data.identity_fraction < 1.0:
            raise ConfigError("data.identity_fraction must be in [0, 1)")
        if self.has_perception and self.data.dataset != "shapes":
            raise ConfigError(
                "a perception stage needs the shapes world's scene graphs (data.dataset: shapes)"
            )
        for mode in self.eval.modes:
            if mode not in QUERY_MODES:
                raise ConfigError(f"eval.modes: unknown mode {mode!r}")

    @property
    def total_steps(self) -> int:
        return sum(st.steps for st in self.stages)

    @property
    def has_perception(self) -> bool:
        return any(st.mode == "perception" for st in self.stages)

    def stage_root(self, stage: StageSection) -> str:
        """The root of the training split ``stage`` draws from."""
        return stage.train_root or self.data.root

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["optim"]["betas"] = list(self.optim.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TrainConfig:
        return _build(cls, data, where)

    def save(self, path: str | Path) -> Path:
        """Write the resolved config as YAML (or JSON for a ``.json`` path), atomically."""
        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write_text(path, text)
        return path


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return _build(tp, value, where)
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(item, v, f"{where}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return {_coerce(key_tp, k, where): _coerce(value_tp, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        args = get_args(tp)
        return tuple(_coerce(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=False)))
    args = get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            and not (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: Any, data: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a mapping (one-line errors)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: cannot parse ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` flag in place; the value is parsed as YAML (``1e-3``, ``true``, ``[a, b]``).

    List items are addressed by index (``stages.1.steps=200``).
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value (e.g. optim.batch_size=16)")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        path = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {path} is not an index of the list")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {key}: {path} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {key}: {last} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read ``path`` (YAML/JSON; None = defaults), apply ``key=value`` overrides, validate."""
    data = read_config_file(path) if path is not None else {}
    # stages are filled with defaults first so that "stages.0.lr=..." works on a default config
    if overrides and "stages" not in data:
        data["stages"] = [asdict(StageSection())]
    for item in overrides:
        apply_override(data, item)
    where = str(path) if path is not None else "config"
    try:
        return TrainConfig.from_dict(data, where="config")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


__all__ = [
    "DataSection",
    "EvalSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "StageSection",
    "TrainConfig",
    "apply_override",
    "load_config",
    "read_config_file",
]
