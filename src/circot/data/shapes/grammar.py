"""The edit grammar: semantic edit steps, how they change a scene, and how they are said in English.

A *step* is the meaning of one edit (change an attribute, add, remove, move, swap, a set-level edit); a
*program* is one or two steps. :func:`realize` says a step in every way the grammar allows — several
paraphrases, objects referred to by attributes ("the red circle"), by position ("the object at the top
left") or by relation ("the object to the left of the red circle") — each with its gold reasoning.

Unambiguity: with ``unique=True`` (generation) a reference is produced only when it matches exactly one
object of the scene. With ``unique=False`` every *truthful* phrase is produced, even one that fits several
objects; :func:`interpretations` uses that to check, independently of generation, that a text has exactly
one meaning for its scene.

Relations: "X to the left of A" is produced only when X is the only object anywhere left of A *and* is in
A's row, so that the loose (half-plane) and the strict (same row) readings agree. "directly left of A" names
the adjacent cell.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from circot.data.shapes.scene import (
    ATTRIBUTES,
    CELLS,
    COLORS,
    DIRECTIONS,
    PLURALS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    VALUES,
    Cell,
    Obj,
    Scene,
    at,
    describe,
    empty_cells,
    in_half_plane,
    in_line,
    join_list,
    make_scene,
    neighbour,
    replace,
)

BASE_OPS = ("attribute", "add", "remove", "move", "swap")
FAMILIES = ("attribute", "add", "remove", "move", "swap", "relational", "set", "two_step")
REL_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NOUNS = ("object", "shape")
COMPARATIVE = {"large": "bigger", "small": "smaller"}
SIZE_VERB = {"large": "enlarge", "small": "shrink"}

# --- paraphrase templates ----------------------------------------------------------------------------------
T_COLOR = (
    "make {ref} {value}",
    "change the color of {ref} to {value}",
    "paint {ref} {value}",
    "turn {ref} {value}",
    "recolor {ref} {value}",
)
T_SHAPE = (
    "turn {ref} into a {value}",
    "make {ref} a {value}",
    "change {ref} into a {value}",
    "change the shape of {ref} to a {value}",
)
T_SIZE = ("make {ref} {value}", "make {ref} {cmp}", "{verb} {ref}", "change the size of {ref} to {value}")
T_REMOVE = ("remove {ref}", "delete {ref}", "take away {ref}", "get rid of {ref}")
T_ADD = (
    "add {new} at the {pos}",
    "put {new} at the {pos}",
    "place {new} at the {pos}",
    "insert {new} at the {pos}",
)
T_ADD_REL = (
    "add {new} directly {rel} {anchor}",
    "put {new} directly {rel} {anchor}",
    "place {new} directly {rel} {anchor}",
)
T_MOVE = (
    "move {ref} to the {pos}",
    "shift {ref} to the {pos}",
    "relocate {ref} to the {pos}",
    "put {ref} at the {pos}",
)
T_MOVE_DIR = ("move {ref} one step {dir}", "shift {ref} one cell {dir}", "move {ref} one cell {dir}")
T_MOVE_REL = ("move {ref} directly {rel} {anchor}", "put {ref} directly {rel} {anchor}")
T_SWAP = (
    "swap {a} and {b}",
    "swap the positions of {a} and {b}",
    "exchange {a} and {b}",
    "let {a} and {b} trade places",
)
T_SET_COLOR = ("make {sel} {value}", "paint {sel} {value}", "change the color of {sel} to {value}")
T_SET_SHAPE = ("turn {sel} into {plural}", "make {sel} {plural}", "change {sel} into {plural}")
T_SET_SIZE = ("make {sel} {value}", "change the size of {sel} to {value}")
T_SET_SIZE_CMP = ("make {sel} {cmp}",)  # only when every selected object has the other size
T_SET_REMOVE = ("remove {sel}", "delete {sel}", "take away {sel}")
T_TWO = ("{t1}, then {t2}", "first {t1}, then {t2}", "{t1} and then {t2}", "{t1}; after that, {t2}")
_TWO_SPLIT = tuple(
    re.compile("^" + re.escape(t).replace(r"\{t1\}", "(?P<t1>.+?)").replace(r"\{t2\}", "(?P<t2>.+)") + "$")
    for t in T_TWO
)


@dataclass(frozen=True)
class Step:
    """The meaning of one edit. Objects are identified by their cell (at most one object per cell)."""

    op: str  # attribute | add | remove | move | swap | set
    cell: Cell | None = None  # the edited object (attribute, remove, move, swap)
    other: Cell | None = None  # swap partner
    attr: str | None = None  # attribute: the changed attribute; set: the changed attribute, None = removal
    value: str | None = None
    new: Obj | None = None  # add: the added object
    dest: Cell | None = None  # move: destination
    select: tuple[str, str] | None = None  # set: (attribute, value) selecting the objects

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.op}
        for name in ("cell", "other", "dest"):
            if getattr(self, name) is not None:
                d[name] = list(getattr(self, name))
        if self.attr is not None:
            d["attr"] = self.attr
        if self.value is not None:
            d["value"] = self.value
        if self.new is not None:
            d["new"] = self.new.to_dict()
        if self.select is not None:
            d["select"] = list(self.select)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        def cell(name: str) -> Cell | None:
            return tuple(d[name]) if name in d else None  # type: ignore[return-value]

        return cls(
            op=d["op"],
            cell=cell("cell"),
            other=cell("other"),
            attr=d.get("attr"),
            value=d.get("value"),
            new=Obj.from_dict(d["new"]) if "new" in d else None,
            dest=cell("dest"),
            select=tuple(d["select"]) if "select" in d else None,  # type: ignore[arg-type]
        )


Program = tuple[Step, ...]


def selected(scene: Scene, select: tuple[str, str]) -> list[Obj]:
    attr, value = select
    return [o for o in scene if o.get(attr) == value]


def apply_step(scene: Scene, step: Step) -> Scene:
    """The scene after ``step``; raises ValueError when the step does not apply (no object, cell taken...)."""
    if step.op == "add":
        assert step.new is not None
        if at(scene, step.new.cell) is not None:
            raise ValueError("add: cell taken")
        return make_scene([*scene, step.new])
    if step.op == "set":
        assert step.select is not None
        chosen = selected(scene, step.select)
        if not chosen:
            raise ValueError("set: nothing selected")
        rest = [o for o in scene if o not in chosen]
        if step.attr is None:
            return make_scene(rest)
        return make_scene(rest + [o.with_(**{step.attr: step.value}) for o in chosen])
    obj = at(scene, step.cell) if step.cell is not None else None
    if obj is None:
        raise ValueError(f"{step.op}: no object at {step.cell}")
    if step.op == "attribute":
        return replace(scene, obj, obj.with_(**{step.attr: step.value}))
    if step.op == "remove":
        return replace(scene, obj, None)
    if step.op == "move":
        if step.dest is None or at(scene, step.dest) is not None:
            raise ValueError("move: destination taken")
        return replace(scene, obj, obj.with_(cell=step.dest))
    if step.op == "swap":
        other = at(scene, step.other) if step.other is not None else None
        if other is None or other == obj:
            raise ValueError("swap: no partner")
        rest = [o for o in scene if o not in (obj, other)]
        return make_scene(rest + [obj.with_(cell=other.cell), other.with_(cell=obj.cell)])
    raise ValueError(f"unknown op {step.op!r}")


def apply_program(scene: Scene, program: Sequence[Step]) -> Scene:
    for step in program:
        scene = apply_step(scene, step)
    return scene


# --- references ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """One way of naming an object: the phrase, its kind, the gold reasoning that resolves it."""

    phrase: str
    kind: str  # attribute | position | relation
    reason: str
    anchor: Cell | None = None


def attribute_phrases(obj: Obj) -> Iterator[tuple[str, tuple[str, ...]]]:
    """``("the red circle", ("color", "shape"))`` for every non-empty subset of the object's attributes."""
    for k in range(1, 4):
        for attrs in itertools.combinations(("size", "color", "shape"), k):
            words = [obj.get(a) for a in attrs if a != "shape"]
            nouns = (obj.shape,) if "shape" in attrs else NOUNS
            for noun in nouns:
                yield "the " + " ".join([*words, noun]), attrs


