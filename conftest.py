"""Suite-wide settings and hooks for every collected item: tests/, the package doctests and
README.md. The XLA:CPU codegen flags are set below, before JAX starts.

Each XLA:CPU executable keeps its JIT-compiled code in its own memory mappings, and jax
keeps every executable it compiled alive in its caches. A pytest worker that runs
hundreds of tests therefore accumulates mappings (about 400 per SD test, measured with
/proc/self/maps) until it reaches the kernel's ``vm.max_map_count`` (65530 by default);
the next compilation's mmap then fails inside LLVM and the worker dies with SIGSEGV.
After a test that leaves the worker above half that limit, the caches are dropped (the
worker keeps its compiled programs until then: clearing after every module would compile
again what later modules share).
"""

import gc
import os

import pytest

from benchmarks.compile_flags import EXACT_CODEGEN_FLAGS, TEST_SUITE_FLAGS

# XLA:CPU compiles with cheaper codegen in the test processes (and in every subprocess and
# notebook kernel they start, which inherit the environment): LLVM at -O0, the legacy
# elemental emitters instead of the MLIR fusion emitters, and one LLVM module per program
# (not 32 parts: fewer memory mappings, see below). Most of the suite's time is XLA
# compilation; `python -m benchmarks.compile_flags` measures what the flags save in compile
# time and cost in run time (docs/guide/benchmarks.md). What is tested is the same program;
# only its machine code differs, at float rounding: -O0 forms no fused multiply-adds. Tests
# that compare two compiled programs bitwise or within a few ulps are marked
# `pytest.mark.exact_codegen` (spelled so: the Makefile's second pass collects only the
# files that hold `mark.exact_codegen`) and run in `make test`'s second pass
# (JAXDIV_TEST_CODEGEN=exact) under EXACT_CODEGEN_FLAGS (LLVM -O1, which fuses
# multiply-adds as XLA's default codegen does).
# JAXDIV_TEST_XLA_DEFAULTS=1 tests everything under XLA's default codegen. A flag already
# in XLA_FLAGS comes later in the string and wins.
_DEFAULTS = os.environ.get("JAXDIV_TEST_XLA_DEFAULTS") == "1"
_EXACT = os.environ.get("JAXDIV_TEST_CODEGEN") == "exact"
_SUITE_FLAGS = EXACT_CODEGEN_FLAGS if _EXACT else TEST_SUITE_FLAGS
_flags = os.environ.get("XLA_FLAGS", "")
if not _DEFAULTS and _SUITE_FLAGS not in _flags:
    os.environ["XLA_FLAGS"] = f"{_SUITE_FLAGS} {_flags}".strip()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "exact_codegen: compares two compiled programs bitwise or within a few ulps; runs "
        "under FMA-contracting codegen (JAXDIV_TEST_CODEGEN=exact, make test's second pass)",
    )


def pytest_runtest_setup(item):
    if item.get_closest_marker("exact_codegen") and not (_EXACT or _DEFAULTS):
        pytest.skip("compares compiled programs at float rounding, which the suite's -O0 "
                    "codegen changes: run with JAXDIV_TEST_CODEGEN=exact pytest -m exact_codegen")


_MAPS_LIMIT = 30000


def _mapping_count():
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no per-process mapping limit to watch
        return 0


@pytest.fixture(autouse=True)
def _release_compiled_near_the_mapping_limit():
    yield
    if _mapping_count() > _MAPS_LIMIT:
        import jax

        jax.clear_caches()
        gc.collect()
