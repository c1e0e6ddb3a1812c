"""Sampling the world: held-out combinations, scenes, queries of each edit family, near misses.

Everything here is pure Python on scene graphs (no pixels), driven by a ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from circot.data.shapes.grammar import (
    BASE_OPS,
    T_TWO,
    Program,
    Realization,
    Step,
    apply_program,
    apply_step,
    combine,
    realize,
    selected,
)
from circot.data.shapes.scene import (
    ATTRIBUTES,
    CELLS,
    COLORS,
    SHAPES,
    SIZES,
    VALUES,
    Obj,
    Scene,
    at,
    empty_cells,
    make_scene,
    pairs,
)

NOVEL_SUBSETS = ("novel_pairs", "more_objects", "novel_combos")
FAMILIES = ("attribute", "add", "remove", "move", "swap", "relational", "set", "two_step")
RELATIONAL_OPS = ("attribute", "remove", "move", "add", "swap")
SET_ACTIONS = ("color", "shape", "size", "remove")


@dataclass(frozen=True)
class World:
    """What the world holds out of training, derived from the seed and stated in the dataset card."""

    held_out_pairs: tuple[tuple[str, str], ...]
    held_out_combos: tuple[tuple[str, str], ...]
    max_objects: int = 5  # most objects in any train / val / test scene
    novel_objects: tuple[int, int] = (6, 7)  # object count of more_objects reference scenes

    def to_dict(self) -> dict[str, Any]:
        return {
            "held_out_pairs": [list(p) for p in self.held_out_pairs],
            "held_out_combos": [list(c) for c in self.held_out_combos],
            "max_objects": self.max_objects,
            "novel_objects": list(self.novel_objects),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> World:
        return cls(
            tuple(tuple(p) for p in d["held_out_pairs"]),  # type: ignore[misc]
            tuple(tuple(c) for c in d["held_out_combos"]),  # type: ignore[misc]
            int(d["max_objects"]),
            tuple(d["novel_objects"]),  # type: ignore[arg-type]
        )

    @property
    def train_combos(self) -> tuple[tuple[str, str], ...]:
        return tuple((a, b) for a in BASE_OPS for b in BASE_OPS if (a, b) not in self.held_out_combos)


def make_world(seed: int) -> World:
    """Hold out one colour–shape pair per shape (five distinct colours) and five two-step combinations
    (each base operation once first and once second, never twice the same)."""
    rng = np.random.default_rng([seed, 7919])
    colors = [COLORS[i] for i in rng.permutation(len(COLORS))[: len(SHAPES)]]
    held_pairs = tuple(sorted(zip(colors, SHAPES, strict=True)))
    while True:  # a derangement of the base operations
        perm = [int(i) for i in rng.permutation(len(BASE_OPS))]
        if all(i != p for i, p in enumerate(perm)):
            break
    combos = tuple(sorted((BASE_OPS[i], BASE_OPS[p]) for i, p in enumerate(perm)))
    return World(held_pairs, combos)


@dataclass(frozen=True)
class Rules:
    """Constraints of one split or subset on the scenes and edits it samples."""

    min_objects: int
    max_objects: int  # reference scenes
    max_total: int  # any scene (targets, intermediate scenes, near misses)
    forbidden_pairs: frozenset[tuple[str, str]] = frozenset()
    required_pairs: frozenset[tuple[str, str]] = frozenset()  # the target must hold one of these
    combos: tuple[tuple[str, str], ...] = ()
    families: tuple[str, ...] = FAMILIES

    def valid(self, scene: Scene) -> bool:
        return 1 <= len(scene) <= self.max_total and not (pairs(scene) & self.forbidden_pairs)


def split_rules(world: World, split: str, subset: str | None = None) -> Rules:
    """The rules for train / val / test, or for one test-novel subset."""
    held = frozenset(world.held_out_pairs)
    base = dict(
        min_objects=1, max_objects=world.max_objects, max_total=world.max_objects, forbidden_pairs=held
    )
    if split != "test-novel":
        return Rules(**base, combos=world.train_combos)
    if subset == "novel_pairs":
        return Rules(
            min_objects=1,
            max_objects=world.max_objects,
            max_total=world.max_objects,
            required_pairs=held,
            combos=world.train_combos,
        )
    if subset == "more_objects":
        lo, hi = world.novel_objects
        return Rules(
            min_objects=lo, max_objects=hi, max_total=hi + 1, forbidden_pairs=held, combos=world.train_combos
        )
    if subset == "novel_combos":
        return Rules(**base, combos=world.held_out_combos, families=("two_step",))
    raise ValueError(f"unknown test-novel subset {subset!r}")


# --- scenes ------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def random_object(
    rng: np.random.Generator, cell: tuple[int, int], forbidden: frozenset[tuple[str, str]]
) -> Obj:
    while True:
        obj = Obj(cell[0], cell[1], _choice(rng, SHAPES), _choice(rng, COLORS), _choice(rng, SIZES))
        if obj.pair not in forbidden:
            return obj


def sample_scene(rng: np.random.Generator, rules: Rules, n: int | None = None) -> Scene:
    if n is None:
        n = int(rng.integers(rules.min_objects, rules.max_objects + 1))
    cells = [CELLS[int(i)] for i in rng.permutation(len(CELLS))[:n]]
    return make_scene(random_object(rng, c, rules.forbidden_pairs) for c in cells)


# --- steps -------------------------------------------------------------------------------------------------


def sample_step(rng: np.random.Generator, scene: Scene, op: str, rules: Rules) -> Step | None:
    """A random step of operation ``op`` that applies to ``scene``, or None when there is none."""
    if op == "attribute":
        obj = _choice(rng, scene)
        attr = _choice(rng, ATTRIBUTES)
        value = _choice(rng, [v for v in VALUES[attr] if v != obj.get(attr)])
        return Step("attribute", cell=obj.cell, attr=attr, value=value)
    if op == "add":
        free = empty_cells(scene)
        if not free or len(scene) >= rules.max_total:
            return None
        new = random_object(rng, _choice(rng, free), rules.forbidden_pairs)
        return Step("add", new=new)
    if op == "remove":
        if len(scene) < 2:
            return None
        return Step("remove", cell=_choice(rng, scene).cell)
    if op == "move":
        free = empty_cells(scene)
        if not free:
            return None
        return Step("move", cell=_choice(rng, scene).cell, dest=_choice(rng, free))
    if op == "swap":
        options = [(a, b) for a in scene for b in scene if a < b and a.noun() != b.noun()]
        if not options:
            return None
        a, b = _choice(rng, options)
        if rng.random() < 0.5:
            a, b = b, a
        return Step("swap", cell=a.cell, other=b.cell)
    if op == "set":
        selectors = [
            (attr, value)
            for attr in ATTRIBUTES
            for value in VALUES[attr]
            if len(selected(scene, (attr, value))) >= 2
        ]
        if not selectors:
            return None
        select = _choice(rng, selectors)
        chosen = selected(scene, select)
        action = _choice(rng, SET_ACTIONS)
        if action == "remove":
            if len(chosen) == len(scene):
                return None
            return Step("set", select=select)
        values = [v for v in VALUES[action] if any(o.get(action) != v for o in chosen)]
        return Step("set", select=select, attr=action, value=_choice(rng, values))
    raise ValueError(f"unknown op {op!r}")


def choose_realization(
    rng: np.random.Generator, scene: Scene, step: Step, relational: bool, position_rate: float = 0.3
) -> Realization | None:
    """A random unambiguous way of saying ``step``: relational references only (or never) when asked."""
    options = realize(scene, step, unique=True, relations=relational)
    if relational:
        options = [r for r in options if "relation" in r.kinds]
    if not options:
        return None
    by_position = [r for r in options if "position" in r.kinds]
    others = [r for r in options if "position" not in r.kinds]
    if by_position and (not others or rng.random() < position_rate):
        return _choice(rng, by_position)
    return _choice(rng, others)


@dataclass
class Sampled:
    """One sampled query, before images exist."""

    family: str
    subset: str | None
    reference: Scene
    program: Program
    target: Scene
    realization: Realization
    ops: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


def sample_query(
    rng: np.random.Generator,
    family: str,
    rules: Rules,
    subset: str | None = None,
    max_tries: int = 500,
    intermediate_scenes: bool = False,
) -> Sampled:
    """A random query of ``family`` that satisfies ``rules`` (every text unambiguous by construction).

    ``intermediate_scenes``: a two-step query's gold reasoning writes out the scene after its first step. It changes
    no random draw, so the scenes and texts are those of the default.
    """
    for _ in range(max_tries):
        ref = sample_scene(rng, rules)
        got = _try_family(rng, family, ref, rules, intermediate_scenes)
        if got is None:
            continue
        program, realization, ops, scenes = got
        target = scenes[-1]
        if target == ref or not all(rules.valid(s) for s in scenes):
            continue
        if rules.required_pairs and not (pairs(target) & rules.required_pairs):
            continue
        return Sampled(family, subset, ref, program, target, realization, ops)
    raise RuntimeError(f"could not sample a {family} query under {rules}")


def _try_family(
    rng: np.random.Generator, family: str, ref: Scene, rules: Rules, intermediate_scenes: bool = False
) -> tuple[Program, Realization, tuple[str, ...], list[Scene]] | None:
    if family == "two_step":
        op1, op2 = _choice(rng, rules.combos)
        s1 = sample_step(rng, ref, op1, rules)
        if s1 is None:
            return None
        mid = apply_step(ref, s1)
        s2 = sample_step(rng, mid, op2, rules)
        if s2 is None:
            return None
        target = apply_step(mid, s2)
        r1 = choose_realization(rng, ref, s1, relational=False)
        r2 = choose_realization(rng, mid, s2, relational=False)
        if r1 is None or r2 is None:
            return None
        realization = combine(r1, r2, _choice(rng, T_TWO), mid if intermediate_scenes else None)
        return (s1, s2), realization, (op1, op2), [mid, target]
    if family == "relational":
        op = _choice(rng, RELATIONAL_OPS)
    elif family == "set":
        op = "set"
    else:
        op = family
    step = sample_step(rng, ref, op, rules)
    if step is None:
        return None
    realization = choose_realization(rng, ref, step, relational=family == "relational")
    if realization is None:
        return None
    return (step,), realization, (op,), [apply_step(ref, step)]


# --- near misses ---------------------------------------------------------------------------------------------


def near_misses(
    rng: np.random.Generator, sampled: Sampled, rules: Rules, limit: int = 3
) -> list[tuple[str, Scene]]:
    """Hard negatives: (kind, scene) with kind wrong_object | wrong_value | partial; never the target."""
    ref, program = sampled.reference, sampled.program
    out: list[tuple[str, Scene]] = []
    if len(program) == 2:
        mid = apply_step(ref, program[0])
        out.append(("partial", mid))  # second step not applied
        first_skipped = _safe(ref, program[1])  # first step not applied
        if first_skipped is not None:
            out.append(("partial", first_skipped))
        out += [(k, s) for k, s in _step_misses(rng, mid, program[1], ())]
    else:
        out += _step_misses(rng, ref, program[0], sampled.realization.anchors)
    seen = {sampled.target, ref}
    kept: list[tuple[str, Scene]] = []
    order = rng.permutation(len(out))
    # keep one of each kind first, then fill up
    for pass_ in range(2):
        for i in order:
            kind, scene = out[int(i)]
            if scene in seen or not rules.valid(scene):
                continue
            if pass_ == 0 and any(k == kind for k, _ in kept):
                continue
            kept.append((kind, scene))
            seen.add(scene)
            if len(kept) >= limit:
                return kept
    return kept


def random_edits(rng: np.random.Generator, sampled: Sampled, rules: Rules, n: int) -> list[Scene]:
    """``n`` distinct random single edits of the reference, never the target (gallery distractors)."""
    out: list[Scene] = []
    seen = {sampled.reference, sampled.target}
    for _ in range(20 * n):
        if len(out) >= n:
            break
        step = sample_step(rng, sampled.reference, _choice(rng, BASE_OPS + ("set",)), rules)
        scene = _safe(sampled.reference, step) if step is not None else None
        if scene is None or scene in seen or not rules.valid(scene):
            continue
        seen.add(scene)
        out.append(scene)
    return out


def _safe(scene: Scene, step: Step) -> Scene | None:
    try:
        return apply_step(scene, step)
    except ValueError:
        return None


def _step_misses(
    rng: np.random.Generator, scene: Scene, step: Step, anchors: Sequence[tuple[int, int]]
) -> list[tuple[str, Scene]]:
    out: list[tuple[str, Scene | None]] = []
    if step.op == "set":
        assert step.select is not None
        chosen = selected(scene, step.select)
        one = chosen[int(rng.integers(len(chosen)))]
        if step.attr is None:
            out.append(("partial", make_scene([o for o in scene if o != one])))
        else:
            out.append(
                (
                    "partial",
                    make_scene([o for o in scene if o != one] + [one.with_(**{step.attr: step.value})]),
                )
            )
        attr, value = step.select
        for v in VALUES[attr]:
            if v != value and selected(scene, (attr, v)):
                out.append(
                    (
                        "wrong_object",
                        _safe(scene, Step("set", select=(attr, v), attr=step.attr, value=step.value)),
                    )
                )
        if step.attr is not None:
            for v in VALUES[step.attr]:
                if v != step.value:
                    out.append(
                        (
                            "wrong_value",
                            _safe(scene, Step("set", select=step.select, attr=step.attr, value=v)),
                        )
                    )
        return [(k, s) for k, s in out if s is not None]
    if step.op == "add":
        assert step.new is not None
        new = step.new
        for attr in ("color", "shape"):
            for v in VALUES[attr]:
                if v != new.get(attr):
                    out.append(("wrong_value", _safe(scene, Step("add", new=new.with_(**{attr: v})))))
        for cell in empty_cells(scene):
            if cell != new.cell:
                out.append(("wrong_object", _safe(scene, Step("add", new=new.with_(cell=cell)))))
        return [(k, s) for k, s in out if s is not None]
    # single-object steps: the same edit on another object (the relation's anchor first), or another value
    others = [o.cell for o in scene if o.cell != step.cell and o.cell != step.other]
    anchor_cells = [a for a in anchors if a in others]
    wrong_cells = anchor_cells or others
    for cell in wrong_cells:
        if step.op == "swap":
            alt = Step("swap", cell=cell, other=step.other)
        else:
            alt = Step(step.op, cell=cell, other=step.other, attr=step.attr, value=step.value, dest=step.dest)
        s = _safe(scene, alt)
        if s is not None and (step.op != "attribute" or s != scene):
            out.append(("wrong_object", s))
    if step.op == "attribute":
        assert step.attr is not None
        obj = at(scene, step.cell)  # type: ignore[arg-type]
        assert obj is not None
        for v in VALUES[step.attr]:
            if v not in (step.value, obj.get(step.attr)):
                out.append(
                    ("wrong_value", _safe(scene, Step("attribute", cell=step.cell, attr=step.attr, value=v)))
                )
        if step.attr == "size":  # only two sizes: change the colour instead
            for v in COLORS:
                if v != obj.color:
                    out.append(
                        (
                            "wrong_value",
                            _safe(scene, Step("attribute", cell=step.cell, attr="color", value=v)),
                        )
                    )
    elif step.op == "move":
        for cell in empty_cells(scene):
            if cell != step.dest:
                out.append(("wrong_value", _safe(scene, Step("move", cell=step.cell, dest=cell))))
    elif step.op == "swap":
        for cell in others:
            out.append(("wrong_value", _safe(scene, Step("swap", cell=cell, other=step.cell))))
    return [(k, s) for k, s in out if s is not None]


def target_of(reference: Scene, program: Program) -> Scene:
    return apply_program(reference, program)