def _matches(scene: Scene, obj: Obj, attrs: tuple[str, ...]) -> list[Obj]:
    return [o for o in scene if all(o.get(a) == obj.get(a) for a in attrs)]


def anchor_refs(scene: Scene, obj: Obj, unique: bool) -> list[str]:
    """Attribute phrases for ``obj`` used as an anchor of a relation."""
    out = []
    for phrase, attrs in attribute_phrases(obj):
        if not unique or len(_matches(scene, obj, attrs)) == 1:
            out.append(phrase)
    return out


def refs(scene: Scene, obj: Obj, unique: bool = True, relations: bool = True) -> list[Ref]:
    """Every phrase naming ``obj`` in ``scene`` (only unambiguous ones when ``unique``)."""
    out: list[Ref] = []
    for phrase in anchor_refs(scene, obj, unique):
        out.append(Ref(phrase, "attribute", f"{phrase} is {obj.the()}"))
    for noun in NOUNS:
        phrase = f"the {noun} at the {POSITIONS[obj.cell]}"
        out.append(Ref(phrase, "position", f"{phrase} is {obj.the()}"))
    if relations:
        for anchor in scene:
            if anchor == obj:
                continue
            for rel in RELATIONS:
                if not in_half_plane(obj, anchor, rel):
                    continue
                if unique:
                    side = [o for o in scene if o != anchor and in_half_plane(o, anchor, rel)]
                    if side != [obj] or not in_line(obj, anchor, rel):
                        continue
                for aphrase in anchor_refs(scene, anchor, unique):
                    for noun in NOUNS:
                        phrase = f"the {noun} {REL_WORDS[rel]} {aphrase}"
                        reason = f"{aphrase} is {anchor.the()}; the {noun} {REL_WORDS[rel]} it is {obj.the()}"
                        out.append(Ref(phrase, "relation", reason, anchor.cell))
    return out


