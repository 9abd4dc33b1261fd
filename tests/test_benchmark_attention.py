"""Smoke test of ``benchmarks/attention.py``: it runs in-process on a tiny shape, the three
implementations agree, and the JSON holds the fields the README's numbers come from."""

import json

import pytest

pytest.importorskip("torch")

from benchmarks import attention  # noqa: E402


def test_smoke_benchmark_writes_agreeing_timed_json(tmp_path, capsys):
    out = tmp_path / "attention.json"
    result = attention.main(["--smoke", "--tune", "--out", str(out)])
    assert "xla/blocked" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=float))
    for key in ("date", "command", "versions", "threads", "peak_rss_gb", "rows", "defaults"):
        assert key in data, key
    assert {"jax", "torch"} <= set(data["versions"])
    assert data["threads"]["torch_threads"] == 1 and "XLA_FLAGS" in data["threads"]["env"]
    kinds = [row["kind"] for row in data["rows"]]
    assert kinds == ["compare", "tune_kv_block", "tune_crossover"]
    row = data["rows"][0]
    assert row["rounds"] == 1 and row["seq_q"] == row["seq_kv"] == 40
    for name in ("xla", "torch", "looped", "vmapped"):
        assert row[f"max_abs_diff_{name}"] < 1e-5, name
    for name in ("blocked", "xla", "torch", "looped", "vmapped"):
        lo, hi = row[f"{name}_min_max_s"]
        assert 0 < lo <= row[f"{name}_s"] <= hi and len(row[f"{name}_runs_s"]) == 1
    assert row["ratio_torch_over_blocked"] == pytest.approx(row["torch_s"] / row["blocked_s"])
    assert row["peak_rss_gb"] > 0


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        attention.main(["--rounds", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        attention.main(["--seq", "4096,abc", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        attention.main(["--seq", "64x64x64", "--out", str(tmp_path / "x.json")])


def test_backward_smoke_compares_the_gradients_of_every_implementation(tmp_path):
    out = tmp_path / "attention_backward.json"
    result = attention.main(["--smoke", "--tune", "--backward", "--out", str(out)])
    assert result["benchmark"].endswith("forward and gradients (q, k, v)")
    compare, block_16, _ = result["rows"]
    assert compare["backward"] and block_16["kv_block"] == 16  # 40 keys: three blocks
    for name in ("xla", "torch", "looped", "vmapped"):  # output and dq, dk, dv
        assert compare[f"max_abs_diff_{name}"] < 1e-5, name
    assert block_16["max_abs_diff_xla"] < 1e-5
    assert compare["blocked_s"] > 0 and compare["ratio_torch_over_blocked"] > 0
