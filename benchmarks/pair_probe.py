"""Where a held-out colour–shape pair is lost: in the vision tower's features, or in the language model.

    python benchmarks/pair_probe.py --world data/shapes --model src/circot/assets/shapes-tiny \
        --json benchmarks/results/pair_probe_shipped_s0.json

Two measurements on the shapes world's test-novel split, whose scenes hold the world's held-out colour–shape pairs
(no training image shows one):

1. Probes of the frozen vision tower. A fresh read-out learns every grid cell's attributes from the tower's merged
   image tokens of training images (seen pairs only): a linear map, and a head like the perception stage's (cell
   queries attending over the tokens). Each then reads the colour and shape of every test-novel object; the
   accuracies are given apart for objects of a held-out pair and of a seen one. A tower whose features keep shape
   apart from colour lets a read-out trained on seen pairs read a held-out pair as well as a seen one.
2. The language model, teacher-forced on the gold CoT of test-novel's queries: how often its next token after a
   colour word is the right shape, for held-out and seen pairs; and again with each such colour word replaced by a
   colour that has no held-out pair (so that the word before the shape no longer rules the shape out). With
   ``--contrast A1,A2,..`` also under visual contrastive decoding: the next token by (1 + a) log p(. | image) -
   a log p(. | noised image), among the tokens whose p(. | image) is at least ``--plausibility`` times the most
   likely one's (the noised image: 0.1 x pixels + 0.995 x Gaussian noise, seeded). If the right shape of a
   held-out pair is held back by the language model's prior rather than by what the image shows, contrasting
   against an image that shows nothing should bring it back.
3. The model's own captions (``--captions N``): greedy full mode on N test-novel images that hold a held-out pair
   and N that hold none, each asked to keep the scene as it is (the training's identity rows). Scored per object
   (its clause in the caption, and the shape the caption gives its cell) and per image (every clause right).

Seeded and deterministic for a given model, world and machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from circot.data.shapes.scene import COLORS, SHAPES
from circot.train.perception import (
    ATTRIBUTES,
    IGNORE,
    PerceptionHead,
    load_perception_data,
    perception_loss,
)

SPLIT = "test-novel"


def _pct(right: int, n: int) -> float | None:
    return round(100.0 * right / n, 2) if n else None


class LinearProbe(nn.Module):
    """One linear map from all of an image's merged tokens to every cell's classes, per attribute."""

    def __init__(self, tokens: int, hidden: int, cells: int) -> None:
        super().__init__()
        self.cells = cells
        self.out = nn.ModuleDict(
            {name: nn.Linear(tokens * hidden, cells * len(v)) for name, v in ATTRIBUTES.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = x.flatten(1)
        return {name: layer(flat).view(len(x), self.cells, -1) for name, layer in self.out.items()}


def tower_features(model: Any, paths: list[Path], batch_size: int = 128) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            feats, _ = model.image_features(paths[start : start + batch_size])
            out.append(torch.stack(feats).float())
    return torch.cat(out)


def held_out_mask(labels: torch.Tensor, held: set[tuple[str, str]]) -> torch.Tensor:
    """(n, cells) True where the cell holds an object of a held-out colour–shape pair."""
    mask = torch.zeros(labels.shape[:2], dtype=torch.bool)
    for color, shape in held:
        mask |= (labels[..., 1] == COLORS.index(color)) & (labels[..., 2] == SHAPES.index(shape))
    return mask


def train_probe(probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> None:
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(feats), (64,), generator=gen)
        loss = perception_loss(probe(feats[rows]), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    probe.eval()


def probe_accuracy(
    probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor, held: torch.Tensor
) -> dict[str, dict[str, float]]:
    with torch.no_grad():
        logits = probe(feats)
    occupied = labels[..., 1] != IGNORE
    out = {}
    for kind, mask in (("held_out", occupied & held), ("seen", occupied & ~held)):
        out[kind] = {"objects": int(mask.sum())}
        for j, name in ((1, "color"), (2, "shape")):
            right = logits[name].argmax(-1) == labels[..., j]
            out[kind][name] = round(100.0 * float(right[mask].float().mean()), 2) if mask.any() else None
    return out


def contrast_argmax(
    logits: torch.Tensor, null_logits: torch.Tensor, alpha: float, plausibility: float
) -> torch.Tensor:
    """Visual contrastive decoding's choice of next token, ``(...)`` from logits ``(..., vocab)``."""
    lp, lpn = logits.float().log_softmax(-1), null_logits.float().log_softmax(-1)
    score = (1 + alpha) * lp - alpha * lpn
    return score.masked_fill(~plausible(lp, plausibility), float("-inf")).argmax(-1)


