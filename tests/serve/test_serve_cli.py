"""``circot serve``: its options, its errors, and a real server process answering over loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_help(cli):
    code, out, _ = cli("serve", "--help")
    assert code == 0
    for option in ("--index", "--model", "--host", "--port", "--max-upload-mb", "--max-pixels"):
        assert option in out


def test_serve_missing_index(cli, tmp_path):
    code, _, err = cli("serve", "--index", tmp_path / "nope")
    assert code != 0
    assert err.strip() == f"error: index not found: {tmp_path / 'nope'}"


def test_serve_bad_limits(cli, tmp_path):
    code, _, err = cli("serve", "--index", tmp_path, "--max-k", "0")
    assert code != 0 and "max_k" in err and "Traceback" not in err


def test_serve_loads_index_and_model(cli, tiny_model, gallery_index, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    from PIL import Image

    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    index_dir = gallery_index.save(tmp_path / "gallery.index")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # serve() sets it process-wide
    code, _, err = cli(
        "serve", "--index", index_dir, "--model", model_dir, "--port", "8123", "--max-pixels", "20000"
    )
    assert code == 0, err
    assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
    assert Image.MAX_IMAGE_PIXELS == 20000
    with TestClient(started["app"]) as client:
        health = client.get("/health").json()
        assert health["model_fingerprint"] == tiny_model.fingerprint and health["index_matches_model"]
        assert health["limits"]["max_pixels"] == 20000
        response = client.post(
            "/api/search", data={"text": "make it red", "gallery_id": "blue-circle.png", "k": 2}
        )
        assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_serve_refuses_an_index_of_another_model(cli, gallery_index, tmp_path, monkeypatch):
    from serve_helpers import CORPUS

    from circot.model import CIRCoT

    other = CIRCoT.tiny(tokenizer_corpus=CORPUS, seed=1).save_pretrained(tmp_path / "other")
    index_dir = gallery_index.save(tmp_path / "gallery.index")
    code, _, err = cli("serve", "--index", index_dir, "--model", other)
    assert code != 0 and err.startswith("error: the index was built with model") and "Traceback" not in err


@pytest.mark.slow
def test_serve_process_answers_on_loopback(tiny_model, gallery_index, tmp_path):
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    index_dir = gallery_index.save(tmp_path / "gallery.index")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "circot",
        "-q",
        "serve",
        "--index",
        str(index_dir),
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        health = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.3)
        if health is None:
            process.kill()
            _, err = process.communicate(timeout=10)
            pytest.fail(f"circot serve did not answer (exit code {process.returncode}): {err[-2000:]}")
        assert health["gallery_size"] == 12
        assert health["index_matches_model"] is True
        assert health["model_fingerprint"] == tiny_model.fingerprint
        response = httpx.post(
            f"http://127.0.0.1:{port}/api/search",
            timeout=30,
            data={"text": "make it red", "gallery_id": "blue-circle.png", "mode": "fast", "k": 3},
        )
        assert response.status_code == 200 and len(response.json()["results"]) == 3
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        process.stdout.close()
        process.stderr.close()
