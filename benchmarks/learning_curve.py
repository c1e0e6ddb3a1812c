"""Learning curves of the shapes runs: val metrics against optimizer steps, from the runs' metrics.jsonl.

    python benchmarks/learning_curve.py --run "(b)=runs/shapes-tiny-nocot" --run "(c)=runs/shapes-tiny-cot" \\
        --out benchmarks/results/learning_curve.md

A run that continued another one from its saved model counts its steps from there: ``--run "NAME=DIR@13300"``.
``--append`` adds the rows to an existing ``--out`` table (whose own runs may be gone) instead of replacing it.

Every row is one periodic evaluation of the trainer (``eval.every`` steps, the first ``eval.max_queries`` val
queries, whole val gallery); the perception columns are the perception head's per-cell val accuracy (%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circot.index import atomic_write_bytes

COLUMNS = {
    "val_perception/shape": "perception shape",
    "val_perception/scene": "perception every cell",
    "val_fast/R@1": "fast R@1",
    "val_full/R@1": "full R@1",
    "val_full/cot_caption_exact": "caption EM",
    "val_full/cot_caption_f1": "caption F1",
    "val_full/cot_conclusion_exact": "conclusion EM",
}
PERCENT = {"val_full/cot_caption_exact", "val_full/cot_caption_f1", "val_full/cot_conclusion_exact"}


def curve(run: Path, offset: int = 0) -> list[dict]:
    rows: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = int(rec["step"]) + offset
        if any(k in rec for k in COLUMNS):
            rows.setdefault(step, {}).update({k: rec[k] for k in COLUMNS if k in rec})
    return [{"step": s, **rows[s]} for s in sorted(rows)]


def render(named: dict[str, list[dict]], header: bool = True) -> str:
    lines = (
        ["| run | step | " + " | ".join(COLUMNS.values()) + " |", "|---|---|" + "---|" * len(COLUMNS)]
        if header
        else []
    )
    for name, rows in named.items():
        for r in rows:
            cells = []
            for k in COLUMNS:
                v = r.get(k)
                cells.append("" if v is None else f"{100 * v if k in PERCENT else v:.1f}")
            lines.append(f"| {name} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR[@STEP_OFFSET]")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--append", action="store_true", help="add the rows to the table already in --out")
    args = ap.parse_args()
    named = {}
    for item in args.run:
        name, _, where = item.partition("=")
        path, _, offset = where.partition("@")
        if not name or not path or not (offset or "0").isdigit():
            ap.error(f"--run {item!r}: expected NAME=RUN_DIR or NAME=RUN_DIR@STEP_OFFSET (a whole number)")
        if not (Path(path) / "metrics.jsonl").is_file():
            ap.error(f"--run {item!r}: {Path(path) / 'metrics.jsonl'} does not exist")
        named[name] = curve(Path(path), int(offset or 0))
    earlier = args.out.read_text() if args.append and args.out and args.out.is_file() else ""
    text = earlier + render(named, header=not earlier)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, text.encode("utf-8"))


if __name__ == "__main__":
    main()