def plausible(log_probs: torch.Tensor, plausibility: float) -> torch.Tensor:
    """The tokens contrastive decoding may choose: at least ``plausibility`` times as likely as the top one."""
    return log_probs >= log_probs.max(-1, keepdim=True).values + torch.log(torch.tensor(plausibility))


def lm_shape_after_color(
    model: Any,
    world: Path,
    held: set[tuple[str, str]],
    batch_size: int,
    contrast: tuple[float, ...] = (),
    plausibility: float = 0.1,
    seed: int = 0,
) -> dict[str, dict[str, float | int | None]]:
    """Teacher-forced next-token accuracy on the shape word after a colour word, as written and with the colour
    word replaced by one that has no held-out pair, and under visual contrastive decoding at each ``contrast``
    weight."""
    from circot.data import load_split

    tok = model.tokenizer
    one = {w: tok.encode(" " + w, add_special_tokens=False) for w in (*COLORS, *SHAPES)}
    color_of = {ids[0]: w for w, ids in one.items() if w in COLORS and len(ids) == 1}
    shape_of = {ids[0]: w for w, ids in one.items() if w in SHAPES and len(ids) == 1}
    free = [c for c in COLORS if all(c != h for h, _ in held)]
    neutral = one[free[0]][0] if free else None
    split = load_split("shapes", str(world), SPLIT)
    queries = [q for q in split.queries if q.extras.get("gold_cot")]
    color_ids, shape_ids = torch.tensor(list(color_of)), torch.tensor(list(shape_of))
    counts = {k: {"n": 0, "right": 0, "n_replaced": 0, "right_replaced": 0} for k in ("held_out", "seen")}
    contrastive = {k: {"plausible": 0, **{str(a): 0 for a in contrast}} for k in counts}
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, len(queries), batch_size):
            qs = queries[start : start + batch_size]
            batch = model.build_batch(
                [split.image_path(q.reference) for q in qs], [q.text for q in qs], cots=[q.extras["gold_cot"] for q in qs],
                mode="full",
            )  # fmt: skip
            ids, labels = batch["input_ids"], batch["labels"]
            # a colour word with a supervised shape after it
            follows = torch.zeros_like(ids, dtype=torch.bool)
            follows[:, :-1] = (
                torch.isin(ids[:, :-1], color_ids)
                & torch.isin(ids[:, 1:], shape_ids)
                & (labels[:, 1:] != IGNORE)
            )
            replaced = ids.clone()
            if neutral is not None:
                replaced[follows & (ids != neutral)] = neutral
            _, logits = model.embed_batch(batch)
            _, logits_r = model.embed_batch(dict(batch, input_ids=replaced))
            if contrast:
                pixels = batch["pixel_values"]
                noised = 0.1 * pixels + 0.995 * torch.randn(pixels.shape, generator=gen)
                _, logits_n = model.embed_batch(dict(batch, pixel_values=noised))
                where = follows.nonzero(as_tuple=True)
                chosen = {
                    a: contrast_argmax(logits[where], logits_n[where], a, plausibility) for a in contrast
                }
                gold_next = ids[where[0], where[1] + 1]
                keep = plausible(logits[where].float().log_softmax(-1), plausibility)
                within = keep.gather(-1, gold_next[:, None]).squeeze(-1)
            for j, (r, t) in enumerate(follows.nonzero().tolist()):
                pair = (color_of[int(ids[r, t])], shape_of[int(ids[r, t + 1])])
                c = counts["held_out" if pair in held else "seen"]
                gold = int(ids[r, t + 1])
                c["n"] += 1
                c["right"] += int(logits[r, t].argmax()) == gold
                if contrast:
                    v = contrastive["held_out" if pair in held else "seen"]
                    v["plausible"] += bool(within[j])
                    for a in contrast:
                        v[str(a)] += int(chosen[a][j]) == gold
                if int(replaced[r, t]) != int(ids[r, t]):
                    c["n_replaced"] += 1
                    c["right_replaced"] += int(logits_r[r, t].argmax()) == gold
    out: dict[str, dict[str, float | int | None]] = {}
    for kind, c in counts.items():
        out[kind] = {
            "shape_words": c["n"],
            "right_after_its_colour": _pct(c["right"], c["n"]),
            "replaced": c["n_replaced"],
            "right_after_neutral_colour": _pct(c["right_replaced"], c["n_replaced"]),
        }
        if contrast:
            # "plausible": the right shape is among the tokens contrastive decoding may choose
            out[kind]["contrastive"] = {a: _pct(r, c["n"]) for a, r in contrastive[kind].items()}
    out["neutral_colour"] = {"word": free[0] if free else None}  # type: ignore[dict-item]
    if contrast:
        out["contrastive_decoding"] = {"plausibility": plausibility, "null_image": "0.1 x + 0.995 noise"}  # type: ignore[dict-item]
    return out


