"""Shared fixtures. Tests build everything they need (tiny random models, tiny datasets) themselves."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def cli(capsys):
    """Run the circot command line in-process: returns (exit code, stdout, stderr)."""
    from circot.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository (e.g. ``scripts/ship_model.py``) as a module."""

    def load(relative: str):
        path = Path(__file__).resolve().parents[1] / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
