"""Training config: defaults, YAML/JSON files, dotted overrides, one-line errors, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circot.errors import ConfigError
from circot.train.config import TrainConfig, load_config
from circot.train.trainer import lr_at, stage_at


def test_yaml_file_with_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "run_dir: runs/x\n"
        "optim: {batch_size: 8}\n"
        "stages:\n"
        "  - {name: align, mode: fast, steps: 10, lr: 1e-3}\n"
        "  - {name: cot, mode: full, steps: 20, lr: 5e-4, lambda_txt: 0.5}\n"
    )
    cfg = load_config(
        path, ["optim.batch_size=4", "stages.1.steps=30", "loss.symmetric=true", "eval.modes=[fast, full]"]
    )
    assert cfg.optim.batch_size == 4 and cfg.stages[1].steps == 30 and cfg.loss.symmetric
    assert cfg.stages[0].lr == pytest.approx(1e-3) and cfg.eval.modes == ["fast", "full"]
    assert cfg.total_steps == 40
    saved = cfg.save(tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()
    as_json = cfg.save(tmp_path / "config.json")
    assert json.loads(as_json.read_text())["stages"][1]["lambda_txt"] == 0.5


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["optim.batch_sise=3"], "batch_sise"),
        (["stages.0.mode=slow"], "stages.0"),
        (["optim.batch_size=many"], "optim.batch_size"),
        (["stages.5.lr=1"], "stages.5"),
        (["nonsense"], "key=value"),
        (["stages.0.identity_prob=2"], "stages.0 (stage).identity_prob"),
        (["stages.0.lambda_info=0"], "lambda_info 0 needs a full stage"),
        (["stages.0.conclusion_weight=0"], "stages.0 (stage).conclusion_weight must be a finite number > 0"),
        (
            ["stages.0.conclusion_weight=nan"],
            "stages.0 (stage).conclusion_weight must be a finite number > 0",
        ),
        (
            ["stages.0.family_weights.swap=-1"],
            "stages.0 (stage).family_weights.swap must be a finite number >= 0",
        ),
        (["stages.0.family_weights.swap=nan"], "stages.0 (stage).family_weights.swap must be a finite"),
        (["stages.0.family_weights.swap=inf"], "stages.0 (stage).family_weights.swap must be a finite"),
        (["stages.0.lr=nan"], "lr a finite number > 0"),
        (["stages.0.family_weights.swap=often"], "stages.0.family_weights.swap: expected a number"),
        (["stages.0.family_weights=3"], "stages.0.family_weights: expected a mapping"),
    ],
)
def test_bad_overrides_are_one_line_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)


def test_schedule_warms_up_then_decays_per_stage():
    cfg = TrainConfig.from_dict(
        {
            "stages": [
                {"steps": 10, "lr": 1.0, "warmup": 2},
                {"steps": 10, "lr": 0.5, "warmup": 0, "mode": "full"},
            ]
        }
    )
    assert stage_at(cfg.stages, 9) == (0, 9) and stage_at(cfg.stages, 10) == (1, 0)
    lrs = [lr_at(cfg.stages, s, 0.0) for s in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:10], lrs[2:10], strict=False))
    assert lrs[10] == pytest.approx(0.5) and lrs[19] < 0.05


def test_cli_dry_run_prints_the_resolved_config(cli, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stages": [{"steps": 3}]}))
    code, out, _ = cli("train", "--config", path, "--dry-run", "--json", "optim.grad_accum=2")
    assert code == 0
    assert json.loads(out)["optim"]["grad_accum"] == 2
    code, _, err = cli("train", "--config", path, "--dry-run", "optim.grad_accum=0")
    assert code != 0 and err.startswith("error:")


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(tmp_path, caplog, monkeypatch):
    import logging

    import torch

    from circot.train.trainer import _resolve_precision, cpu_has_native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plain = tmp_path / "cpuinfo-avx2"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    native = tmp_path / "cpuinfo-bf16"
    native.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(plain) is False
    assert cpu_has_native_bf16(native) is True
    assert cpu_has_native_bf16(tmp_path / "missing") is None

    with caplog.at_level(logging.WARNING, logger="circot.train.trainer"):
        assert _resolve_precision("bf16", native) == "bf16"
        assert _resolve_precision("no", plain) == "no"
        assert _resolve_precision("auto", plain) == "no"
        assert not caplog.records
        assert _resolve_precision("bf16", plain) == "bf16"
    assert len(caplog.records) == 1
    assert "avx512_bf16" in caplog.text and "optim.mixed_precision=no" in caplog.text


CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path):
    cfg = load_config(path)
    assert cfg.stages and all(st.steps > 0 for st in cfg.stages)


def test_the_shapes_pair_shares_its_perception_stage_and_its_training_data():
    """(b) and (c) of the results table: same seed, model, batch, perception stage and tower data, and every
    stage of (b) after `see` draws from the split (c)'s last stage draws from."""
    configs = Path(__file__).parents[2] / "configs"
    b = load_config(configs / "shapes-tiny-nocot.yaml")
    c = load_config(configs / "shapes-tiny-cot.yaml")
    assert (b.seed, b.model, b.optim.batch_size) == (c.seed, c.model, c.optim.batch_size)
    assert b.stages[0] == c.stages[0] and b.stages[0].mode == "perception"
    assert b.stage_root(b.stages[0]) == c.stage_root(c.stages[0])
    assert {b.stage_root(st) for st in b.stages[1:]} == {c.stage_root(c.stages[-1])}
