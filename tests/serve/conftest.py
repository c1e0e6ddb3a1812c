"""Fixtures of the web-service tests: a tiny random model, a tiny gallery of drawn shapes and its index."""

from __future__ import annotations

import socket
import threading
import time
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_live():
    """Run apps with uvicorn in threads on free loopback ports: ``url = serve_live(app)``; stopped after the test."""
    import uvicorn

    servers = []

    def start(app) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        if not server.started:
            pytest.fail("the test server did not start within 30 s")
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=15)
