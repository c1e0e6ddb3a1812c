"""FashionIQ, CIRR and CIRCO loaders on tiny folders in the official layouts."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from cir_datasets import build_circo, build_cirr, build_fashioniq, circo_id, cirr_name, fiq_ids
from circot.data import load_split
from circot.data.fashioniq import eval_caption, training_caption
from circot.errors import DataError

# ---------------------------------------------------------------------------------------------------------- FashionIQ


def test_fashioniq_val_all_categories(tmp_path):
    root = build_fashioniq(tmp_path / "fiq", png=("shirt",))
    split = load_split("fashioniq", root, "val")
    assert split.dataset == "fashioniq" and len(split.queries) == 9
    q = split.queries[0]
    assert q.query_id == "dress/0" and q.extras == {"category": "dress", "index": 0}
    assert q.reference == fiq_ids("dress", "val", 8)[0] and q.targets == (fiq_ids("dress", "val", 8)[1],)
    assert q.raw_texts == ("is dress number 0.", " has  val colour?")
    assert q.text == "Is dress number 0 and has  val colour"
    # per-category galleries in split-file order; the union shares the image common to shirt and toptee
    assert split.category_galleries["dress"] == fiq_ids("dress", "val", 8)
    assert len(split.gallery.ids) == 3 * 8 - 1
    # .png images are found as well as .jpg
    shirt = fiq_ids("shirt", "val", 8)[0]
    assert split.gallery.path(shirt).name == f"{shirt}.png" and split.gallery.path(shirt).exists()
    assert split.conventions["caption_join"] == "eval" and split.conventions["gallery"] == "official"


def test_fashioniq_one_category_test_split_and_val_union(tmp_path):
    root = build_fashioniq(tmp_path / "fiq")
    test = load_split("fashioniq", root, "test", category="toptee")
    assert len(test.queries) == 3 and all(not q.targets for q in test.queries)
    assert test.gallery.ids == fiq_ids("toptee", "test", 8)
    union = load_split("fashioniq", root, "val", category="dress", gallery="val_union")
    assert union.gallery.ids == fiq_ids("dress", "val", 8)[:4]
    assert union.conventions["gallery"] == "val_union"


def test_fashioniq_caption_joins():
    caps = ["Is SHINY and silver.", " fit and flare? "]
    assert eval_caption(caps) == "Is shiny and silver and fit and flare"
    assert eval_caption(caps, cased=True) == "Is SHINY and silver and fit and flare"
    rng = random.Random(0)
    seen = {training_caption(caps, rng) for _ in range(200)}
    assert seen == {
        "Is shiny and silver and fit and flare",
        "Fit and flare and Is SHINY and silver",
        "Is shiny and silver",
        "Fit and flare",
    }


def test_fashioniq_random_join_is_seeded(tmp_path):
    root = build_fashioniq(tmp_path / "fiq", n_queries=6)
    a = load_split("fashioniq", root, "train", caption_join="random", seed=3)
    b = load_split("fashioniq", root, "train", caption_join="random", seed=3)
    assert [q.text for q in a.queries] == [q.text for q in b.queries]
    assert a.conventions["caption_join"] == "random (seed=3)"


def test_fashioniq_malformed_record_names_file_and_index(tmp_path):
    root = build_fashioniq(tmp_path / "fiq")
    path = root / "captions" / "cap.dress.val.json"
    records = json.loads(path.read_text())
    del records[1]["target"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"cap\.dress\.val\.json: record 1: missing field 'target'"):
        load_split("fashioniq", root, "val")
    records[1]["target"] = "NOT_IN_GALLERY"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"record 1: target 'NOT_IN_GALLERY' is not in the gallery"):
        load_split("fashioniq", root, "val", category="dress")
    path.write_text('[{"candidate": "x", ')
    with pytest.raises(DataError, match=r"cap\.dress\.val\.json: not valid JSON"):
        load_split("fashioniq", root, "val")


def test_fashioniq_bad_options(tmp_path):
    root = build_fashioniq(tmp_path / "fiq")
    with pytest.raises(DataError, match="unknown category 'skirt'"):
        load_split("fashioniq", root, "val", category="skirt")
    with pytest.raises(DataError, match="unknown split"):
        load_split("fashioniq", root, "dev")
    with pytest.raises(DataError, match="unknown caption_join"):
        load_split("fashioniq", root, "val", caption_join="concat")


# ---------------------------------------------------------------------------------------------------------- CIRR


def test_cirr_val(tmp_path):
    root = build_cirr(tmp_path / "cirr_dataset", splits=("val",))
    split = load_split("cirr", root, "val")
    # gallery = keys of the split file, including images that are never a reference
    assert split.gallery.ids == [cirr_name("val", i) for i in range(56)]
    q = split.queries[0]
    assert (
        q.query_id == "12060" and q.reference == cirr_name("val", 0) and q.targets == (cirr_name("val", 1),)
    )
    assert q.text == "make picture 0 brighter"
    assert len(q.extras["members"]) == 6 and q.reference in q.extras["members"]
    assert split.gallery.path(q.reference) == root / "dev" / f"{q.reference}.png"
    assert split.gallery.path(q.reference).exists()


def test_cirr_train_subfolders_and_flat_fallback(tmp_path):
    root = build_cirr(tmp_path / "cirr_dataset", splits=("train", "test1"))
    split = load_split("cirr", root, "train")
    name = cirr_name("train", 4)
    assert split.gallery.path(name) == root / "train" / "1" / f"{name}.png"
    # images downloaded without the numbered sub-folders: found by file name in train/
    for sub in (root / "train").iterdir():
        for f in sub.iterdir():
            f.rename(root / "train" / f.name)
        sub.rmdir()
    split = load_split("cirr", root, "train")
    assert split.gallery.path(name) == root / "train" / f"{name}.png"
    # or in a flat folder given by the user
    flat = tmp_path / "flat"
    shutil.move(root / "test1", flat)
    test = load_split("cirr", root, "test1", image_dir=flat)
    assert all(test.gallery.path(i).parent == flat for i in test.gallery.ids)
    assert all(not q.targets for q in test.queries)


def test_cirr_bad_split_and_malformed_record(tmp_path):
    root = build_cirr(tmp_path / "cirr_dataset", splits=("val",))
    with pytest.raises(DataError, match="unknown split .test.; choose one of: train, val, test1"):
        load_split("cirr", root, "test")
    path = root / "cirr" / "captions" / "cap.rc2.val.json"
    records = json.loads(path.read_text())
    records[2]["pairid"] = "oops"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"cap\.rc2\.val\.json: record 2: field 'pairid' must be an integer"):
        load_split("cirr", root, "val")
    records[2]["pairid"] = records[0]["pairid"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="record 2: pairid 12060 appears twice"):
        load_split("cirr", root, "val")


def test_cirr_missing_annotations(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no annotation folder"):
        load_split("cirr", tmp_path / "empty", "val")
    with pytest.raises(DataError, match="does not exist"):
        load_split("cirr", tmp_path / "nope", "val")


# ---------------------------------------------------------------------------------------------------------- CIRCO


def test_circo_val_gallery_and_text(tmp_path):
    root = build_circo(tmp_path / "CIRCO")
    split = load_split("circo", root, "val")
    assert split.gallery.ids == [str(circo_id(i)) for i in range(60)]
    first = split.gallery.ids[0]
    assert split.gallery.path(first).name == f"{int(first):012d}.jpg" and split.gallery.path(first).exists()
    q = split.queries[2]
    assert q.query_id == "2" and q.text == "has 2 more dogs"
    assert q.targets == (str(circo_id(3)), str(circo_id(9)), str(circo_id(11)))
    assert q.extras["semantic_aspects"] == ["cardinality", "addition"]
    assert split.conventions["use_shared_concept"] is False
    with_concept = load_split("circo", root, "val", use_shared_concept=True)
    assert with_concept.queries[2].text == "find a scene number 2 but has 2 more dogs"
    assert with_concept.conventions["use_shared_concept"] is True
    test = load_split("circo", root, "test")
    assert len(test.queries) == 4 and not test.queries[0].targets


def test_circo_malformed_record(tmp_path):
    root = build_circo(tmp_path / "CIRCO")
    path = root / "annotations" / "val.json"
    records = json.loads(path.read_text())
    del records[3]["relative_caption"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"val\.json: record 3: missing field 'relative_caption'"):
        load_split("circo", root, "val")
    (root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json").unlink()
    with pytest.raises(DataError, match="missing COCO image info file"):
        load_split("circo", root, "test")
