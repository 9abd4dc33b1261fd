"""``benchmarks.group_norm`` at a tiny size: every side agrees with float64 torch and every
timing and ratio is recorded."""

import json

import pytest

pytest.importorskip("torch")

from benchmarks import group_norm  # noqa: E402


def test_tiny_group_norm_sides_agree_and_every_timing_is_recorded(tmp_path):
    out = tmp_path / "group_norm.json"
    group_norm.main(["--shapes", "tiny", "--rounds", "1", "--threads", "0", "--malloc",
                     "default", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["shape"] == [1, 6, 6, 64] and row["set"] == "tiny"
    sides = {"forward", "input_grad", "reshape_forward", "reshape_input_grad",
             "torch_forward", "torch_input_grad"}  # fmt: skip
    assert set(row["times"]) == sides == set(row["max_abs_diff_to_float64_torch"])
    assert max(row["max_abs_diff_to_float64_torch"].values()) < 1e-5
    for kind in ("forward", "input_grad"):
        for peer in ("torch", "reshape"):
            lo, hi = row[f"per_round_{kind}_{peer}_over_jaxdiv"]
            assert 0 < lo <= hi and row[f"{kind}_{peer}_over_jaxdiv"] > 0
    assert data["meta"]["thread_setting"] == 0 and data["meta"]["malloc"] == "default"
    assert "peak_rss_mb" in data["meta"]


def test_non_positive_rounds_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        group_norm.main(["--shapes", "tiny", "--rounds", "0", "--out", str(tmp_path / "x.json")])
