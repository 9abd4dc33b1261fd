"""``python -m benchmarks.sd_generate`` in-process on the tiny pipeline: both libraries'
full generations are timed in alternation, their last images agree, and the 512 px
configuration is there but never part of the default run."""

import json

import pytest

pytest.importorskip("diffusers")

from benchmarks import sd_generate  # noqa: E402


def test_tiny_generation_without_warmup(tmp_path):
    out = tmp_path / "sd_generate.json"
    # --threads 0: pinning would bind the test worker to one core for good
    sd_generate.main(["--configs", "tiny", "--steps", "2", "--repeats", "2", "--no-warmup",
                      "--threads", "0", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["config"] == "tiny" and row["steps"] == 2 and row["warmup"] is False
    assert len(row["jax_runs_s"]) == len(row["torch_runs_s"]) == 2
    assert row["jax_min_max_s"][0] <= row["jax_s"] <= row["jax_min_max_s"][1]
    assert row["max_abs_image_diff"] < 1e-4
    assert data["versions"]["diffusers"] and data["peak_rss_mb"] > 0


def test_full_size_config_is_opt_in(tmp_path):
    sd21 = sd_generate.CONFIGS["sd21"]
    assert sd21["unet"]["sample_size"] == 64 and sd21["text_encoder"]["num_hidden_layers"] == 23
    assert "sd21" not in sd_generate.DEFAULT_CONFIGS
    with pytest.raises(ValueError, match="--steps and --repeats must be >= 1"):
        sd_generate.main(["--configs", "tiny", "--steps", "0", "--threads", "0",
                          "--out", str(tmp_path / "x.json")])  # fmt: skip
