"""Annotator throughput against a loopback OpenAI-compatible server, and a kill-and-resume run.

    .venv/bin/python benchmarks/annotate.py [--latency 0.05] [--records 480] [--json out.json]

The fake server runs in its own process (``python -m circot.annotate.fakeserver``) so that it does not share
the annotator's interpreter lock. Throughput: records/s of the three-stage annotation (3 chat requests per triplet, fsync per record) at
concurrency 1 and 16, with a fixed simulated server latency per request. The ceiling is
``concurrency / (3 * latency)`` records/s.

Kill and resume: ``circot annotate`` runs in a subprocess on a CIRR-layout split, is killed with SIGKILL after
a number of records, and is run again; the script reports what was lost and redone, and checks that every
triplet is in the file exactly once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from circot.annotate.client import OpenAIChatClient
from circot.annotate.pipeline import annotate_split
from circot.annotate.store import iter_jsonl, rejects_path
from circot.annotate.teachers import ChatTeacher
from circot.data.records import CIRQuery, CIRSplit, Gallery

EDITS = [
    "is red with longer sleeves",
    "has a floral pattern",
    "show two dogs instead of one",
    "is made of denim",
]


class ServerProcess:
    """``python -m circot.annotate.fakeserver`` in a subprocess; ``stats()`` reads its counters."""

    def __init__(self, latency: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "circot.annotate.fakeserver", "--latency", str(latency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"the fake server did not start (got {self.url!r})")

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url.rsplit("/v1", 1)[0] + "/stats", timeout=10).json()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def make_split(folder: Path, n: int, n_images: int = 16) -> CIRSplit:
    ids = [f"img{i}" for i in range(n_images)]
    paths = {x: folder / f"{x}.png" for x in ids}
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(ids):
        Image.new("RGB", (64, 64), (16 * i, 90, 200 - 8 * i)).save(paths[x])
    queries = [
        CIRQuery(f"q{i:05d}", ids[i % n_images], EDITS[i % len(EDITS)], targets=(ids[(i + 3) % n_images],))
        for i in range(n)
    ]
    return CIRSplit("cirr", "train", folder, queries, Gallery(ids, paths))


def throughput(work: Path, concurrency: int, n: int, latency: float) -> dict:
    split = make_split(work / "images", n)
    out = work / f"c{concurrency}.jsonl"
    with ServerProcess(latency) as server:
        teacher = ChatTeacher(OpenAIChatClient(server.url, "fake", backoff_base=0.05), "openai:fake")
        cpu = time.process_time()
        report = annotate_split(split, teacher, out, concurrency=concurrency)
        cpu = time.process_time() - cpu
        calls = server.stats()["calls"]
    assert report.written == n, report.format()
    return {
        "concurrency": concurrency,
        "records": n,
        "requests": calls,
        "seconds": report.seconds,
        "records_per_s": report.records_per_s,
        "ceiling_records_per_s": round(concurrency / (3 * latency), 1),
        "annotator_cpu_ms_per_record": round(1000 * cpu / n, 1),
    }


def write_cirr(root: Path, n: int) -> Path:
    names = [f"dev-{i}-0-img0" for i in range(n + 1)]
    (root / "dev").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64), (i % 256, 40, 90)).save(root / "dev" / f"{name}.png")
    caps = [
        {
            "pairid": 20000 + i,
            "reference": names[i],
            "target_hard": names[i + 1],
            "target_soft": {names[i + 1]: 1.0},
            "caption": EDITS[i % len(EDITS)],
            "img_set": {
                "id": i,
                "members": [names[(i + k) % len(names)] for k in range(6)],
                "reference_rank": 0,
            },
        }
        for i in range(n)
    ]
    for sub in ("captions", "image_splits"):
        (root / "cirr" / sub).mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(caps))
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text(
        json.dumps({x: f"./dev/{x}.png" for x in names})
    )
    return root


def kill_and_resume(work: Path, n: int, kill_after: int, concurrency: int, latency: float) -> dict:
    root = write_cirr(work / "cirr", n)
    out = work / "killed.jsonl"
    with ServerProcess(latency) as server:
        cmd = [sys.executable, "-m", "circot", "-q", "annotate", "--dataset", "cirr", "--root", str(root),
               "--split", "val", "--teacher", "openai", "--base-url", server.url, "--model", "fake",
               "--concurrency", str(concurrency), "--out", str(out), "--no-progress"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= kill_after:
                break
            time.sleep(0.005)
        if proc.poll() is not None:
            raise SystemExit(f"the annotator ended before it was killed: {proc.stderr.read().decode()}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(3 * latency)  # let the server finish answering the killed run's last requests
        calls_at_kill = server.stats()["calls"]
        lines_at_kill = out.read_bytes().count(b"\n")
        torn = not out.read_bytes().endswith(b"\n")
        start = time.perf_counter()
        resumed = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=600)
        resume_wall = time.perf_counter() - start
        if resumed.returncode != 0:
            raise SystemExit(f"resume failed: {resumed.stderr}")
        report = json.loads(resumed.stdout)
        calls_resume = server.stats()["calls"] - calls_at_kill
    ids = [rec["query_id"] for _, rec in iter_jsonl(out)]
    rejected = [rec for _, rec in iter_jsonl(rejects_path(out))] if rejects_path(out).exists() else []
    return {
        "triplets": n,
        "concurrency": concurrency,
        "records_at_kill": lines_at_kill,
        "torn_line_at_kill": torn,
        "requests_before_kill": calls_at_kill,
        "requests_lost_in_flight": calls_at_kill - 3 * lines_at_kill,
        "resume_already_done": report["already_done"],
        "resume_written": report["written"],
        "resume_requests": calls_resume,
        "resume_repaired_bytes": report["repaired_bytes"],
        "resume_wall_s": round(resume_wall, 2),
        "final_records": len(ids),
        "unique_records": len(set(ids)),
        "rejects": len(rejected),
        "every_triplet_once": sorted(ids) == sorted(f"{20000 + i}" for i in range(n)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="simulated seconds per request")
    parser.add_argument("--records", type=int, default=480, help="triplets at concurrency 16 (1: a tenth)")
    parser.add_argument("--kill-triplets", type=int, default=200)
    parser.add_argument("--kill-after", type=int, default=60)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict = {
        "latency_s": args.latency,
        "cpus": os.cpu_count(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "throughput": [],
        "kill_and_resume": None,
    }
    with tempfile.TemporaryDirectory(prefix="circot-annotate-bench-") as tmp:
        work = Path(tmp)
        for concurrency, n in ((1, max(16, args.records // 10)), (16, args.records)):
            row = throughput(work / f"t{concurrency}", concurrency, n, args.latency)
            results["throughput"].append(row)
            print(
                f"concurrency {concurrency:>2}: {row['records']} records in {row['seconds']:.2f} s = "
                f"{row['records_per_s']:.2f} records/s (ceiling {row['ceiling_records_per_s']}), annotator CPU "
                f"{row['annotator_cpu_ms_per_record']} ms/record"
            )
        kr = kill_and_resume(work / "kill", args.kill_triplets, args.kill_after, 4, args.latency)
        results["kill_and_resume"] = kr
        print("kill and resume: " + ", ".join(f"{k}={v}" for k, v in kr.items()))
    results["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(
        f"{results['cpus']} CPUs, 1-min load average {results['load_average_1min_at_start']} at start, "
        f"{results['load_average_1min_at_end']} at end"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
