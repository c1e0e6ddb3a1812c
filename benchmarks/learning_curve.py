"""Learning curves of the shapes runs: val metrics against optimizer steps, from the runs' metrics.jsonl.

    python benchmarks/learning_curve.py --run "(b)=runs/shapes-tiny-nocot" --run "(c)=runs/shapes-tiny-cot" \\
        --out benchmarks/results/learning_curve.md

Every row is one periodic evaluation of the trainer (``eval.every`` steps, the first ``eval.max_queries`` val
queries, whole val gallery); the perception columns are the perception head's per-cell val accuracy (%).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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


def curve(run: Path) -> list[dict]:
    rows: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        step = int(rec["step"])
        if any(k in rec for k in COLUMNS):
            rows.setdefault(step, {}).update({k: rec[k] for k in COLUMNS if k in rec})
    return [{"step": s, **rows[s]} for s in sorted(rows)]


def render(named: dict[str, list[dict]]) -> str:
    lines = ["| run | step | " + " | ".join(COLUMNS.values()) + " |", "|---|---|" + "---|" * len(COLUMNS)]
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
    ap.add_argument("--run", action="append", required=True, help="NAME=RUN_DIR")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    named = {}
    for item in args.run:
        name, _, path = item.partition("=")
        named[name] = curve(Path(path))
    text = render(named)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
