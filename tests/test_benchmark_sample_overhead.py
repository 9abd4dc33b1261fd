"""``benchmarks.sample_overhead`` at a tiny size: sample() and the program it runs give the
same samples, and every timing and ratio is recorded."""

import json

import pytest

from benchmarks import sample_overhead


def test_tiny_run_records_both_sides_of_every_case(tmp_path):
    out = tmp_path / "overhead.json"
    result = sample_overhead.main(["--batches", "3", "128", "--steps", "2", "--rounds", "2",
                                   "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=float))
    # particle guidance only where its pairwise cost is small
    assert [(r["batch"], r["guidance"]) for r in data["rows"]] == [
        (3, "none"), (3, "particle"), (128, "none")]
    for r in data["rows"]:
        assert r["max_abs_diff"] == 0.0  # the same compiled program
        assert set(r["times"]) == {"sample", "program"}
        assert all(len(t["runs_s"]) == 2 for t in r["times"].values())
        lo, hi = r["per_round_sample_over_program"]
        assert 0 < lo <= r["sample_over_program"] <= hi
        med = {k: t["median_s"] for k, t in r["times"].items()}
        assert r["overhead_ms"] == pytest.approx(1e3 * (med["sample"] - med["program"]))
    assert data["meta"]["peak_rss_mb"] > 0 and "load_average" in data["meta"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        sample_overhead.main(["--rounds", "0", "--out", str(tmp_path / "x.json")])
