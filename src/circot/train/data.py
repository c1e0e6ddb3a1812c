"""Training examples: CIR records joined with their chain of thought, images loaded within pixel bounds.

A training example is one (reference image, modification text, target image, CoT) quadruple. The CoT comes
from an annotations JSONL file (``circot annotate``; FashionIQ, CIRR) or, for the shapes world, from its gold
reasoning. Batches are drawn by :class:`StepBatchSampler`, whose order depends only on the seed and the step,
so that a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from circot.data.records import CIRSplit
from circot.errors import DataError
from circot.prompts import CoT, format_cot
from circot.train.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

# Modification text of an identity example (perception task): the target is the reference itself.
IDENTITY_TEXT = "keep the scene as it is"
IDENTITY_REASONING = "nothing changes"


@dataclass(frozen=True)
class Example:
    """One training row.

    ``target_key``: identity of the target image (equal keys = the same image or an exact duplicate; never
    used as a negative of each other). ``cot``: the CoT to teacher-force (None when the stage needs none).
    """

    query_id: str
    reference: Path
    text: str
    target: Path
    target_key: int
    cot: CoT | None = None
    reference_key: int = -1
    family: str | None = None
    identity: bool = False
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def identity_example(src: Example, query_id: str | None = None) -> Example:
    """The identity row of ``src``'s target: the target image is the query, "keep the scene as it is" the
    text, and the target's description (``src``'s conclusion) both caption and conclusion."""
    if src.cot is None:
        raise DataError(f"query {src.query_id!r}: an identity row needs the CoT (the target's description)")
    desc = src.cot.conclusion
    return Example(
        query_id=query_id or f"identity/{src.query_id}",
        reference=src.target,
        text=IDENTITY_TEXT,
        target=src.target,
        target_key=src.target_key,
        reference_key=src.target_key,
        cot=CoT(caption=desc, reasoning=IDENTITY_REASONING, conclusion=desc),
        family="identity",
        identity=True,
    )


def cots_for_split(
    split: CIRSplit, annotations: dict[str, CoT] | None, annotations_path: str | Path | None = None
) -> list[CoT]:
    """The CoT of every query of ``split``, in order.

    From ``annotations`` when given (every query must have one: a missing record is a DataError naming the
    query and the file); otherwise from the dataset's gold CoT (``extras["gold_cot"]``, the shapes world).
    """
    out: list[CoT] = []
    where = f" in {annotations_path}" if annotations_path else ""
    for i, q in enumerate(split.queries):
        if annotations is not None:
            cot = annotations.get(q.query_id)
            if cot is None:
                raise DataError(
                    f"{split.dataset}/{split.split}: query {q.query_id!r} (record {i}) has no CoT annotation{where}"
                )
        else:
            gold = q.extras.get("gold_cot")
            if gold is None:
                raise DataError(
                    f"{split.dataset}/{split.split}: query {q.query_id!r} (record {i}) has no gold CoT; "
                    "give data.annotations (a JSONL file written by `circot annotate`)"
                )
            cot = gold if isinstance(gold, CoT) else CoT.from_dict(gold)
        out.append(cot)
    return out


def build_examples(
    split: CIRSplit,
    cots: Sequence[CoT] | None = None,
    *,
    max_queries: int | None = None,
    max_text_chars: int = 400,
    max_cot_chars: int = 2000,
    identity_fraction: float = 0.0,
    seed: int = 0,
) -> list[Example]:
    """Turn a split (and optionally its CoT, aligned with ``split.queries``) into training examples.

    Queries without a target are skipped; texts longer than ``max_text_chars`` are cut; examples whose CoT is
    longer than ``max_cot_chars`` are dropped (counted in the log). ``identity_fraction`` adds that share of
    identity rows (target image as its own query, "no change", caption = conclusion = the target's description
    taken from the CoT's conclusion), a perception task in the same format.
    """
    if cots is not None and len(cots) != len(split.queries):
        raise DataError(f"{split.dataset}/{split.split}: {len(cots)} CoTs for {len(split.queries)} queries")
    keys: dict[str, int] = {}
    examples: list[Example] = []
    dropped_long = dropped_no_target = 0
    queries = split.queries if max_queries is None else split.queries[:max_queries]
    for i, q in enumerate(queries):
        if not q.targets:
            dropped_no_target += 1
            continue
        cot = cots[i] if cots is not None else None
        if cot is not None and len(format_cot(cot)) > max_cot_chars:
            dropped_long += 1
            continue
        try:
            reference = split.image_path(q.reference)
            target = split.image_path(q.targets[0])
        except KeyError as exc:
            raise DataError(
                f"{split.dataset}/{split.split}: query {q.query_id!r} (record {i}) names image {exc.args[0]!r} "
                "that the split does not hold"
            ) from None
        # Shapes: scenes with the same description are the same image; elsewhere the target id is its identity.
        key_name = cot.conclusion if (split.dataset == "shapes" and cot is not None) else q.targets[0]
        key = keys.setdefault(key_name, len(keys))
        ref_name = cot.caption if (split.dataset == "shapes" and cot is not None) else q.reference
        ref_key = keys.setdefault(ref_name, len(keys))
        examples.append(
            Example(
                query_id=q.query_id,
                reference=reference,
                text=q.text[:max_text_chars],
                target=target,
                target_key=key,
                cot=cot,
                reference_key=ref_key,
                family=q.extras.get("family"),
                extras={"subset": q.extras.get("subset")},
            )
        )
    if dropped_long:
        logger.warning(
            "%s/%s: dropped %d examples whose CoT is longer than %d characters",
            split.dataset,
            split.split,
            dropped_long,
            max_cot_chars,
        )
    if dropped_no_target:
        logger.info(
            "%s/%s: skipped %d queries without a ground-truth target",
            split.dataset,
            split.split,
            dropped_no_target,
        )
    if identity_fraction > 0 and examples:
        rng = random.Random(seed)
        n_identity = int(round(len(examples) * identity_fraction / (1.0 - identity_fraction)))
        base = [e for e in examples if e.cot is not None]
        if not base:
            raise DataError("data.identity_fraction needs CoT (the target's description) for the examples")
        examples.extend(
            identity_example(base[rng.randrange(len(base))], f"identity/{j}") for j in range(n_identity)
        )
    if not examples:
        raise DataError(f"{split.dataset}/{split.split}: no usable training examples")
    return examples


def noisy_answer_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    p: float,
    protected: torch.Tensor,
    generator: torch.Generator,
    words: torch.Tensor | None = None,
) -> torch.Tensor:
    """A copy of ``input_ids`` in which each supervised answer token (``labels`` not -100) that is not in
    ``protected`` (tags, ``<emb>``, stop tokens) is, with probability ``p``, replaced by one of those tokens
    drawn at random from the batch. ``labels`` are left as they are, so the model still predicts the right
    token after a wrong one (word dropout on the teacher-forced CoT).

    With ``words`` (token ids, at least two), only the answer tokens among ``words`` are candidates, and each
    one hit is replaced by another of ``words`` drawn uniformly: the model then reads, say, a wrong colour while
    it predicts the shape that follows it, and every other word of the CoT stays as written."""
    out = input_ids.clone()
    supervised = labels != IGNORE_INDEX
    if words is not None:
        candidates = supervised & torch.isin(input_ids, words)
    else:
        candidates = supervised & ~torch.isin(input_ids, protected)
    if p <= 0 or not candidates.any():
        return out
    hit = candidates & (torch.rand(input_ids.shape, generator=generator) < p)
    n_hit = int(hit.sum())
    if not n_hit:
        return out
    if words is not None:
        at = (input_ids[hit][:, None] == words[None, :]).int().argmax(dim=1)
        shift = torch.randint(1, words.numel(), (n_hit,), generator=generator)
        out[hit] = words[(at + shift) % words.numel()]
    else:
        pool = input_ids[candidates]
        out[hit] = pool[torch.randint(pool.numel(), (n_hit,), generator=generator)]
    return out


class ExampleDataset:
    """Map-style dataset over examples (torch DataLoader compatible). Items hold the examples only: the
    model's image preprocessor reads (and, in training, caches) the images when a batch is built."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "example": self.examples[index]}


def collate(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Keep a batch as lists (the model's ``build_batch`` does the tensor work)."""
    return {key: [it[key] for it in items] for key in items[0]} if items else {}


class StepBatchSampler:
    """Batches of example indices for steps ``start_step`` … ``end_step - 1``, a pure function of the seed.

    The data is shuffled once per epoch (seed + epoch); the global batch of a step is the next
    ``batch_size × num_processes`` indices, of which this process takes its slice. With gradient
    accumulation every micro-step is a step here.
    """

    def __init__(
        self,
        n_examples: int,
        batch_size: int,
        start_step: int,
        end_step: int,
        seed: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        if n_examples < 1:
            raise ValueError("no examples to sample from")
        self.n = n_examples
        self.batch_size = batch_size
        self.start_step = start_step
        self.end_step = end_step
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self._perm_cache: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perm_cache = {epoch: order}
        return self._perm_cache[epoch]

    def global_batch(self, step: int) -> list[int]:
        size = self.batch_size * self.num_processes
        start = step * size
        out: list[int] = []
        while len(out) < size:
            epoch, pos = divmod(start + len(out), self.n)
            take = min(size - len(out), self.n - pos)
            out.extend(self._perm(epoch)[pos : pos + take])
        return out

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            batch = self.global_batch(step)
            lo = self.process_index * self.batch_size
            yield batch[lo : lo + self.batch_size]


__all__ = [
    "IDENTITY_REASONING",
    "IDENTITY_TEXT",
    "Example",
    "ExampleDataset",
    "StepBatchSampler",
    "build_examples",
    "collate",
    "cots_for_split",
    "identity_example",
    "noisy_answer_inputs",
]
