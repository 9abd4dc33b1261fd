"""``python -m benchmarks.compile_flags``: compile and run time per XLA flag set, at tiny sizes."""

import json
import os

import pytest

from benchmarks import compile_flags


def test_the_test_session_compiles_with_the_suites_flags_unless_opted_out():
    # conftest.py puts them in the environment before JAX starts
    wanted = os.environ.get("JAXDIV_TEST_XLA_DEFAULTS") != "1"
    assert (compile_flags.TEST_SUITE_FLAGS in os.environ.get("XLA_FLAGS", "")) == wanted


def test_each_round_and_flag_set_runs_in_its_own_process(tmp_path):
    out = tmp_path / "compile_flags.json"
    compile_flags.main(["--smoke", "--rounds", "1", "--flag-sets", "default,tests",
                        "--workloads", "toy,unet", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["flag_sets"] == {"default": "", "tests": compile_flags.TEST_SUITE_FLAGS}
    for name, flags in data["flag_sets"].items():
        (run,) = data["runs"][name]
        assert run["status"] == "ok", run
        assert run["environment"]["threads"]["XLA_FLAGS"] == flags
        assert len(run["environment"]["cpu_affinity"]) == 1  # pinned
        toy = run["workloads"]["toy"]
        assert toy["programs"] == 3 and toy["first_call_s"] > toy["second_call_s"] > 0
        assert run["workloads"]["unet"]["config"] == "tiny"
    row = data["table"]["toy"]["tests"]["first_call_s"]
    lo, hi = row["default_over_this_per_round"]
    assert 0 < lo == hi == row["default_over_this"]  # one round: one ratio
    assert "default_over_this" not in data["table"]["toy"]["default"]["first_call_s"]
    env = data["environment"]  # what benchmarks.summary reads: date, CPU, the largest child
    assert env["date"] and env["versions"]["jax"] and env["cpu"]["model"]
    assert env["peak_rss_mb"] == max(r["environment"]["peak_rss_mb"]
                                     for runs in data["runs"].values() for r in runs)  # fmt: skip


@pytest.mark.parametrize("flag", [["--flag-sets", "fastest"], ["--workloads", "sd3"],
                                  ["--rounds", "0"]])  # fmt: skip
def test_unknown_names_and_bad_rounds_are_refused(tmp_path, flag):
    with pytest.raises(SystemExit):
        compile_flags.main([*flag, "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
