"""Shared fixtures. Tests build everything they need (tiny random models, tiny datasets) themselves."""

from __future__ import annotations

import os

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