# --- realizations ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Realization:
    """One way of saying a step: the text, its gold reasoning, the kinds of reference it uses."""

    text: str
    reasoning: str
    kinds: tuple[str, ...] = ()
    anchors: tuple[Cell, ...] = field(default=())


def _new_phrase(new: Obj) -> str:
    return f"a {new.noun()}"


def _set_phrases(select: tuple[str, str]) -> list[tuple[str, str]]:
    """(selector phrase, reasoning noun) for a set selection."""
    attr, value = select
    if attr == "shape":
        return [(f"all {PLURALS[value]}", PLURALS[value])]
    return [(f"all {value} {noun}s", f"{value} {noun}s") for noun in NOUNS]


def _change_reason(attr: str, old: str, new: str) -> str:
    return f"its {attr} changes from {old} to {new}"


def realize(scene: Scene, step: Step, unique: bool = True, relations: bool = True) -> list[Realization]:
    """Every text (with gold reasoning) that says ``step`` on ``scene``.

    ``unique``: only references that match exactly one object (generation). ``relations``: allow
    relational references and relative destinations.
    """
    out: list[Realization] = []
    if step.op == "set":
        assert step.select is not None
        chosen = selected(scene, step.select)
        listed = join_list([o.the() for o in chosen])
        for sel, noun in _set_phrases(step.select):
            head = (
                f"the {noun} are {listed}"
                if len(chosen) > 1
                else f"the {noun[:-1] if noun.endswith('s') else noun} is {listed}"
            )
            if step.attr is None:
                texts, tail = (
                    [t.format(sel=sel) for t in T_SET_REMOVE],
                    "they are removed" if len(chosen) > 1 else "it is removed",
                )
            elif step.attr == "color":
                texts, tail = (
                    [t.format(sel=sel, value=step.value) for t in T_SET_COLOR],
                    f"their color changes to {step.value}",
                )
            elif step.attr == "shape":
                assert step.value is not None
                texts = [t.format(sel=sel, plural=PLURALS[step.value]) for t in T_SET_SHAPE]
                tail = f"their shape changes to {step.value}"
            else:
                assert step.value is not None
                texts = [t.format(sel=sel, value=step.value) for t in T_SET_SIZE]
                if all(o.size != step.value for o in chosen):
                    texts += [t.format(sel=sel, cmp=COMPARATIVE[step.value]) for t in T_SET_SIZE_CMP]
                tail = f"their size changes to {step.value}"
            out += [Realization(t, f"{head}; {tail}", ("set",)) for t in texts]
        return out
    if step.op == "add":
        assert step.new is not None
        new = _new_phrase(step.new)
        pos = POSITIONS[step.new.cell]
        for t in T_ADD:
            out.append(Realization(t.format(new=new, pos=pos), f"{new} is added at the {pos}", ()))
        if relations:
            out += _relative_destinations(scene, step.new.cell, None, unique, new_obj=step.new)
        return out
    obj = at(scene, step.cell) if step.cell is not None else None
    assert obj is not None
    obj_refs = refs(scene, obj, unique, relations)
    if step.op == "swap":
        other = at(scene, step.other) if step.other is not None else None
        assert other is not None
        other_refs = refs(scene, other, unique, relations=False)
        for ra in obj_refs:
            for rb in other_refs:
                for t in T_SWAP:
                    out.append(
                        Realization(
                            t.format(a=ra.phrase, b=rb.phrase),
                            f"{ra.reason}; {rb.reason}; they swap places",
                            (ra.kind, rb.kind),
                            (ra.anchor,) if ra.anchor else (),
                        )
                    )
        return out
    for r in obj_refs:
        anchors = (r.anchor,) if r.anchor else ()
        if step.op == "attribute":
            assert step.attr is not None and step.value is not None
            old = obj.get(step.attr)
            if step.attr == "color":
                texts = [t.format(ref=r.phrase, value=step.value) for t in T_COLOR]
            elif step.attr == "shape":
                texts = [t.format(ref=r.phrase, value=step.value) for t in T_SHAPE]
            else:
                v = step.value
                texts = [
                    t.format(ref=r.phrase, value=v, cmp=COMPARATIVE[v], verb=SIZE_VERB[v]) for t in T_SIZE
                ]
            reason = f"{r.reason}; {_change_reason(step.attr, old, step.value)}"
            out += [Realization(t, reason, (r.kind,), anchors) for t in texts]
        elif step.op == "remove":
            out += [
                Realization(t.format(ref=r.phrase), f"{r.reason}; it is removed", (r.kind,), anchors)
                for t in T_REMOVE
            ]
        elif step.op == "move":
            assert step.dest is not None
            pos = POSITIONS[step.dest]
            reason = f"{r.reason}; it moves to the {pos}"
            out += [Realization(t.format(ref=r.phrase, pos=pos), reason, (r.kind,), anchors) for t in T_MOVE]
            for d in DIRECTIONS:
                if neighbour(obj.cell, d) == step.dest:
                    reason = f"{r.reason}; it moves one step {d}, to the {pos}"
                    out += [
                        Realization(t.format(ref=r.phrase, dir=d), reason, (r.kind,), anchors)
                        for t in T_MOVE_DIR
                    ]
            if relations and r.kind != "relation":
                out += _relative_destinations(scene, step.dest, r, unique, moved=obj)
        else:
            raise ValueError(f"unknown op {step.op!r}")
    return out


