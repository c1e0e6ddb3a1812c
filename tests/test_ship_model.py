"""scripts/ship_model.py: the model card's results rows come from the results table, one key per row and figure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "circot" / "assets" / "shapes-tiny"
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "vision_depth": 1}


@pytest.fixture(scope="module")
def ship_model(load_script):
    return load_script("scripts/ship_model.py")


def _row(r1: float, steer: float, cot: dict | None = None) -> dict:
    res = {"metrics": {"R@1": r1}, "faithfulness": {"steering_R@1": steer}}
    if cot is not None:
        res["cot"] = cot
    return {"fingerprint": "f" * 16, "val": res}


def test_each_row_keeps_its_own_steering_figure(ship_model):
    table = {
        "splits": ["val"],
        "rows": {"c": _row(94.4, 92.9, {"conclusion_exact": 0.879}), "c_cot": _row(93.6, 95.7)},
    }
    out = ship_model.card_results(table, "f" * 16, "circot train ...")
    assert out["training"] == "circot train ..."
    assert out["shapes val full R@1"] == 94.4
    assert out["shapes val full, <emb> of the CoT alone R@1"] == 93.6
    assert out["shapes val full steering R@1 (another query's gold conclusion)"] == 92.9
    assert (
        out["shapes val full, <emb> of the CoT alone steering R@1 (another query's gold conclusion)"] == 95.7
    )
    assert out["shapes val conclusion exact match (%)"] == pytest.approx(87.9)


def test_a_table_of_another_model_is_refused(ship_model):
    table = {"splits": ["val"], "rows": {"c": _row(94.4, 92.9)}}
    with pytest.raises(SystemExit, match="not on 0000"):
        ship_model.card_results(table, "0" * 16, None)


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--fast-weight", "1.5", r"fast_weight must be in \[0, 1\), got 1.5"),
        ("--cot-samples", "-2", r"cot_samples must be an integer >= 0, got -2"),
    ],
)
def test_a_bad_setting_is_one_error_and_writes_nothing(
    ship_model, monkeypatch, tmp_path, option, value, message
):
    dest = tmp_path / "shipped"
    argv = ["ship_model.py", str(SHIPPED), "--dest", str(dest), option, value]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit, match=rf"^error: .*{message}"):
        ship_model.main()
    assert not dest.exists()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from circot.model import CIRCoT

    root = tmp_path_factory.mktemp("soup")
    a = CIRCoT.tiny(seed=0, fast_weight=0.2, **SMALL).save_pretrained(root / "a")
    b = CIRCoT.tiny(seed=1, **SMALL).save_pretrained(root / "b")
    c = CIRCoT.tiny(seed=2, **SMALL).save_pretrained(root / "c")
    wide = CIRCoT.tiny(seed=3, **{**SMALL, "intermediate_size": 96}).save_pretrained(root / "wide")
    return {"a": a, "b": b, "c": c, "wide": wide}


def test_a_soup_ships_the_mean_of_the_weights_with_the_first_models_settings(
    ship_model, monkeypatch, tmp_path, tiny_dirs
):
    from circot.model import CIRCoT

    dest = tmp_path / "soup"
    argv = ["ship_model.py", str(tiny_dirs["a"]), "--dest", str(dest)]
    monkeypatch.setattr("sys.argv", [*argv, "--soup", str(tiny_dirs["b"]), "--soup", str(tiny_dirs["c"])])
    ship_model.main()
    soup = CIRCoT.from_pretrained(dest)
    parts = [CIRCoT.from_pretrained(tiny_dirs[k]).hf.state_dict() for k in "abc"]
    got = soup.hf.state_dict()
    assert soup.config.fast_weight == 0.2
    for key, v in got.items():
        if v.is_floating_point():
            mean = sum(p[key] for p in parts) / 3
            assert torch.allclose(v, mean.half().float(), atol=1e-6), key  # stored in float16
    assert not torch.equal(got["lm_head.weight"], parts[0]["lm_head.weight"])


def test_a_soup_of_another_architecture_is_one_error_and_writes_nothing(
    ship_model, monkeypatch, tmp_path, tiny_dirs
):
    dest = tmp_path / "soup"
    argv = ["ship_model.py", str(tiny_dirs["a"]), "--dest", str(dest), "--soup", str(tiny_dirs["wide"])]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(
        SystemExit, match=r"^error: .*wide: tensor .*mlp.* has shape \(96, 32\), not \(64, 32\)"
    ):
        ship_model.main()
    assert not dest.exists()


def test_a_soup_of_models_with_tied_embeddings_averages_each_tensor_once(ship_model, monkeypatch, tmp_path):
    from circot.model import CIRCoT

    dirs = [
        CIRCoT.tiny(seed=s, tie_word_embeddings=True, **SMALL).save_pretrained(tmp_path / f"t{s}")
        for s in (0, 1)
    ]
    dest = tmp_path / "soup"
    monkeypatch.setattr(
        "sys.argv", ["ship_model.py", str(dirs[0]), "--dest", str(dest), "--soup", str(dirs[1])]
    )
    ship_model.main()
    parts = [CIRCoT.from_pretrained(d).hf.state_dict() for d in dirs]
    got = CIRCoT.from_pretrained(dest).hf.state_dict()
    assert got["lm_head.weight"].data_ptr() == got["model.language_model.embed_tokens.weight"].data_ptr()
    mean = (parts[0]["lm_head.weight"] + parts[1]["lm_head.weight"]) / 2
    assert torch.allclose(got["lm_head.weight"], mean.half().float(), atol=1e-6)
