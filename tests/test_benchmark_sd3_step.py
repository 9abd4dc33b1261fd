"""Smoke test of ``benchmarks/sd3_step.py`` on the tiny MMDiT: it runs in-process, both
implementations agree, and the JSON holds the fields the README's numbers come from."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from benchmarks import sd3_step  # noqa: E402


def test_tiny_step_benchmark_writes_agreeing_timed_json(tmp_path, capsys):
    out = tmp_path / "sd3_step_tiny.json"
    result = sd3_step.main(["--config", "tiny", "--rounds", "1", "--out", str(out)])
    assert "diffusers/jaxdiv" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=float))
    for key in ("date", "command", "versions", "threads", "peak_rss_gb", "rows"):
        assert key in data, key
    assert {"jax", "torch", "diffusers", "flax"} <= set(data["versions"])
    assert data["threads"]["torch_threads"] >= 1 and "XLA_FLAGS" in data["threads"]["env"]
    (row,) = data["rows"]
    assert row["config"] == "tiny" and row["rounds"] == 1 and row["batch"] == 2
    assert row["latent_shape"] == [2, 4, 16, 16] and row["text_tokens"] == 77 + 256
    assert row["max_abs_output"] > 0.1  # a non-trivial output, so agreement means something
    assert row["max_abs_diff"] < 1e-4
    assert len(row["jax_runs_s"]) == len(row["torch_runs_s"]) == 1
    lo, hi = row["jax_min_max_s"]
    assert 0 < lo <= row["jax_s"] <= hi
    assert row["ratio_torch_over_jax"] == pytest.approx(row["torch_s"] / row["jax_s"])
    assert row["peak_rss_gb"]["end_gb"] > 0


def test_bad_arguments_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit):
        sd3_step.main(["--config", "tiny", "--latent", "18", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        sd3_step.main(["--config", "tiny", "--rounds", "0", "--out", str(tmp_path / "x")])
