"""Gold chains of thought, the CoT scorer, and the text corpus of the shapes world."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from circot.data.records import CIRQuery
from circot.data.shapes import grammar as g
from circot.data.shapes.sampling import FAMILIES, NOVEL_SUBSETS, make_world, sample_query, split_rules
from circot.data.shapes.scene import COLORS, PLURALS, POSITIONS, SHAPES, SIZES, describe, split_clauses
from circot.errors import DataError
from circot.prompts import CoT, format_cot, parse_cot


def gold_cot(query: CIRQuery) -> CoT:
    """The gold caption / reasoning / conclusion of a shapes query (from ``extras['gold_cot']``)."""
    gold = query.extras.get("gold_cot")
    if not isinstance(gold, Mapping):
        raise DataError(f"shapes: query {query.query_id!r} has no gold_cot")
    cot = CoT(caption=gold["caption"], reasoning=gold["reasoning"], conclusion=gold["conclusion"])
    cot.raw = format_cot(cot)
    return cot


def _as_cot(item: CoT | Mapping[str, Any] | str | None) -> CoT:
    if item is None:  # no reasoning at all: nothing right, not well formed
        return CoT(well_formed=False)
    if isinstance(item, CoT):
        return item
    if isinstance(item, str):
        return parse_cot(item)
    return CoT.from_dict(dict(item))


def canonical_description(text: str) -> tuple[str, ...]:
    """A description's normalised clauses in sorted order: equal for descriptions of the same scene."""
    return tuple(sorted(split_clauses(text)))


def _prf(generated: list[str], gold: list[str]) -> tuple[float, float, float]:
    if not generated and not gold:
        return 1.0, 1.0, 1.0
    hits = sum((Counter(generated) & Counter(gold)).values())
    p = hits / len(generated) if generated else 0.0
    r = hits / len(gold) if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def score_cot(
    generated: Sequence[CoT | Mapping[str, Any] | str | None], gold: Sequence[CoT | Mapping[str, Any] | str]
) -> dict[str, float]:
    """Compare generated chains of thought with the gold ones, pair by pair; means over pairs, in [0, 1].

    - caption_exact: the caption holds exactly the gold clauses (as conclusion_exact below).
    - caption_precision / _recall / _f1: object level — each clause (one object: size, colour, shape,
      position) of the generated caption counts when it equals a gold clause after normalisation.
    - conclusion_exact: the conclusion holds exactly the gold clauses (order, case, spacing, final punctuation
      ignored); conclusion_precision / _recall / _f1 as for the caption.
    - reasoning_exact: the reasoning holds the gold clauses in the gold order (case, spacing and final
      punctuation ignored).
    - read_right: caption and reasoning both exact; all_exact: caption, reasoning and conclusion exact. Their
      ratio is the conclusion's exact match when the model read the scene and the edit right, which tells a
      conclusion that fails to carry out a right reading from one that inherits a wrong caption or reasoning.
    - well_formed: all three parts present, closed and in order (``CoT.well_formed``).
    Strings are parsed with :func:`circot.prompts.parse_cot`; dicts need caption/reasoning/conclusion; a
    generated None (no reasoning) scores as an empty, not well-formed CoT.
    """
    if len(generated) != len(gold):
        raise DataError(f"score_cot: {len(generated)} generated CoTs for {len(gold)} gold CoTs")
    keys = ("caption_exact", "caption_precision", "caption_recall", "caption_f1", "reasoning_exact",
            "conclusion_exact", "conclusion_precision", "conclusion_recall", "conclusion_f1", "read_right",
            "all_exact", "well_formed")  # fmt: skip
    if not generated:
        return {k: 0.0 for k in keys}
    sums = dict.fromkeys(keys, 0.0)
    for gen_item, gold_item in zip(generated, gold, strict=True):
        gen, ref = _as_cot(gen_item), _as_cot(gold_item)
        p, r, f = _prf(split_clauses(gen.caption), split_clauses(ref.caption))
        sums["caption_precision"] += p
        sums["caption_recall"] += r
        sums["caption_f1"] += f
        caption_ok = canonical_description(gen.caption) == canonical_description(ref.caption)
        reasoning_ok = split_clauses(gen.reasoning) == split_clauses(ref.reasoning)
        sums["caption_exact"] += float(caption_ok)
        sums["reasoning_exact"] += float(reasoning_ok)
        p, r, f = _prf(split_clauses(gen.conclusion), split_clauses(ref.conclusion))
        sums["conclusion_precision"] += p
        sums["conclusion_recall"] += r
        sums["conclusion_f1"] += f
        conclusion_ok = canonical_description(gen.conclusion) == canonical_description(ref.conclusion)
        sums["conclusion_exact"] += float(conclusion_ok)
        sums["read_right"] += float(caption_ok and reasoning_ok)
        sums["all_exact"] += float(caption_ok and reasoning_ok and conclusion_ok)
        sums["well_formed"] += float(bool(gen.well_formed))
    return {k: v / len(generated) for k, v in sums.items()}


