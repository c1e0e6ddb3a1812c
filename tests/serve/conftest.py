"""Fixtures of the web-service tests: a tiny random model, a tiny gallery of drawn shapes and its index."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import COLORS, CORPUS, LIMITS, SHAPES, draw


@pytest.fixture(scope="session")
def tiny_model():
    import torch

    from circot.model import CIRCoT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = CIRCoT.tiny(tokenizer_corpus=CORPUS, max_cot_tokens=16, seed=0)
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gallery_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gallery")
    for shape in SHAPES:
        for name, rgb in COLORS.items():
            draw(shape, rgb).save(folder / f"{name}-{shape}.png")
    return folder


@pytest.fixture(scope="session")
def gallery_index(tiny_model, gallery_dir, tmp_path_factory):
    from circot.gallery import build_index
    from circot.index import GalleryIndex

    out = tmp_path_factory.mktemp("index") / "shapes.index"
    paths = sorted(gallery_dir.glob("*.png"))
    build_index(tiny_model, paths, out=out, use_cache=False)
    return GalleryIndex.load(out)


@pytest.fixture(scope="session")
def limits():
    from circot.serve import ServeLimits

    return ServeLimits(**LIMITS)


@pytest.fixture(scope="session")
def client(tiny_model, gallery_index, limits):
    from fastapi.testclient import TestClient

    from circot.serve import create_app

    with TestClient(create_app(gallery_index, tiny_model, limits=limits)) as c:
        yield c
