"""The persistent compilation cache (``jaxdiv.compilation_cache``) and the console command's
use of it: a second process loads what the first compiled (JAX's own cache-hit events),
``jaxdiv demo`` fills the folder ``JAXDIV_COMPILATION_CACHE`` names, ``0`` turns it off,
and folders that cannot serve are refused with the variable named."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxdiv import compilation_cache
from jaxdiv.host_memory import REUSE_FREED_MEMORY

REPO = Path(__file__).resolve().parents[1]

# one process: enable the cache in argv[1], compile two programs, report JAX's cache events
CHILD = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from jaxdiv import compilation_cache

    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    folder = compilation_cache.enable(sys.argv[1])
    f = jax.jit(lambda x: jnp.sin(x) @ x.T + jnp.cumsum(x, axis=0))
    g = jax.jit(lambda x: jnp.tanh(x).sum())
    out = float(f(jnp.ones((8, 8))).sum()) + float(g(jnp.ones((4,))))
    print(json.dumps({"folder": str(folder), "out": out,
                      "hits": events.count("/jax/compilation_cache/cache_hits"),
                      "misses": events.count("/jax/compilation_cache/cache_misses")}))
    """
)


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # fmt: skip
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env | extra


def _child(folder) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=_env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def restore_jax_cache():
    import jax

    keep = jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    compilation_cache.disable()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", keep)


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    folder = tmp_path / "cache" / "xla"  # created, parents too
    first = _child(folder)
    assert first["misses"] >= 2 and first["hits"] == 0, first
    entries = sorted(p.name for p in folder.iterdir())
    assert len(entries) >= 2, entries
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # private: entries are code
    second = _child(folder)
    assert second["hits"] >= 2 and second["misses"] == 0, second
    assert second["out"] == first["out"]
    assert sorted(p.name for p in folder.iterdir()) == entries  # nothing compiled anew


def test_console_command_fills_the_named_folder_and_zero_turns_it_off(tmp_path):
    """``jaxdiv demo`` as from the console (``sys.argv``), under the malloc setting already
    (so it does not restart itself): with ``JAXDIV_COMPILATION_CACHE=<folder>`` the folder
    fills; with ``0`` the default folder under ``XDG_CACHE_HOME`` is never created."""
    run = textwrap.dedent(
        """
        import sys
        from experiments.cli import main
        sys.argv = ["jaxdiv", "demo", "--out", sys.argv[1], "--batches", "2", "--batch", "4",
                    "--no-figure", "--quiet"]
        sys.exit(main())
        """
    )
    xdg = tmp_path / "xdg"
    base = _env(GLIBC_TUNABLES=REUSE_FREED_MEMORY, XDG_CACHE_HOME=str(xdg))
    folder = tmp_path / "xla"
    res = subprocess.run([sys.executable, "-c", run, str(tmp_path / "on")],
                         env=base | {compilation_cache.VARIABLE: str(folder)},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list(folder.iterdir())) >= 3, sorted(folder.iterdir())
    assert not xdg.exists()
    res = subprocess.run([sys.executable, "-c", run.replace('"demo", "--out"', '"demo", "-h"'),
                          "unused"], env=base | {compilation_cache.VARIABLE: "0"},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and "--batches" in res.stdout, res.stderr[-3000:]
    assert not xdg.exists()
    res = subprocess.run([sys.executable, "-c", run.replace('"demo", "--out"', '"demo", "-h"'),
                          "unused"], env=base, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (xdg / "jaxdiv" / "xla").is_dir()  # unset: the default folder


def test_a_folder_that_cannot_serve_is_refused_naming_the_variable(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="compilation cache folder .*file' is not a folder"):
        compilation_cache.enable(a_file)
    with pytest.raises(ValueError, match="cannot be created"):
        compilation_cache.enable(a_file / "below")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="writable by every user.*chmod o-w"):
        compilation_cache.enable(shared)
    env = {compilation_cache.VARIABLE: str(a_file)}
    with pytest.raises(ValueError, match=r"^JAXDIV_COMPILATION_CACHE: .*=0 to run without"):
        compilation_cache.from_environment(env)
    # the console command stops with that message and status 2, before running anything
    run = "import sys; from experiments.cli import main; sys.argv = ['jaxdiv', 'demo']; main()"
    res = subprocess.run([sys.executable, "-c", run],
                         env=_env(GLIBC_TUNABLES=REUSE_FREED_MEMORY) | env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "jaxdiv: error: JAXDIV_COMPILATION_CACHE: compilation cache folder" in res.stderr


def test_enable_without_a_folder_keeps_the_one_jax_was_given(tmp_path, restore_jax_cache):
    import jax

    mine = tmp_path / "mine"
    jax.config.update("jax_compilation_cache_dir", str(mine))
    assert compilation_cache.enable(env={"XDG_CACHE_HOME": str(tmp_path / "x")}) == mine
    compilation_cache.disable()
    got = compilation_cache.enable(env={"XDG_CACHE_HOME": str(tmp_path / "x")})
    assert got == (tmp_path / "x" / "jaxdiv" / "xla").resolve()
    assert jax.config.jax_compilation_cache_dir == str(got)
    assert compilation_cache.from_environment({compilation_cache.VARIABLE: "off"}) is None
    compilation_cache.disable()
    # the default folder cannot serve (here: under a file): a warning, and no cache
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="cannot be created.*running without a compilation"):
        assert compilation_cache.from_environment({"XDG_CACHE_HOME": str(blocked)}) is None
    assert jax.config.jax_compilation_cache_dir is None
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # keeps every program
    compilation_cache.enable(tmp_path / "y", min_compile_time_s=2.5)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.5
    with pytest.raises(ValueError, match="min_compile_time_s must be a finite number >= 0"):
        compilation_cache.enable(tmp_path / "z", min_compile_time_s=-1)
    assert not (tmp_path / "z").exists()
