"""The shapes world: generation, determinism, loader, gold CoT."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from circot.data import load_split
from circot.data.shapes import (
    FAMILIES,
    NOVEL_SUBSETS,
    SPLITS,
    generate,
    gold_cot,
    load,
    parse_description,
    scene_from_dict,
)
from circot.errors import CircotError, DataError

TINY = dict(n_train=24, n_val=16, n_test=8, n_novel=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("shapes") / "world", seed=3, **TINY)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes(world: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", seed=3, workers=2, **TINY)
    assert _digest(world) == _digest(again)
    other = generate(tmp_path / "other", seed=4, **TINY)
    assert (other / "val.json").read_bytes() != (world / "val.json").read_bytes()


def test_layout_and_card(world: Path) -> None:
    for split in SPLITS:
        assert (world / f"{split}.json").is_file()
        assert (world / f"{split}_gallery.txt").is_file()
    card = (world / "README.md").read_text()
    assert "seed 3" in card and "generator version" in card
    for subset in NOVEL_SUBSETS:
        assert subset in card


def test_loader_gives_cirsplit_with_extras(world: Path) -> None:
    for split in SPLITS:
        s = load_split("shapes", world, split)
        assert s.dataset == "shapes" and s.split == split
        assert len(s.queries) == {"train": 24, "val": 16, "test": 8, "test-novel": 12}[split]
        for q in s.queries:
            assert q.extras["family"] in FAMILIES
            assert set(q.extras["gold_cot"]) == {"caption", "reasoning", "conclusion"}
            assert s.image_path(q.reference).is_file()
            for t in q.targets:
                assert s.image_path(t).is_file()
            if split == "test-novel":
                assert q.extras["subset"] in NOVEL_SUBSETS
            else:
                assert q.extras["subset"] is None


def test_gold_cot_matches_scenes(world: Path) -> None:
    s = load(world, "val")
    for q in s.queries:
        cot = gold_cot(q)
        assert cot.well_formed
        assert parse_description(cot.caption) == scene_from_dict(q.extras["reference_scene"])
        assert parse_description(cot.conclusion) == scene_from_dict(q.extras["target_scene"])


def test_generate_refuses_non_empty_folder(world: Path, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(CircotError):
        generate(tmp_path, **TINY)


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load(tmp_path, "val")
    (tmp_path / "val.json").write_text("{not json")
    with pytest.raises(DataError, match="val.json"):
        load(tmp_path, "val")