def _relative_destinations(
    scene: Scene,
    dest: Cell,
    ref: Ref | None,
    unique: bool,
    new_obj: Obj | None = None,
    moved: Obj | None = None,
) -> list[Realization]:
    """Add / move realizations that name the destination relative to an anchor ("directly left of A")."""
    out: list[Realization] = []
    pos = POSITIONS[dest]
    for anchor in scene:
        if anchor == moved:
            continue
        for rel in RELATIONS:
            if neighbour(anchor.cell, rel) != dest:
                continue
            for aphrase in anchor_refs(scene, anchor, unique):
                anchor_reason = f"{aphrase} is {anchor.the()}"
                if new_obj is not None:
                    new = _new_phrase(new_obj)
                    reason = f"{anchor_reason}; {new} is added directly {rel} it, at the {pos}"
                    for t in T_ADD_REL:
                        out.append(
                            Realization(
                                t.format(new=new, rel=rel, anchor=aphrase),
                                reason,
                                ("relation",),
                                (anchor.cell,),
                            )
                        )
                else:
                    assert ref is not None
                    reason = f"{ref.reason}; {anchor_reason}; it moves directly {rel} it, to the {pos}"
                    for t in T_MOVE_REL:
                        text = t.format(ref=ref.phrase, rel=rel, anchor=aphrase)
                        out.append(Realization(text, reason, (ref.kind, "relation"), (anchor.cell,)))
    return out


