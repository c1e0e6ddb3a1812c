"""Peak memory of `circot serve` under a burst of large (but allowed) uploads.

Starts the server on loopback in a child process (the shipped model, a small gallery index), waits for it,
sends one small warm-up search, then EIGHT concurrent uploads of a 6000×6000 PNG (about 100 KB: mostly flat
colour, so within the default upload limits) and reads the server's resident memory from /proc: VmRSS before
the burst, VmHWM (the peak) after it, and VmRSS once the burst is over.

    python benchmarks/serve_memory.py --label after --code "working tree" --out benchmarks/results/serve_memory.json
    git worktree add /tmp/circot-old f7e6048
    PYTHONPATH=/tmp/circot-old/src python benchmarks/serve_memory.py --label before --code f7e6048 \
        --out benchmarks/results/serve_memory.json

Each run adds its label to the JSON file (other labels are kept). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image, ImageDraw


def big_png(side: int = 6000) -> bytes:
    image = Image.new("RGB", (side, side), (236, 236, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((side // 8, side // 8, side // 2, side // 2), fill=(200, 40, 40))
    draw.rectangle((side // 2, side // 2, side - side // 8, side - side // 8), fill=(40, 90, 210))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident set) of ``pid`` in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--label", required=True, help="name of this measurement in the JSON file (before, after)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON file to add the result to")
    ap.add_argument("--uploads", type=int, default=8, help="concurrent uploads")
    ap.add_argument("--side", type=int, default=6000, help="side of the uploaded square PNG, in pixels")
    ap.add_argument("--mode", default="fast", choices=["fast", "full"], help="search mode of the uploads")
    ap.add_argument(
        "--code", default="", help="which code is measured (e.g. a commit), stored with the result"
    )
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="circot-serve-memory-") as tmp:
        tmp_path = Path(tmp)
        gallery = tmp_path / "gallery"
        gallery.mkdir()
        for i in range(8):
            Image.new("RGB", (112, 112), (30 * i, 255 - 30 * i, 120)).save(gallery / f"g{i}.png")
        subprocess.run(
            [sys.executable, "-m", "circot", "-q", "index", "build", "--images", str(gallery),
             "--out", str(tmp_path / "ix"), "--no-cache", "--json"],
            check=True, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "circot", "-q", "serve", "--index", str(tmp_path / "ix"),
             "--port", str(port), "--device", "cpu"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not start within 180 s")
                time.sleep(0.5)
            small = io.BytesIO()
            Image.new("RGB", (112, 112), (200, 40, 40)).save(small, format="PNG")
            warm = httpx.post(
                f"{url}/api/search",
                data={"text": "make it blue", "mode": args.mode, "k": "3"},
                files={"image": ("warm.png", small.getvalue(), "image/png")},
                timeout=120,
            )
            warm.raise_for_status()
            payload = big_png(args.side)
            before = memory_mb(server.pid)

            def upload(i: int) -> int:
                response = httpx.post(
                    f"{url}/api/search",
                    data={"text": "make the circle blue", "mode": args.mode, "k": "3"},
                    files={"image": (f"big{i}.png", payload, "image/png")},
                    timeout=600,
                )
                return response.status_code

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.uploads) as pool:
                statuses = list(pool.map(upload, range(args.uploads)))
            seconds = time.perf_counter() - t0
            peak = memory_mb(server.pid)
            time.sleep(3)
            settled = memory_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)

    result = {
        "code": args.code,
        "uploads": args.uploads,
        "image": f"{args.side}x{args.side} PNG, {len(payload)} bytes",
        "mode": args.mode,
        "statuses": statuses,
        "burst_seconds": round(seconds, 2),
        "rss_before_mb": before["VmRSS"],
        "peak_rss_mb": peak["VmHWM"],
        "rss_after_mb": settled["VmRSS"],
        "peak_over_before_mb": round(peak["VmHWM"] - before["VmRSS"], 1),
    }
    print(json.dumps({args.label: result}, indent=1))
    if args.out is not None:
        data = json.loads(args.out.read_text()) if args.out.is_file() else {}
        data[args.label] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_name(f".{args.out.name}.tmp")
        tmp_out.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
