"""``python -m benchmarks.compile_cache``: cold and warm compilation caches, at tiny sizes."""

import json

import pytest

from benchmarks import compile_cache


def test_cold_and_warm_runs_alternate_in_fresh_processes(tmp_path):
    out = tmp_path / "compile_cache.json"
    compile_cache.main(["--smoke", "--rounds", "1", "--workloads", "sd_tiny",
                        "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["min_compile_time_s"] == 0.0
    for setting in ("cold", "warm"):
        (run,) = data["runs"]["sd_tiny"][setting]
        assert run["status"] == "ok", run
        assert len(run["environment"]["cpu_affinity"]) == 1  # pinned
        assert run["first_call_s"] > run["second_call_s"] > 0
    # the first cold run filled the warm folder, and the warm run compiled nothing new into it
    folder = data["warm_folder"]
    assert folder["warm"]["sd_tiny"]["entries"] >= 1 and folder["warm"]["sd_tiny"]["bytes"] > 0
    assert folder["warm_after"] == folder["warm"]
    row = data["table"]["sd_tiny"]["first_call_s"]
    lo, hi = row["cold_over_warm_per_round"]
    assert 0 < lo == hi == row["cold_over_warm"]  # one round: one ratio
    assert data["environment"]["date"] and data["environment"]["peak_rss_mb"] > 0


@pytest.mark.parametrize("flag", [["--workloads", "sd3"], ["--rounds", "0"],
                                  ["--min-compile-time", "nan"]])  # fmt: skip
def test_unknown_workloads_and_bad_numbers_are_refused(tmp_path, flag):
    with pytest.raises(SystemExit):
        compile_cache.main([*flag, "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
