"""scripts/ship_model.py: the model card's results rows come from the results table, one key per row and figure."""

from __future__ import annotations

from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "circot" / "assets" / "shapes-tiny"


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
