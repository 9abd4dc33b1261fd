"""Suite-wide hooks for every collected item: tests/, the package doctests and README.md.

Each XLA:CPU executable keeps its JIT-compiled code in its own memory mappings, and jax
keeps every executable it compiled alive in its caches. A pytest worker that runs
hundreds of tests therefore accumulates mappings (about 400 per SD test, measured with
/proc/self/maps) until it reaches the kernel's ``vm.max_map_count`` (65530 by default);
the next compilation's mmap then fails inside LLVM and the worker dies with SIGSEGV.
Dropping the caches after each module keeps a worker near its start-up count.
"""

import gc

import pytest

# a module that compiles a great deal on its own is also cleared between its tests
_MAPS_LIMIT = 30000


def _release_compiled():
    import jax

    jax.clear_caches()
    gc.collect()


def _mapping_count():
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no per-process mapping limit to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_per_module():
    yield
    _release_compiled()


@pytest.fixture(autouse=True)
def _release_compiled_near_the_mapping_limit():
    yield
    if _mapping_count() > _MAPS_LIMIT:
        _release_compiled()
