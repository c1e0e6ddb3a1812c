"""Usage errors of the real ``circot`` entry point: typer's usage message and exit 2, never a traceback.

These run ``python -m circot`` as a subprocess, so that the way the entry point catches typer's exceptions
cannot drift again without a test noticing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_circot(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "circot", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score"], "Missing option '--dataset'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["index", "build", "--images", "x", "--out", "y", "--bogus"], "No such option: --bogus"),
        (["search", "--index", "i", "--image", "a.png", "--text", "t", "--k", "0"], "--k"),
        (["submit", "validate", "--dataset", "cirr", "--root", "."], "Missing argument"),
        (["index", "build", "--images", "x", "--out", "y", "--batch-size", "0"], "--batch-size"),
        (
            ["eval", "--dataset", "shapes", "--root", ".", "--split", "val", "--batch-size", "-3"],
            "--batch-size",
        ),
    ],
)
def test_usage_errors_print_usage_and_exit_2(args, message, tmp_path):
    proc = run_circot(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Usage: circot" in proc.stderr
    assert message in proc.stderr


def test_no_arguments_prints_help():
    proc = run_circot()
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Usage: circot" in proc.stdout + proc.stderr