def combine(r1: Realization, r2: Realization, template: str, mid: Scene | None = None) -> Realization:
    """A two-step realization from the realizations of its steps.

    With ``mid`` (the scene after the first step) the reasoning writes that scene out between the steps, so that
    the second step is read against a scene on the page rather than one held in mind.
    """
    between = f"; the image is {describe(mid)}" if mid is not None else ""
    return Realization(
        template.format(t1=r1.text, t2=r2.text),
        f"first, {r1.reasoning}{between}; then, {r2.reasoning}",
        r1.kinds + r2.kinds,
        r1.anchors + r2.anchors,
    )


# --- enumeration (the independent unambiguity check) ------------------------------------------------------


def all_steps(scene: Scene, max_objects: int = len(CELLS)) -> Iterator[Step]:
    """Every step that applies to ``scene`` and changes it."""
    for obj in scene:
        for attr in ATTRIBUTES:
            for value in VALUES[attr]:
                if value != obj.get(attr):
                    yield Step("attribute", cell=obj.cell, attr=attr, value=value)
        if len(scene) > 1:
            yield Step("remove", cell=obj.cell)
        for cell in empty_cells(scene):
            yield Step("move", cell=obj.cell, dest=cell)
        for other in scene:
            if other != obj and other.noun() != obj.noun():
                yield Step("swap", cell=obj.cell, other=other.cell)
    if len(scene) < max_objects:
        for cell in empty_cells(scene):
            for size in SIZES:
                for color in COLORS:
                    for shape in SHAPES:
                        yield Step("add", new=Obj(cell[0], cell[1], shape, color, size))
    for sel_attr in ATTRIBUTES:
        for sel_value in VALUES[sel_attr]:
            chosen = selected(scene, (sel_attr, sel_value))
            if not chosen:
                continue
            if len(chosen) < len(scene):
                yield Step("set", select=(sel_attr, sel_value))
            for attr in ATTRIBUTES:
                for value in VALUES[attr]:
                    if any(o.get(attr) != value for o in chosen):
                        yield Step("set", select=(sel_attr, sel_value), attr=attr, value=value)


def _may_say(step: Step, text: str, words: set[str]) -> bool:
    """Cheap necessary condition for ``text`` to say ``step`` (every realization names these words)."""
    if step.op == "add":
        return step.new is not None and f"a {step.new.noun()} " in text
    if step.op == "attribute":
        v = step.value
        return v in words or (step.attr == "size" and bool({COMPARATIVE[v], SIZE_VERB[v]} & words))  # type: ignore[index]
    if step.op == "move":
        return POSITIONS[step.dest] in text or "directly" in words or "one" in words  # type: ignore[index]
    if step.op == "set":
        return "all" in words and (step.value is None or step.value in words or PLURALS.get(step.value, "") in words
                                   or COMPARATIVE.get(step.value, "") in words)  # fmt: skip
    return True


def interpretations(scene: Scene, text: str) -> set[Scene]:
    """Every scene that ``text`` can mean for ``scene`` under the grammar, reading references loosely.

    A text is unambiguous when this holds exactly one scene. Two-step texts are split at their connector
    and read step by step.
    """
    results: set[Scene] = set()
    words = set(text.split())
    named = {o.cell: any(r.phrase in text for r in refs(scene, o, unique=False)) for o in scene}
    for step in all_steps(scene):
        if not _may_say(step, text, words):
            continue
        if step.cell is not None and not named[step.cell]:
            continue
        if step.other is not None and not named[step.other]:
            continue
        for r in realize(scene, step, unique=False):
            if r.text == text:
                results.add(apply_step(scene, step))
                break
    for pattern in _TWO_SPLIT:
        m = pattern.match(text)
        if not m:
            continue
        for mid in interpretations(scene, m.group("t1")):
            results |= interpretations(mid, m.group("t2"))
    return results
