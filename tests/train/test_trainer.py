"""The training entry point on a tiny generated shapes world: loss goes down, resume continues exactly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from retrieval_fakes import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from circot.data import shapes

    torch.set_num_threads(1)
    return shapes.generate(
        tmp_path_factory.mktemp("shapes"), seed=3, n_train=16, n_val=6, n_test=0, n_novel=0
    )


def _config(tmp_path, world, run: str, **extra) -> tuple:
    cfg = {
        "run_dir": str(tmp_path / run),
        "seed": 1,
        "num_threads": 1,
        "model": {
            "init": "tiny",
            "overrides": dict(TINY),
        },
        "data": {"dataset": "shapes", "root": str(world)},
        "optim": {"batch_size": 8},
        "stages": [
            {"name": "align", "mode": "fast", "steps": 4, "lr": 3e-3},
            {"name": "cot", "mode": "full", "steps": 6, "lr": 3e-3, "fast_fraction": 0.25},
        ],
        "eval": {"every": 0, "max_queries": 4, "modes": ["fast"], "batch_size": 8},
        "log_every": 1,
        "save_every": 5,
        **extra,
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / run


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, world):
    """One uninterrupted 10-step run through the command line: (exit code, stdout, stderr, run_dir, config)."""
    from circot.cli import main

    tmp = tmp_path_factory.mktemp("straight")
    path, run_dir = _config(tmp, world, "run")
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", "--config", str(path), "--json"])
    return code, out.getvalue(), err.getvalue(), run_dir, path


def test_train_entry_point_learns_and_writes_a_run_dir(cli, straight_run, world):
    code, out, err, run_dir, path = straight_run
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 10 and "R@1" in summary["val"]["fast"]
    records = [r for r in _metrics(run_dir) if "train/total" in r]
    ce = [r["train/cot_ce"] for r in records if "train/cot_ce" in r]
    assert len(ce) == 6 and ce[-1] < ce[0]  # the CoT is being learned
    assert all(r["train/info_nce"] > 0 for r in records)
    # the run directory: resolved config, TensorBoard logs, checkpoints, final model with its card
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["batch_size"] == 8
    assert any((run_dir / "logs").rglob("events.out.tfevents*"))
    assert (run_dir / "checkpoints" / "step-0000010" / "trainer_state.json").exists()
    card = (run_dir / "model" / "README.md").read_text()
    assert "R@1" in card
    from circot.model import CIRCoT

    model = CIRCoT.from_pretrained(run_dir / "model")
    assert model.encode_images([next(world.glob("images/**/*.png"))]).shape == (1, 64)
    # a second run into the same folder is refused (a user error, one line)
    code, _, err = cli("train", "--config", path)
    assert code != 0 and "already holds a run" in err


def test_resume_continues_from_the_saved_step(cli, tmp_path, world, straight_run):
    path, run_dir = _config(tmp_path, world, "sliced", stop_after=5)
    code, out, err = cli("train", "--config", path, "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 5 and not (run_dir / "model").exists()
    # a run killed after its checkpoint has logged steps it will train again, the last line torn by the kill
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 6, "train/total": 99.0}) + '\n{"step": 7, "train/tot')
    code, out, err = cli("train", "--run-dir", run_dir, "--resume", "--json", "stop_after=null")
    assert code == 0, err
    assert json.loads(out)["steps"] == 10 and (run_dir / "model").exists()
    steps = [r["step"] for r in _metrics(run_dir) if "train/total" in r]
    assert steps == list(range(1, 11))  # nothing repeated, nothing skipped
    # the resumed run follows the same trajectory as one uninterrupted run
    a = [r["train/total"] for r in _metrics(run_dir) if "train/total" in r]
    b = [r["train/total"] for r in _metrics(straight_run[3]) if "train/total" in r]
    assert a == pytest.approx(b, rel=1e-4)


def test_resume_appends_stages_and_refuses_a_changed_recipe(cli, tmp_path, world, straight_run):
    first = [{"name": "align", "mode": "fast", "steps": 4, "lr": 3e-3}]
    path, run_dir = _config(tmp_path, world, "grown", stages=first)
    code, out, err = cli("train", "--config", path, "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 4 and (run_dir / "model").exists()
    # the same run with a changed recipe is refused, and the run is left as it was
    changed, _ = _config(tmp_path, world, "grown", optim={"batch_size": 4})
    code, _, err = cli("train", "--config", changed, "--resume")
    assert code != 0 and "optim differs" in err
    assert len(yaml.safe_load((run_dir / "config.yaml").read_text())["stages"]) == 1
    # appending a stage continues the finished run: the two-stage run of one go, step for step
    full, _ = _config(tmp_path, world, "grown")
    code, out, err = cli("train", "--config", full, "--resume", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 10
    assert [s["name"] for s in yaml.safe_load((run_dir / "config.yaml").read_text())["stages"]] == [
        "align",
        "cot",
    ]
    a = [r["train/total"] for r in _metrics(run_dir) if "train/total" in r]
    b = [r["train/total"] for r in _metrics(straight_run[3]) if "train/total" in r]
    assert a == pytest.approx(b, rel=1e-4)


def test_captioning_stage_trains_on_identity_rows_without_the_contrastive_loss(cli, tmp_path, world):
    stages = [
        {"name": "see", "mode": "full", "steps": 6, "lr": 3e-3, "lambda_info": 0.0, "identity_prob": 1.0},
        {"name": "cot", "mode": "full", "steps": 2, "lr": 3e-3, "identity_prob": 0.5},
    ]
    path, run_dir = _config(tmp_path, world, "see", stages=stages)
    code, out, err = cli("train", "--config", path, "--json")
    assert code == 0, err
    records = [r for r in _metrics(run_dir) if "train/total" in r]
    see, cot = records[:6], records[6:]
    assert all("train/info_nce" not in r for r in see)  # no gallery passes, CE only
    assert see[-1]["train/cot_ce"] < see[0]["train/cot_ce"]
    assert all(r["train/total"] == pytest.approx(r["train/cot_ce"]) for r in see)
    assert len(cot) == 2 and all(r["train/info_nce"] > 0 for r in cot)


def test_identity_row_describes_the_target(world):
    from circot.data import load_split
    from circot.train.data import IDENTITY_TEXT, build_examples, cots_for_split, identity_example

    split = load_split("shapes", world, "train")
    ex = build_examples(split, cots_for_split(split, None))[0]
    row = identity_example(ex)
    assert row.identity and row.text == IDENTITY_TEXT
    assert row.reference == row.target == ex.target and row.reference_key == row.target_key == ex.target_key
    assert row.cot.caption == row.cot.conclusion == ex.cot.conclusion


def test_missing_annotation_is_a_clear_error(cli, tmp_path, world):
    ann = tmp_path / "cot.jsonl"
    ann.write_text(
        json.dumps({"query_id": "nope", "caption": "a", "reasoning": "b", "conclusion": "c"}) + "\n"
    )
    path, _ = _config(
        tmp_path, world, "ann", data={"dataset": "shapes", "root": str(world), "annotations": str(ann)}
    )
    code, _, err = cli("train", "--config", path)
    assert code != 0 and "has no CoT annotation" in err and "cot.jsonl" in err


def test_two_process_training_run(tmp_path, world):
    """Two CPU processes (torchrun, gloo): the global batch is gathered and training finishes.

    torchrun, not `accelerate launch`: on CPU, accelerate 1.x starts a single process unless MPI is set up."""
    import subprocess
    import sys

    path, run_dir = _config(tmp_path, world, "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "circot",
        "train",
        "--config",
        str(path),
        "--json",
        "optim.batch_size=4",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "model" / "circot_config.json").exists()
    assert json.loads((run_dir / "final_eval.json").read_text())["processes"] == 2
    records = [r for r in _metrics(run_dir) if "train/total" in r]
    assert [r["step"] for r in records] == list(range(1, 11))
