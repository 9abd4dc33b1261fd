"""``python -m benchmarks.sd_methods`` in-process on the tiny pipeline, and the check behind
its ``--jax-conv-vjp`` rows: whether swapping in JAX's own convolution VJP changes a
compiled program."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("diffusers")

from benchmarks import sd_methods  # noqa: E402


def test_tiny_run_of_a_method_subset(tmp_path):
    out = tmp_path / "sd_methods.json"
    sd_methods.main(["--config", "tiny", "--steps", "2", "--batch", "2", "--rounds", "1",
                     "--methods", "spell,cads", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"unguided (CFG)", "spell", "cads"}
    for r in rows.values():
        assert math.isfinite(r["per_image_s"]) and r["per_image_s"] > 0, r
        assert len(r["runs_s"]) == 1
    assert rows["unguided (CFG)"]["ratio_to_unguided"] == 1.0
    assert data["methods"] == ["spell", "cads"] and "tpso_optimizer_steps" not in data
    assert "same_optimized_hlo_with_either_conv_vjp" not in data
    assert data["cpu_affinity"] and data["peak_rss_mb"] > 0 and data["malloc"] == "default"


def test_bad_method_selections_are_refused(tmp_path):
    out = str(tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"--methods entries must be in .*'gas'"):
        sd_methods.main(["--config", "tiny", "--methods", "gas", "--out", out])
    with pytest.raises(ValueError, match="--jax-conv-vjp times the GASS programs"):
        sd_methods.main(["--config", "tiny", "--methods", "spell", "--jax-conv-vjp",
                         "--out", out])  # fmt: skip


def test_jax_conv_vjp_changes_only_programs_that_differentiate_a_convolution(monkeypatch):
    """What ``same_optimized_hlo_with_either_conv_vjp`` reports: a convolution that only
    runs forward in a scan compiles to the same program either way; its input gradient
    does not (JAX's rule gives the kernel the ``01oi`` labels)."""
    from jaxdiv.models import convolution
    from jaxdiv.models.convolution import conv_general_dilated

    # 16 output tiles would take the gathered-patch product: keep XLA's convolution here
    monkeypatch.setattr(convolution, "SMALL_OUTPUT_TILES", 0)

    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def conv(x):
        return conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

    def forward(x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(conv(c)), None), x, None, length=2)[0]

    def descent(x):
        step = jax.grad(lambda y: (conv(y) ** 2).sum())
        return jax.lax.scan(lambda c, _: (c - 0.01 * step(c), None), x, None, length=2)[0]

    for fn, same in ((forward, True), (descent, False)):
        ours, theirs = _optimised_hlo_both_ways(fn, x)
        assert (ours == theirs) is same, fn.__name__
        assert ("01oi" in theirs) is not same


def _optimised_hlo_both_ways(fn, x):
    """``fn``'s optimised HLO with jaxdiv's convolution VJPs and with JAX's own."""
    program = jax.jit(fn)
    ours = sd_methods._hlo_without_locations(program.lower(x).compile())
    theirs = sd_methods._hlo_without_locations(
        sd_methods._with_jax_conv_vjp(lambda: program.lower(x).compile()))
    return ours, theirs


def test_jax_conv_vjp_also_differentiates_winograd_by_autodiff():
    """On the Winograd path the "JAX's own VJP" side differentiates the transforms as
    written; a forward-only program compiles the same either way."""
    from jaxdiv.models.convolution import conv_general_dilated, conv_path

    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 8))  # 64 output tiles: Winograd
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    assert conv_path(x, w, (1, 1), ((1, 1), (1, 1))) == "winograd"

    def conv(x):
        return conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

    def forward(x):
        return jnp.tanh(conv(x))

    def descent(x):
        return x - 0.01 * jax.grad(lambda y: (conv(y) ** 2).sum())(x)

    for fn, same in ((forward, True), (descent, False)):
        ours, theirs = _optimised_hlo_both_ways(fn, x)
        assert (ours == theirs) is same, fn.__name__


def test_malloc_reuse_is_refused_in_process_before_any_work(tmp_path):
    from jaxdiv.host_memory import reusing_freed_memory

    if reusing_freed_memory():
        pytest.skip("this process already runs under the setting")
    with pytest.raises(ValueError, match="--malloc reuse needs GLIBC_TUNABLES"):
        sd_methods.main(["--config", "tiny", "--methods", "spell", "--malloc", "reuse",
                         "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert not (tmp_path / "x.json").exists()
