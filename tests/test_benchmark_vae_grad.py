"""``benchmarks.vae_grad`` at a tiny size: both libraries' decoder and input gradient agree,
every timing and ratio is recorded."""

import json

import pytest

pytest.importorskip("diffusers")

from benchmarks import vae_grad  # noqa: E402


def test_tiny_vae_decoder_gradients_agree_and_every_timing_is_recorded(tmp_path):
    out = tmp_path / "vae_grad.json"
    vae_grad.main(["--config", "tiny", "--latent", "16", "--rounds", "1", "--threads", "0",
                   "--malloc", "default", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["image_size"] == 32
    assert set(row["times"]) == {"decode", "input_grad", "input_grad_autodiff_winograd",
                                 "torch_decode", "torch_input_grad"}  # fmt: skip
    for name, diff in row["max_abs_diff_to_torch"].items():
        scale = row["max_abs_torch"][name.split("_autodiff")[0]]
        assert diff <= 1e-4 * scale, (name, diff, scale)
    for key in ("decode_torch_over_jaxdiv", "input_grad_torch_over_jaxdiv",
                "autodiff_winograd_over_jaxdiv"):  # fmt: skip
        lo, hi = row[f"per_round_{key}"]
        assert 0 < lo <= hi and row[key] > 0
    for side in ("jaxdiv", "autodiff_winograd", "torch"):
        assert row[f"{side}_input_grad_over_decode"] > 0
    assert data["meta"]["thread_setting"] == 0 and data["meta"]["malloc"] == "default"
    assert "peak_rss_mb" in data["meta"]


def test_non_positive_sizes_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        vae_grad.main(["--config", "tiny", "--latent", "0", "--out", str(tmp_path / "x.json")])
