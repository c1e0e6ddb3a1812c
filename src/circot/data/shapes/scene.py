"""The scene model of the shapes world: objects on a 3×3 grid, their canonical descriptions and relations.

A scene is a tuple of :class:`Obj` in canonical order (row-major by cell); at most one object per cell.
Two scenes are equal when they hold the same objects in the same cells: rendering jitter, background and
noise are not part of a scene.

Canonical description (the gold caption and conclusion): one clause per object, in canonical order, joined
by ``"; "``, e.g. ``"a large red circle at the top left; a small blue star at the center"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
ATTRIBUTES = ("color", "shape", "size")
VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES}
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
GRID = 3
CELLS = tuple((r, c) for r in range(GRID) for c in range(GRID))
POSITIONS = {
    (0, 0): "top left",
    (0, 1): "top middle",
    (0, 2): "top right",
    (1, 0): "middle left",
    (1, 1): "center",
    (1, 2): "middle right",
    (2, 0): "bottom left",
    (2, 1): "bottom middle",
    (2, 2): "bottom right",
}
CELL_OF = {name: cell for cell, name in POSITIONS.items()}
CLAUSE_SEP = "; "

Cell = tuple[int, int]


@dataclass(frozen=True, order=True)
class Obj:
    """One object: its cell (row, col) comes first so that sorting gives the canonical order."""

    row: int
    col: int
    shape: str
    color: str
    size: str

    @property
    def cell(self) -> Cell:
        return (self.row, self.col)

    @property
    def pair(self) -> tuple[str, str]:
        """The (colour, shape) pair, the unit that test-novel holds out."""
        return (self.color, self.shape)

    def get(self, attr: str) -> str:
        return getattr(self, attr)

    def with_(self, **changes: Any) -> Obj:
        fields = {
            "row": self.row,
            "col": self.col,
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
        }
        if "cell" in changes:
            fields["row"], fields["col"] = changes.pop("cell")
        fields.update(changes)
        return Obj(**fields)

    def noun(self) -> str:
        """``"large red circle"``."""
        return f"{self.size} {self.color} {self.shape}"

    def a(self) -> str:
        """Indefinite canonical clause: ``"a large red circle at the top left"``."""
        return f"a {self.noun()} at the {POSITIONS[self.cell]}"

    def the(self) -> str:
        """Definite canonical phrase: ``"the large red circle at the top left"``."""
        return f"the {self.noun()} at the {POSITIONS[self.cell]}"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "col": self.col, "shape": self.shape, "color": self.color, "size": self.size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Obj:
        return cls(
            int(data["row"]), int(data["col"]), str(data["shape"]), str(data["color"]), str(data["size"])
        )


Scene = tuple[Obj, ...]


def make_scene(objects: Iterable[Obj]) -> Scene:
    """Canonical scene from objects; raises ValueError when two objects share a cell."""
    scene = tuple(sorted(objects))
    cells = [o.cell for o in scene]
    if len(set(cells)) != len(cells):
        raise ValueError("two objects share a cell")
    return scene


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    return {"objects": [o.to_dict() for o in scene]}


def scene_from_dict(data: dict[str, Any]) -> Scene:
    return make_scene(Obj.from_dict(o) for o in data["objects"])


def at(scene: Scene, cell: Cell) -> Obj | None:
    for o in scene:
        if o.cell == cell:
            return o
    return None


def empty_cells(scene: Scene) -> list[Cell]:
    used = {o.cell for o in scene}
    return [c for c in CELLS if c not in used]


def replace(scene: Scene, old: Obj, new: Obj | None) -> Scene:
    """Scene with ``old`` replaced by ``new`` (or removed when ``new`` is None)."""
    return make_scene([o for o in scene if o != old] + ([new] if new is not None else []))


def describe(scene: Scene) -> str:
    """Canonical description: one clause per object in canonical order."""
    return CLAUSE_SEP.join(o.a() for o in scene)


_CLAUSE = re.compile(
    r"^an? (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) at the (?P<pos>[a-z ]+)$",
)


def normalize_clause(clause: str) -> str:
    """Lower case, single spaces, no surrounding punctuation."""
    clause = re.sub(r"\s+", " ", clause.strip().lower())
    return clause.strip(" .,;:")


def split_clauses(text: str) -> list[str]:
    """The normalised, non-empty clauses of a description (split on ``;``, newlines and sentence ends)."""
    parts = re.split(r";|\n|\.(?:\s|$)", text)
    return [c for c in (normalize_clause(p) for p in parts) if c]


def parse_clause(clause: str) -> Obj | None:
    """Object of one canonical clause, or None when the clause is not canonical."""
    m = _CLAUSE.match(normalize_clause(clause))
    if not m:
        return None
    size, color, shape, pos = m.group("size", "color", "shape", "pos")
    if size not in SIZES or color not in COLORS or shape not in SHAPES or pos not in CELL_OF:
        return None
    row, col = CELL_OF[pos]
    return Obj(row, col, shape, color, size)


def parse_description(text: str) -> Scene | None:
    """Scene of a canonical description, or None when any clause is not canonical or cells collide."""
    objs = [parse_clause(c) for c in split_clauses(text)]
    if not objs or any(o is None for o in objs):
        return None
    try:
        return make_scene(objs)  # type: ignore[arg-type]
    except ValueError:
        return None


# --- relations -------------------------------------------------------------------------------------------

RELATIONS = ("left of", "right of", "above", "below")
# relation -> (drow, dcol) step from the anchor towards the related object
REL_STEP = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def in_half_plane(obj: Obj, anchor: Obj, relation: str) -> bool:
    """Loose reading: ``obj`` lies anywhere on that side of ``anchor`` (any row / column)."""
    dr, dc = REL_STEP[relation]
    if dc:
        return (obj.col - anchor.col) * dc > 0
    return (obj.row - anchor.row) * dr > 0


def in_line(obj: Obj, anchor: Obj, relation: str) -> bool:
    """Strict reading: ``obj`` is on that side of ``anchor`` in the same row (or column)."""
    dr, dc = REL_STEP[relation]
    same = obj.row == anchor.row if dc else obj.col == anchor.col
    return same and in_half_plane(obj, anchor, relation)


def neighbour(cell: Cell, relation_or_direction: str) -> Cell | None:
    """The adjacent cell on that side, or None at the border."""
    dr, dc = REL_STEP.get(relation_or_direction) or DIRECTIONS[relation_or_direction]
    r, c = cell[0] + dr, cell[1] + dc
    return (r, c) if 0 <= r < GRID and 0 <= c < GRID else None


def pairs(scene: Scene) -> set[tuple[str, str]]:
    return {o.pair for o in scene}


def join_list(items: Sequence[str]) -> str:
    """``"a, b and c"``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
