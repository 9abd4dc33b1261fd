"""``python -m benchmarks.sd_step`` in-process on the tiny UNet: the row holds interleaved
times, the parity of the two ports, the cores each implementation kept busy, the
direct-convolution peer, and a skipped ``torch.compile`` peer is recorded as such."""

import json

import pytest

pytest.importorskip("diffusers")

from benchmarks import sd_step  # noqa: E402


def test_tiny_row_and_json(tmp_path):
    out = tmp_path / "sd_step.json"
    # --threads 0: pinning would bind the test worker to one core for good
    sd_step.main(["--configs", "tiny", "--latent", "16", "--batch", "2", "--repeats", "2",
                  "--torch-compile", "off", "--threads", "0", "--direct-conv-peer",
                  "--jax-variants", "vmapped_heads,xla_attention,no_ynn",
                  "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["config"] == "tiny" and row["max_abs_diff"] < 1e-4
    assert len(row["jax_all_s"]) == len(row["torch_all_s"]) == 2
    lo, hi = row["per_round_ratio_min_max"]  # over 2 rounds the ratio of medians lies between
    assert 0 < lo * (1 - 1e-9) <= row["ratio_torch_over_jax"] <= hi * (1 + 1e-9)
    variants = ("vmapped_heads", "xla_attention", "no_ynn", "direct_conv")
    assert set(row["cores_used"]) == {"jax", "torch"} | {f"jax_{v}" for v in variants}
    assert list(row["jax_variants"]) == list(variants)
    direct = row["jax_variants"]["direct_conv"]  # latent 16: 2 x 8 x 8 tiles, Winograd in jax
    assert 0 < direct["max_abs_diff_to_jax"] and len(direct["all_s"]) == 2
    assert direct["settings"]["jaxdiv.models.convolution.SMALL_OUTPUT_TILES"] == 0
    assert direct["settings"]["jaxdiv.models.convolution.SMALL_STRIDED_OUTPUT_TILES"] == 0
    assert row["jax_variants"]["no_ynn"]["compiler_options"] == {
        "xla_cpu_experimental_ynn_fusion_type": ""
    }
    for v in row["jax_variants"].values():
        assert v["max_abs_diff_to_torch"] < 1e-4
        lo, hi = v["per_round_ratio_min_max"]
        assert 0 < lo * (1 - 1e-9) <= v["ratio_variant_over_jax"] <= hi * (1 + 1e-9)
    # the tiny UNet's 16 x 16 self-attention takes the blocked path in one key block on
    # CPU, so no pairs are looped; dense attention still changes the rounding
    assert row["jax_variants"]["xla_attention"]["max_abs_diff_to_jax"] > 0
    assert all(0 < c < 64 for c in row["cores_used"].values())
    assert set(row["call_usage"]) == set(row["cores_used"])
    assert all(u["minor_faults"] >= 0 and u["system_s"] >= 0 for u in row["call_usage"].values())
    assert row["torch_compile"]["status"] == "skipped (--torch-compile off)"
    assert data["meta"]["cpu_affinity"] and "peak_rss_mb" in data["meta"]


def test_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--configs entries must be in"):
        sd_step.main(["--configs", "sd99", "--threads", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="must be positive"):
        sd_step.main(["--latent", "0", "--threads", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="--jax-variants entries must be in"):
        sd_step.main(
            ["--jax-variants", "fast", "--threads", "0", "--out", str(tmp_path / "x.json")]
        )


def test_every_variant_changes_an_existing_constant_or_a_compiler_option():
    for name, (description, settings, options) in sd_step.JAX_VARIANTS.items():
        assert description and (settings or options), name
        for module, attr, value in settings:
            assert hasattr(module, attr), (name, module.__name__, attr)
            assert getattr(module, attr) != value, (name, attr)  # the default differs


def test_every_variants_compiler_options_compile_and_set_ynnpacks_fusions():
    """XLA rejects an option value only when compiling: each variant's options compile a
    product followed by elementwise work, and YNNPACK fuses exactly what was asked."""
    import re

    import jax
    import jax.numpy as jnp

    x = jnp.ones((64, 64), jnp.float32)
    f = lambda a: jnp.tanh(a @ a) * 2.0  # noqa: E731

    def ynn_ops(options):  # the op each YNNPACK fusion was made from
        hlo = jax.jit(f, compiler_options=options).lower(x).compile().as_text()
        return {m.split("/")[-1] for m in re.findall(r"%ynn_fusion[^\n]*op_name=\"([^\"]+)", hlo)}

    got = {name: ynn_ops(opts) for name, (_, _, opts) in sd_step.JAX_VARIANTS.items()}
    assert "dot_general" in ynn_ops({})  # XLA's default: YNNPACK runs the product
    assert got["no_ynn"] == set()
    assert got["ynn_dot_only"] == {"dot_general"}
    assert got["ynn_no_dot"] and "dot_general" not in got["ynn_no_dot"]
