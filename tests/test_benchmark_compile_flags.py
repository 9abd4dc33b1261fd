"""``python -m benchmarks.compile_flags``: compile and run time per XLA flag set, at tiny sizes."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import compile_flags


def test_the_test_session_compiles_with_the_suites_flags_unless_opted_out():
    # conftest.py puts them in the environment before JAX starts
    flags = os.environ.get("XLA_FLAGS", "")
    defaults = os.environ.get("JAXDIV_TEST_XLA_DEFAULTS") == "1"
    exact = os.environ.get("JAXDIV_TEST_CODEGEN") == "exact"
    assert (compile_flags.TEST_SUITE_FLAGS in flags) == (not defaults and not exact)
    assert (compile_flags.EXACT_CODEGEN_FLAGS in flags) == (not defaults and exact)


def test_the_suites_codegen_forms_no_fused_multiply_add_and_the_exact_codegen_does(tmp_path):
    """Why the tests marked ``exact_codegen`` run apart: ``a * b + c`` with ``a = b = 1 +
    2**-12``, ``c = -(1 + 2**-11)`` is ``2**-24`` exactly, which one fused multiply-add keeps
    and a rounded product loses (``a * b`` rounds to ``1 + 2**-11``, a tie to even). On a
    CPU without FMA instructions no codegen fuses."""
    try:
        with open("/proc/cpuinfo") as f:
            fma = " fma " in f.read().replace("\n", " ")
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell whether the CPU has FMA instructions")
    code = ("import jax, jax.numpy as jnp; a = jnp.full(8, 1 + 2**-12, jnp.float32); "
            "print(float(jax.jit(lambda a, b, c: a * b + c)(a, a, -(a * a))[0]))")
    got = {}
    for name in ("tests", "exact_tests", "default"):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=compile_flags.FLAG_SETS[name])
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        got[name] = float(run.stdout)
    fused = 2.0**-24 if fma else 0.0
    assert got == {"tests": 0.0, "exact_tests": fused, "default": fused}


def test_each_round_and_flag_set_runs_in_its_own_process(tmp_path):
    # the toy workload alone: the UNet's is timed in-process below (a child building the
    # tiny UNet under the default flags cost ~15 s of the suite and tests nothing more)
    out = tmp_path / "compile_flags.json"
    compile_flags.main(["--smoke", "--rounds", "1", "--flag-sets", "default,tests",
                        "--workloads", "toy", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["flag_sets"] == {"default": "", "tests": compile_flags.TEST_SUITE_FLAGS}
    for name, flags in data["flag_sets"].items():
        (run,) = data["runs"][name]
        assert run["status"] == "ok", run
        assert run["environment"]["threads"]["XLA_FLAGS"] == flags
        assert len(run["environment"]["cpu_affinity"]) == 1  # pinned
        toy = run["workloads"]["toy"]
        assert toy["programs"] == 3 and toy["first_call_s"] > toy["second_call_s"] > 0
        assert list(run["workloads"]) == ["toy"]
    row = data["table"]["toy"]["tests"]["first_call_s"]
    lo, hi = row["default_over_this_per_round"]
    assert 0 < lo == hi == row["default_over_this"]  # one round: one ratio
    assert "default_over_this" not in data["table"]["toy"]["default"]["first_call_s"]
    env = data["environment"]  # what benchmarks.summary reads: date, CPU, the largest child
    assert env["date"] and env["versions"]["jax"] and env["cpu"]["model"]
    assert env["peak_rss_mb"] == max(r["environment"]["peak_rss_mb"]
                                     for runs in data["runs"].values() for r in runs)  # fmt: skip


def test_unet_workload_times_the_first_call_in_its_parts():
    got = compile_flags.unet("tiny")
    assert got["config"] == "tiny" and len(got["runs_s"]) == 3
    assert got["first_call_s"] == pytest.approx(got["lower_s"] + got["compile_s"]
                                                + got["first_run_s"])  # fmt: skip
    assert min(got["runs_s"]) <= got["run_s"] <= max(got["runs_s"]) and got["run_s"] > 0


@pytest.mark.parametrize("flag", [["--flag-sets", "fastest"], ["--workloads", "sd3"],
                                  ["--rounds", "0"]])  # fmt: skip
def test_unknown_names_and_bad_rounds_are_refused(tmp_path, flag):
    with pytest.raises(SystemExit):
        compile_flags.main([*flag, "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