def own_captions(
    model: Any, world: Path, held: set[tuple[str, str]], n: int, batch_size: int
) -> dict[str, Any]:
    """Greedy captions of ``n`` test-novel images with a held-out pair and ``n`` without, scored against their
    scene graphs."""
    from circot.data import load_split
    from circot.data.shapes.cot import canonical_description
    from circot.data.shapes.loader import image_scenes
    from circot.data.shapes.scene import describe, pairs, parse_clause, scene_from_dict, split_clauses
    from circot.train.data import IDENTITY_TEXT

    split = load_split("shapes", str(world), SPLIT)
    scenes = {i: scene_from_dict(s) for i, s in sorted(image_scenes(world, SPLIT).items())}
    chosen = {
        "with_held_out": [i for i, sc in scenes.items() if pairs(sc) & held][:n],
        "without": [i for i, sc in scenes.items() if not pairs(sc) & held][:n],
    }
    out: dict[str, Any] = {}
    for kind, ids in chosen.items():
        cots = model.generate_reasoning(
            [split.image_path(i) for i in ids], [IDENTITY_TEXT] * len(ids), batch_size=batch_size
        )
        exact = 0
        objs = {k: {"objects": 0, "clause": 0, "shape": 0} for k in ("held_out", "seen")}
        for i, cot in zip(ids, cots, strict=True):
            clauses = split_clauses(cot.caption)
            read = {o.cell: o for o in map(parse_clause, clauses) if o is not None}
            gold = scenes[i]
            exact += canonical_description(cot.caption) == canonical_description(describe(gold))
            for o in gold:
                c = objs["held_out" if o.pair in held else "seen"]
                c["objects"] += 1
                c["clause"] += o.a() in clauses
                c["shape"] += o.cell in read and read[o.cell].shape == o.shape
        out[kind] = {"images": len(ids), "caption_exact": _pct(exact, len(ids))}
        for k, c in objs.items():
            if c["objects"]:
                out[kind][k] = {
                    "objects": c["objects"],
                    "clause_right": _pct(c["clause"], c["objects"]),
                    "shape_right": _pct(c["shape"], c["objects"]),
                }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True, help="a shapes world (circot data shapes --out DIR)")
    ap.add_argument(
        "--model", default=None, help="a circot model directory (default: the shipped tiny model)"
    )
    ap.add_argument("--train-images", type=int, default=8000, help="training images the probes learn from")
    ap.add_argument("--steps", type=int, default=3000, help="probe training steps (batch 64, AdamW 1e-3)")
    ap.add_argument("--skip-tower", action="store_true", help="no probes of the vision tower")
    ap.add_argument(
        "--skip-lm", action="store_true", help="no teacher-forced LM test (a model from a perception stage)"
    )
    ap.add_argument(
        "--captions",
        type=int,
        default=0,
        help="also caption N test-novel images with and N without a held-out pair",
    )
    ap.add_argument(
        "--contrast",
        default="",
        help="comma-separated weights a: also score the LM test under visual contrastive decoding",
    )
    ap.add_argument("--plausibility", type=float, default=0.1, help="contrastive decoding's cutoff")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.captions < 0:
        ap.error(f"--captions must be >= 0, got {args.captions}")
    try:
        contrast = tuple(float(a) for a in args.contrast.split(",") if a.strip())
    except ValueError:
        ap.error(f"--contrast must be comma-separated numbers, got {args.contrast!r}")
    if any(a <= 0 for a in contrast) or not 0 < args.plausibility <= 1:
        ap.error("--contrast weights must be > 0 and --plausibility in (0, 1]")
    torch.set_num_threads(args.threads)
    from circot.index import atomic_write_bytes
    from circot.model import CIRCoT

    split_file = args.world / f"{SPLIT}.json"
    try:
        held = {(c, s) for c, s in json.loads(split_file.read_text())["world"]["held_out_pairs"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"{split_file}: not a shapes world's {SPLIT} split with world.held_out_pairs ({exc})")
    model = CIRCoT.from_pretrained(args.model).eval()
    report: dict[str, Any] = {
        "model": args.model or "shapes-tiny (shipped)",
        "fingerprint": model.fingerprint,
        "world": str(args.world),
        "held_out_pairs": sorted(held),
    }
    if not args.skip_tower:
        train = load_perception_data(args.world, "train", limit=args.train_images)
        test = load_perception_data(args.world, SPLIT)
        f_train, f_test = tower_features(model, train.paths), tower_features(model, test.paths)
        held_cells = held_out_mask(test.labels, held)
        report["probe_training"] = {
            "images": len(train.paths),
            "steps": args.steps,
            "batch": 64,
            "seed": args.seed,
        }
        report["probes"] = {}
        n_tokens, hidden = f_train.shape[1:]
        cells = train.labels.shape[1]
        for name, make in (
            ("linear", lambda: LinearProbe(n_tokens, hidden, cells)),
            ("head", lambda: PerceptionHead(hidden, cells)),
        ):
            torch.manual_seed(args.seed)
            probe = make()
            train_probe(probe, f_train, train.labels, args.steps, args.seed)
            report["probes"][name] = probe_accuracy(probe, f_test, test.labels, held_cells)
    if not args.skip_lm:
        report["language_model"] = lm_shape_after_color(
            model, args.world, held, args.batch_size, contrast, args.plausibility, args.seed
        )
    if args.captions:
        report["captions"] = own_captions(model, args.world, held, args.captions, args.batch_size)
    lines = [f"pair probe of {report['model']} [{report['fingerprint']}] on {args.world}/{SPLIT}"]
    for name, acc in report.get("probes", {}).items():
        for kind, a in acc.items():
            lines.append(
                f"  {name:6s} probe, {kind:8s} objects {a['objects']:6d}: colour {a['color']}  shape {a['shape']}"
            )
    for kind, a in report.get("language_model", {}).items():
        if kind in ("held_out", "seen"):
            lines.append(
                f"  LM, {kind:8s} shape words {a['shape_words']:5d}: right after its colour {a['right_after_its_colour']}"
                f", after '{report['language_model']['neutral_colour']['word']}' instead"
                f" {a['right_after_neutral_colour']} (of {a['replaced']})"
            )
            for alpha, v in a.get("contrastive", {}).items():
                what = "right shape plausible" if alpha == "plausible" else f"a = {alpha}"
                lines.append(f"    contrastive decoding, {what}: {v}")
    for kind, a in report.get("captions", {}).items():
        objects = "  ".join(
            f"{k} objects {a[k]['objects']}: clause {a[k]['clause_right']} shape {a[k]['shape_right']}"
            for k in ("held_out", "seen")
            if k in a
        )
        lines.append(f"  captions, {kind:13s} images {a['images']:4d}: exact {a['caption_exact']}  {objects}")
    print("\n".join(lines))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode("utf-8"))


if __name__ == "__main__":
    sys.exit(main())
