"""`circot eval --store`: the ranking comes from the vector store (faiss or milvus-lite), built when missing."""

from __future__ import annotations

import json

import pytest

from retrieval_fakes import shapes_tiny_model, small_world

pytest.importorskip("milvus_lite")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("shapes") / "w")


@pytest.fixture(scope="module")
def model():
    return shapes_tiny_model()


@pytest.mark.parametrize("backend", ["faiss", "milvus-lite"])
def test_eval_through_a_store_gives_the_exact_metrics(world, model, tmp_path, backend):
    from circot.errors import CircotError
    from circot.evaluate import evaluate
    from circot.store import build_store, read_store_manifest

    uri = str(tmp_path / "ix") if backend == "faiss" else f"milvus-lite://{tmp_path / 'g.db'}?collection=val"
    exact = evaluate(model, "shapes", world, "val", mode="fast", cache_dir=tmp_path)
    built = evaluate(model, "shapes", world, "val", mode="fast", cache_dir=tmp_path, store=uri)
    assert read_store_manifest(uri).count == exact.n_gallery  # built from the split's gallery
    reused = evaluate(model, "shapes", world, "val", mode="fast", cache_dir=tmp_path, store=uri)
    assert "R@10" in exact.metrics.metrics
    assert built.metrics.metrics == exact.metrics.metrics == reused.metrics.metrics
    other = (
        str(tmp_path / "other") if backend == "faiss" else f"milvus-lite://{tmp_path / 'g.db'}?collection=o"
    )
    with build_store(other, model.embedding_dim, model.fingerprint) as store:
        store.add(model.encode_images([str(p) for p in sorted(world.rglob("*.png"))[:3]]), ["a", "b", "c"])
    with pytest.raises(CircotError, match="holds 3 images, not this split's gallery"):
        evaluate(model, "shapes", world, "val", mode="fast", cache_dir=tmp_path, store=other)


def test_eval_cli_store(cli, world, model, tmp_path):
    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    args = ["eval", "--dataset", "shapes", "--root", world, "--split", "val", "--model", model_dir]
    args += ["--mode", "fast", "--cache", tmp_path / "c"]
    code, _, err = cli(*args, "--json", tmp_path / "exact.json")
    assert code == 0, err
    code, _, err = cli(*args, "--json", tmp_path / "store.json", "--store", tmp_path / "val.db")
    assert code == 0, err
    exact, through = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("exact", "store"))
    assert "R@1" in exact["metrics"] and through["metrics"] == exact["metrics"]
    assert (tmp_path / "val.db").is_dir()
