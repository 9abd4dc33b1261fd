"""Smoke test of ``benchmarks/toy_sampler.py``: it runs in-process on a tiny batch, every
implementation agrees with jaxdiv, and the JSON holds the fields the guide's numbers come
from (interleaved medians, ratios, the exp floor, the HLO thunks per step)."""

import json
import math

import pytest

pytest.importorskip("torch")

from benchmarks import toy_sampler  # noqa: E402


def test_smoke_benchmark_writes_agreeing_timed_json(tmp_path, capsys):
    out = tmp_path / "toy.json"
    argv = ["--batch", "64", "--steps", "3", "--rounds", "2", "--torch-compile", "off",
            "--out", str(out)]  # fmt: skip
    result = toy_sampler.main(argv)
    assert "jaxdiv (jit, lax.scan)" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=float))
    for key in ("date", "command", "versions", "threads", "peak_rss_gb", "rows", "summary",
                "cross_check", "torch_compile", "hlo", "goals"):  # fmt: skip
        assert key in data, key
    assert data["command"].endswith("python -m benchmarks.toy_sampler " + " ".join(argv))
    assert {"jax", "torch"} <= set(data["versions"]) and data["threads"]["torch_threads"] == 1
    assert data["peak_rss_gb"] > 0
    # the cross-check ran on every peer and passed
    check = data["cross_check"]
    assert check["passed"] and len(check["max_abs_diff_vs_jaxdiv"]) == 6
    assert all(0 <= e <= check["tolerance"] for e in check["max_abs_diff_vs_jaxdiv"].values())
    tc = data["torch_compile"]
    assert tc["status"].startswith("skipped") and len(tc["peers"]) == 2
    assert all(p["status"].startswith("skipped") for p in tc["peers"].values())
    # interleaved: every row has one run per round, median within [min, max], finite ratios
    names = [r["name"] for r in data["rows"]]
    assert names[0] == "jaxdiv (jit, lax.scan)" and len(names) == 13
    for r in data["rows"]:
        assert len(r["runs_s"]) == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        lo, hi = r["time_over_jaxdiv_min_max"]
        assert 0 < lo <= r["time_over_jaxdiv"] <= hi and math.isfinite(hi)
    s = data["summary"]
    assert s["floor"]["name"].startswith("floor: ") and s["floor"]["exps"] == 64 * 8 * 5
    assert math.isfinite(s["floor"]["jaxdiv_over_floor"]) and s["floor"]["jaxdiv_over_floor"] > 0
    assert all(math.isfinite(v) for v in s["per_evaluation"].values())
    # the compiled program: thunks of one Heun step, with exp fusions and profiled times
    h = data["hlo"]["jaxdiv (jit, lax.scan)"]
    assert h["fusions_per_heun_step"] >= h["exp_fusions_per_heun_step"] >= 2
    assert h["thunks_per_heun_step"] >= h["fusions_per_heun_step"]
    assert h["profiled_thunks_found"] > 0 and h["profiled_us_per_heun_step_sum"] > 0
    assert data["goals"]["jaxdiv_2x_faster_than_torch_compile"] is None


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        toy_sampler.main(["--rounds", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        toy_sampler.main(["--torch-compile", "fast", "--out", str(tmp_path / "x.json")])
