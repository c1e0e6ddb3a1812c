"""The shapes world: generation, determinism, loader, gold CoT."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from circot.data import load_split
from circot.data.shapes import (
    FAMILIES,
    NOVEL_SUBSETS,
    SPLITS,
    World,
    generate,
    gold_cot,
    load,
    parse_description,
    read_annotations,
    scene_from_dict,
)
from circot.data.shapes.grammar import Step, apply_program, interpretations
from circot.data.shapes.scene import describe, pairs
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


def _annotations(root: Path, split: str) -> dict:
    return read_annotations(root, split)


def test_targets_are_every_gallery_image_of_the_target_scene(world: Path) -> None:
    for split in ("val", "test", "test-novel"):
        data = _annotations(world, split)
        images, gallery = data["images"], set(data["gallery"])
        assert gallery == set(images)
        for q in data["queries"]:
            target = scene_from_dict(q["target_scene"])
            same = {i for i in gallery if scene_from_dict(images[i]["scene"]) == target}
            assert set(q["targets"]) == same
            assert images[q["targets"][0]]["role"] == "target"
            assert q["reference"] in gallery
            assert scene_from_dict(images[q["reference"]]["scene"]) == scene_from_dict(q["reference_scene"])
            assert target == apply_program(
                scene_from_dict(q["reference_scene"]), [Step.from_dict(s) for s in q["program"]]
            )


def test_gallery_composition(world: Path) -> None:
    data = _annotations(world, "val")
    roles = Counter(info["role"] for info in data["images"].values())
    assert roles["reference"] == roles["target"] == len(data["queries"])
    assert roles["near_miss"] >= len(data["queries"])  # hard negatives for (almost) every query
    assert roles["random"] > 0 and roles["duplicate"] > 0 and roles["unedited"] > 0
    by_query: dict[str, list[dict]] = {}
    for info in data["images"].values():
        by_query.setdefault(info["query"], []).append(info)
    for q in data["queries"]:
        target, ref = scene_from_dict(q["target_scene"]), scene_from_dict(q["reference_scene"])
        for info in by_query[q["id"]]:
            scene = scene_from_dict(info["scene"])
            if info["role"] == "near_miss":
                assert scene not in (target, ref)
            if info["role"] == "duplicate":
                assert scene == target
            if info["role"] == "unedited":
                assert scene == ref
    # the train split needs no gallery: its image list is the references and targets
    train = _annotations(world, "train")
    assert {i["role"] for i in train["images"].values()} == {"reference", "target"}


def test_held_out_combinations_never_in_train_val_test(world: Path) -> None:
    w = World.from_dict(_annotations(world, "train")["world"])
    held_pairs, held_combos = set(w.held_out_pairs), set(w.held_out_combos)
    assert len(held_pairs) == 5 and len(held_combos) == 5
    for split in ("train", "val", "test"):
        data = _annotations(world, split)
        for info in data["images"].values():
            scene = scene_from_dict(info["scene"])
            assert not (pairs(scene) & held_pairs)
            assert len(scene) <= w.max_objects
        for q in data["queries"]:
            if q["family"] == "two_step":
                assert tuple(q["ops"]) not in held_combos
    novel = _annotations(world, "test-novel")
    subsets = Counter(q["subset"] for q in novel["queries"])
    assert set(subsets) == set(NOVEL_SUBSETS)
    for q in novel["queries"]:
        ref, target = scene_from_dict(q["reference_scene"]), scene_from_dict(q["target_scene"])
        if q["subset"] == "novel_pairs":
            assert pairs(target) & held_pairs
        elif q["subset"] == "more_objects":
            assert len(ref) > w.max_objects
        else:
            assert q["family"] == "two_step" and tuple(q["ops"]) in held_combos


def test_every_text_is_unambiguous_for_its_scene(world: Path) -> None:
    for split in ("val", "test-novel"):
        for q in _annotations(world, split)["queries"]:
            ref, target = scene_from_dict(q["reference_scene"]), scene_from_dict(q["target_scene"])
            assert interpretations(ref, q["text"]) == {target}, q["text"]


def test_families_are_balanced(world: Path) -> None:
    fams = Counter(q["family"] for q in _annotations(world, "val")["queries"])
    assert set(fams) == set(FAMILIES)


def test_cli_generates_and_check_accepts(cli, tmp_path: Path) -> None:
    out = tmp_path / "cli-world"
    args = ["--out", out, "--n-train", "4", "--n-val", "3", "--n-test", "2", "--n-novel", "3", "--seed", "5"]
    code, stdout, err = cli("data", "shapes", *args, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["splits"]["val"]["queries"] == 3 and report["seed"] == 5
    assert (out / "README.md").is_file()
    code, _, err = cli("data", "shapes", *args)
    assert code != 0 and "error:" in err and "overwrite" in err
    code, stdout, err = cli("data", "shapes", *args, "--overwrite", "--intermediate-scenes")
    assert code == 0, err
    assert "queries" in stdout and read_annotations(out, "val")["intermediate_scenes"] is True
    code, stdout, err = cli("data", "check", "--dataset", "shapes", "--root", out)
    assert code == 0, err + stdout


def test_distractors_are_random_edits_of_the_reference(tmp_path: Path) -> None:
    root = generate(tmp_path / "d", seed=1, n_train=2, n_val=10, n_test=0, n_novel=0, distractors=2)
    data = read_annotations(root, "val")
    assert data["distractors"] == 2
    assert not (root / "test.json").exists()
    queries = {q["id"]: q for q in data["queries"]}
    n = 0
    for info in data["images"].values():
        if info["role"] == "distractor":
            n += 1
            q = queries[info["query"]]
            scene = scene_from_dict(info["scene"])
            assert scene not in (scene_from_dict(q["target_scene"]), scene_from_dict(q["reference_scene"]))
    assert n == 20


def test_intermediate_scenes_write_the_middle_scene_and_change_nothing_else(
    world: Path, tmp_path: Path
) -> None:
    mid = generate(tmp_path / "mid", seed=3, intermediate_scenes=True, **TINY)
    plain, other = _digest(world), _digest(mid)
    assert {k for k in plain if plain[k] != other[k]} == {"README.md"} | {f"{s}.json" for s in SPLITS}
    assert "writes out the scene after its first step" in (mid / "README.md").read_text()
    n_two = 0
    for split in SPLITS:
        a, b = read_annotations(world, split), read_annotations(mid, split)
        assert b["intermediate_scenes"] is True and "intermediate_scenes" not in a
        for qa, qb in zip(a["queries"], b["queries"], strict=True):
            assert qa["text"] == qb["text"] and qa["gold_cot"]["conclusion"] == qb["gold_cot"]["conclusion"]
            if qa["family"] != "two_step":
                assert qa["gold_cot"] == qb["gold_cot"]
                continue
            n_two += 1
            ref = scene_from_dict(qb["reference_scene"])
            after_first = apply_program(ref, [Step.from_dict(qb["program"][0])])
            first, then = qa["gold_cot"]["reasoning"].split("; then, ")
            assert (
                qb["gold_cot"]["reasoning"] == f"{first}; the image is {describe(after_first)}; then, {then}"
            )
    assert n_two > 0