GROUP_KEYS = ("family", "subset")  # the query extras that group scores, as circot.metrics groups R@1


def score_cot_by_group(
    generated: Sequence[CoT | Mapping[str, Any] | str | None],
    gold: Sequence[CoT | Mapping[str, Any] | str],
    queries: Sequence[CIRQuery],
) -> dict[str, dict[str, float]]:
    """:func:`score_cot` per edit family and per test-novel subset, keyed ``family=NAME`` / ``subset=NAME``
    (the keys of R@1 per group in :func:`circot.metrics.evaluate`); each entry also holds ``n``, its count."""
    if not len(generated) == len(gold) == len(queries):
        raise DataError(
            f"score_cot_by_group: {len(generated)} CoTs, {len(gold)} gold CoTs, {len(queries)} queries"
        )
    members: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        for key in GROUP_KEYS:
            value = q.extras.get(key)
            if value is not None:
                members.setdefault(f"{key}={value}", []).append(i)
    return {
        group: {**score_cot([generated[i] for i in idx], [gold[i] for i in idx]), "n": float(len(idx))}
        for group, idx in sorted(members.items())
    }


def conclusion_given_read_right(scores: Mapping[str, float]) -> tuple[float | None, int]:
    """From a group's :func:`score_cot_by_group` entry: the conclusion's exact match among the queries whose
    caption and reasoning are right (None when there are none), and their count."""
    n_read = round(scores["read_right"] * scores["n"])
    return (scores["all_exact"] / scores["read_right"] if n_read else None), n_read


def _template_lines() -> Iterator[str]:
    """Every paraphrase template, filled with example words, so that every template word occurs."""
    ref, sel = "the red circle", "all circles"
    fill = dict(ref=ref, a=ref, b="the blue star", value="blue", cmp="bigger", verb="enlarge", new="a small green star",
                pos="top left", dir="up", rel="left of", anchor="the blue square", sel=sel, plural="stars",
                t1="remove the red circle", t2="add a small green star at the top left")  # fmt: skip
    for name in dir(g):
        if name.startswith("T_"):
            for t in getattr(g, name):
                yield t.format(**fill)


def corpus(seed: int = 0, n_per_family: int = 40) -> Iterator[str]:
    """Every kind of text the world produces: captions, edit texts, reasoning, conclusions.

    Deterministic. It first names every colour, shape, size, position, relation and template, then
    yields ``n_per_family`` sampled queries per edit family for train rules and for each test-novel subset
    (caption, text, reasoning, conclusion each). Enough to train the tiny model's tokenizer.
    """
    for size, color, shape in itertools.product(SIZES, COLORS, SHAPES):
        yield f"a {size} {color} {shape}; all {PLURALS[shape]}; all {color} objects; all {size} shapes"
    yield "; ".join(f"the object at the {p}" for p in POSITIONS.values())
    yield "; ".join(f"the shape {w} it" for w in g.REL_WORDS.values())
    yield from _template_lines()
    world = make_world(seed)
    rng = np.random.default_rng([seed, 104729])
    settings = [(None, None, FAMILIES)] + [("test-novel", s, FAMILIES) for s in NOVEL_SUBSETS]
    for split, subset, families in settings:
        rules = split_rules(world, split or "train", subset)
        for family in families:
            if family not in rules.families:
                continue
            for _ in range(n_per_family):
                q = sample_query(rng, family, rules, subset)
                yield describe(q.reference)
                yield q.realization.text
                yield q.realization.reasoning
                yield describe(q.target)
