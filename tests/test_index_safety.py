"""An index never loses what a user owns: its own files only, one writer at a time, bad images skipped on
request, damaged manifests and item maps reported in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from circot.errors import CircotError
from circot.gallery import add_images, build_index
from circot.index import GalleryIndex, read_manifest
from circot.store import open_store
from retrieval_fakes import FakeEncoder, write_images


class DecodingEncoder(FakeEncoder):
    """A fake encoder that decodes each image first, as the real model does."""

    def encode_images(self, images, batch_size=32, show_progress_bar=False):
        for im in images:
            with Image.open(im) as opened:
                opened.load()
        return super().encode_images(images, batch_size, show_progress_bar)


def test_build_keeps_the_users_files_in_an_existing_index_folder(tmp_path):
    write_images(tmp_path / "g", 4)
    build_index(FakeEncoder(), tmp_path / "g", tmp_path / "ix", use_cache=False)
    mine = ["items-list.csv", "vectors-2019.npy", ".vectors-notes", ".items-x", "notes.txt"]
    for name in mine:
        (tmp_path / "ix" / name).write_text("the user's own file")
    first = read_manifest(tmp_path / "ix").files
    build_index(FakeEncoder(), tmp_path / "g", tmp_path / "ix", use_cache=False)  # rebuild in place
    second = read_manifest(tmp_path / "ix").files
    for name in mine:
        assert (tmp_path / "ix" / name).read_text() == "the user's own file", name
    assert all(not (tmp_path / "ix" / f).exists() for f in first.values())  # the old generation is gone
    assert all((tmp_path / "ix" / f).is_file() for f in second.values())
    assert len(GalleryIndex.load(tmp_path / "ix")) == 4


def test_build_refuses_a_non_empty_folder_that_is_not_an_index(tmp_path):
    write_images(tmp_path / "g", 3)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "vectors-2019.npy").write_text("keep me")
    encoder = FakeEncoder()
    with pytest.raises(CircotError, match="not empty and is not a circot index.*--overwrite"):
        build_index(encoder, tmp_path / "g", tmp_path / "photos", use_cache=False)
    assert encoder.images == 0  # refused before encoding
    build_index(encoder, tmp_path / "g", tmp_path / "photos", use_cache=False, overwrite=True)
    assert (tmp_path / "photos" / "vectors-2019.npy").read_text() == "keep me"
    assert len(GalleryIndex.load(tmp_path / "photos")) == 3


def test_cli_build_refuses_a_file_or_a_foreign_folder_before_loading_the_model(cli, tmp_path):
    write_images(tmp_path / "g", 2)
    (tmp_path / "taken.txt").write_text("x")
    code, _, err = cli("index", "build", "--images", tmp_path / "g", "--out", tmp_path / "taken.txt")
    assert code != 0 and err.startswith("error: ") and "existing file" in err and "taken.txt" in err
    code, _, err = cli("index", "build", "--images", tmp_path / "g", "--out", tmp_path / "taken.txt" / "ix")
    assert code != 0 and err.startswith("error: ") and "is a file, not a folder" in err
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "items-list.csv").write_text("a,b")
    code, _, err = cli("index", "build", "--images", tmp_path / "g", "--out", tmp_path / "own")
    assert code != 0 and "--overwrite" in err and len(err.strip().splitlines()) == 1


class AddsDuringEncoding(FakeEncoder):
    """Starts a second ``add_images`` on the same index while the first one is encoding."""

    def __init__(self, index, other_images):
        super().__init__()
        self.index, self.other_images, self.second = index, other_images, None

    def encode_images(self, images, batch_size=32, show_progress_bar=False):
        if self.second is None:
            try:
                self.second = add_images(self.index, FakeEncoder(), self.other_images, use_cache=False)
            except CircotError as exc:
                self.second = exc
        return super().encode_images(images, batch_size, show_progress_bar)


def test_two_adds_at_once_never_lose_images(tmp_path):
    write_images(tmp_path / "base", 3)
    write_images(tmp_path / "a", 2, start=10)
    write_images(tmp_path / "b", 2, start=20)
    build_index(FakeEncoder(), tmp_path / "base", tmp_path / "ix", use_cache=False)
    first = AddsDuringEncoding(tmp_path / "ix", tmp_path / "b")
    _, added = add_images(tmp_path / "ix", first, tmp_path / "a", use_cache=False)
    assert added == 2
    # the second run was told to wait, instead of both reporting success and one losing its images
    assert isinstance(first.second, CircotError), first.second
    assert "another circot run is writing this index" in str(first.second)
    assert len(GalleryIndex.load(tmp_path / "ix")) == 5
    _, added = add_images(tmp_path / "ix", FakeEncoder(), tmp_path / "b", use_cache=False)  # after: fine
    assert added == 2 and len(GalleryIndex.load(tmp_path / "ix")) == 7


def test_skip_bad_leaves_out_unreadable_images_and_reports_them(tmp_path):
    write_images(tmp_path / "g", 5)
    (tmp_path / "g" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CircotError, match="broken.png"):
        build_index(DecodingEncoder(), tmp_path / "g", tmp_path / "ix", use_cache=False, batch_size=4)
    index = build_index(
        DecodingEncoder(),
        tmp_path / "g",
        tmp_path / "ix",
        cache_dir=tmp_path / "c",
        batch_size=4,
        skip_bad=True,
    )
    assert len(index) == 5 and "broken.png" not in index.ids
    report = json.loads((tmp_path / "ix" / "skipped.json").read_text())
    assert [r["id"] for r in report] == ["broken.png"] and report[0]["reason"]
    loaded = GalleryIndex.load(tmp_path / "ix")
    assert len(loaded) == 5 and np.isfinite(loaded.vectors()).all()


@pytest.mark.parametrize("backend", ["faiss", "milvus-lite"])
def test_add_with_skip_bad_indexes_the_readable_images_and_extends_the_report(tmp_path, backend):
    if backend == "faiss":
        uri, report = str(tmp_path / "ix"), tmp_path / "ix" / "skipped.json"
    else:
        pytest.importorskip("milvus_lite")
        uri, report = (
            f"milvus-lite://{tmp_path / 'g.db'}?collection=shop",
            tmp_path / "g.db.shop.skipped.json",
        )
    write_images(tmp_path / "g", 3)
    (tmp_path / "g" / "old-broken.png").write_bytes(b"not an image")
    build_index(DecodingEncoder(), tmp_path / "g", uri, use_cache=False, skip_bad=True)
    write_images(tmp_path / "more", 2, start=10)
    (tmp_path / "more" / "new-broken.png").write_bytes(b"not an image either")
    with pytest.raises(CircotError, match="new-broken.png"):  # without the flag a bad image stops the add
        add_images(uri, DecodingEncoder(), tmp_path / "more", use_cache=False)
    store, added = add_images(uri, DecodingEncoder(), tmp_path / "more", use_cache=False, skip_bad=True)
    assert added == 2 and list(store.skipped) == [str(tmp_path / "more" / "new-broken.png")]
    rows = json.loads(report.read_text())
    assert sorted(r["id"] for r in rows) == ["new-broken.png", "old-broken.png"] and all(
        r["reason"] for r in rows
    )
    # the broken image repaired: the next add indexes it and takes it off the report
    Image.new("RGB", (8, 8)).save(tmp_path / "more" / "new-broken.png")
    store, added = add_images(uri, DecodingEncoder(), tmp_path / "more", use_cache=False, skip_bad=True)
    assert added == 1 and store.skipped == {}
    assert [r["id"] for r in json.loads(report.read_text())] == ["old-broken.png"]
    store = open_store(uri)
    try:
        assert len(store) == 6 and "new-broken.png" in store.ids and "old-broken.png" not in store.ids
    finally:
        if hasattr(store, "close"):
            store.close()


@pytest.mark.parametrize("backend", ["faiss", "milvus-lite"])
def test_add_with_replace_re_encodes_only_the_changed_images_and_replaces_their_vectors(tmp_path, backend):
    if backend == "faiss":
        uri = str(tmp_path / "ix")
    else:
        pytest.importorskip("milvus_lite")
        uri = f"milvus-lite://{tmp_path / 'g.db'}?collection=shop"
    write_images(tmp_path / "g", 4)
    build_index(FakeEncoder(), tmp_path / "g", uri, cache_dir=tmp_path / "cache")
    (tmp_path / "g" / "img-0001.png").write_bytes((tmp_path / "g" / "img-0003.png").read_bytes())  # edited
    write_images(tmp_path / "g", 1, start=7)
    model = FakeEncoder()
    _, added = add_images(uri, model, tmp_path / "g", cache_dir=tmp_path / "cache")
    assert added == 1 and model.images == 1  # without the flag, the edited image keeps its old vector
    _, written = add_images(uri, model, tmp_path / "g", cache_dir=tmp_path / "cache", replace=True)
    assert written == 5 and model.images == 1  # all five written; the edit's bytes were cached (as img-0003)
    store = open_store(uri)
    try:
        assert len(store) == 5
        query = FakeEncoder().encode_images([tmp_path / "g" / "img-0003.png"])
        scores, ids = store.search(query, 2)
        assert sorted(ids[0]) == ["img-0001.png", "img-0003.png"] and scores[0] == pytest.approx(
            [1, 1], abs=1e-5
        )
    finally:
        if hasattr(store, "close"):
            store.close()


def test_cli_skip_bad_prints_the_count(cli, tmp_path, monkeypatch):
    from retrieval_fakes import tiny_model_dir

    monkeypatch.setenv("CIRCOT_CACHE", str(tmp_path / "cache"))
    model = tiny_model_dir(tmp_path / "model")
    write_images(tmp_path / "g", 3, size=24)
    (tmp_path / "g" / "broken.png").write_bytes(b"not an image")
    args = ["index", "build", "--model", model, "--images", tmp_path / "g", "--out", tmp_path / "ix"]
    code, _, err = cli(*args)
    errors = [line for line in err.splitlines() if "error: " in line]
    assert code != 0 and len(errors) == 1 and "broken.png" in errors[0]
    code, out, err = cli(*args, "--skip-bad")
    assert code == 0, err
    assert "skipped 1 unreadable image(s)" in out and "skipped.json" in out
    assert len(GalleryIndex.load(tmp_path / "ix")) == 3
    write_images(tmp_path / "more", 1, start=10, size=24)
    (tmp_path / "more" / "bad.png").write_bytes(b"not an image")
    code, out, err = cli(
        "index", "add", "--index", tmp_path / "ix", "--images", tmp_path / "more", "--skip-bad"
    )
    assert code == 0, err
    assert "(1 added)" in out and "skipped 1 unreadable image(s)" in out
    assert len(GalleryIndex.load(tmp_path / "ix")) == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [("files", None), ("files", ["a"]), ("files", {"index": "../x"}), ("dim", "8"), ("search_params", 3)],
)
def test_manifest_with_wrong_types_is_one_clear_error(cli, tmp_path, field, value):
    write_images(tmp_path / "g", 2)
    build_index(FakeEncoder(), tmp_path / "g", tmp_path / "ix", use_cache=False)
    path = tmp_path / "ix" / "manifest.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(CircotError, match=f"field {field!r}"):
        GalleryIndex.load(tmp_path / "ix")
    code, _, err = cli("index", "info", "--index", tmp_path / "ix")
    assert code != 0 and err.startswith("error: ") and "manifest.json" in err and "Traceback" not in err


class VectorModel:
    """A query model whose fast-mode embedding is a fixed vector."""

    def __init__(self, vector, fingerprint):
        self.vector, self.fingerprint = vector, fingerprint

    def encode_queries(self, images, texts, mode="fast", batch_size=16, cots=None):
        return np.stack([self.vector] * len(images))


def test_integer_ids_keep_the_rank_1_hit_and_k_is_capped(tmp_path, monkeypatch):
    from circot.search import search_query

    write_images(tmp_path / "g", 4)
    enc = FakeEncoder()
    build_index(
        enc,
        sorted((tmp_path / "g").glob("*.png")),
        tmp_path / "ix",
        ids=["0", "1", "2", "3"],
        use_cache=False,
    )
    items_path = tmp_path / "ix" / read_manifest(tmp_path / "ix").files["items"]
    items = json.loads(items_path.read_text())
    items["ids"] = [0, 1, 2, 3]  # an items file written with integer ids
    items_path.write_text(json.dumps(items))
    index = GalleryIndex.load(tmp_path / "ix")
    vector = enc.encode_images([sorted((tmp_path / "g").glob("*.png"))[0]])[0]
    asked = []
    real = index.search

    def spy(queries, k=10):
        asked.append(k)
        assert k <= len(index), f"asked for {k} slots of a {len(index)}-image gallery"
        return real(queries, k)

    monkeypatch.setattr(index, "search", spy)
    model = VectorModel(vector, enc.fingerprint)
    result = search_query(model, index, Image.new("RGB", (8, 8)), "anything", k=10**9, mode="fast")
    assert [h.id for h in result.hits][:1] == ["0"] and len(result.hits) == 4
    assert [h.rank for h in result.hits] == [1, 2, 3, 4] and asked == [4]
