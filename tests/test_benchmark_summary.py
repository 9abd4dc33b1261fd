"""``python -m benchmarks.summary``: every ratio of the benchmark JSONs on one screen."""

import json

import pytest

from benchmarks import summary


def test_ratios_of_every_layout_are_listed_with_their_rows(tmp_path, capsys):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "a.json").write_text(json.dumps({
        "date": "2026-12-03T10:00:00+00:00", "peak_rss_mb": 2048.0, "cpu": {"model": "AMD EPYC"},
        "rows": [{"config": "tiny", "torch_over_jax": 1.25, "jax_s": 0.5,
                  "model_config": {"mlp_ratio": 4.0}},
                 {"config": "big", "torch_over_jax": float("nan")}]}))  # fmt: skip
    # sd_step's layout: the environment under "meta", no peak RSS
    (tmp_path / "b.json").write_text(json.dumps({
        "meta": {"date": "2026-12-02"}, "rows": [{"latent": 64, "ratio_torch_over_jax": 1.14}]}))
    # benchmarks.conv's layout: rows and environment per flag set, shapes as lists
    (tmp_path / "c.json").write_text(json.dumps({"flag_sets": {"default": {
        "environment": {"date": "2026-12-06", "cpu": {"model": "Xeon"}, "peak_rss_mb": 1024.0},
        "rows": [{"lhs": [8, 4], "rhs": [4, 2], "dtype": "bfloat16", "torch_over_jax": 0.2,
                  "per_round_torch_over_jax": [0.1, 0.3]}]}}}))  # fmt: skip
    (tmp_path / "no_ratios.json").write_text(json.dumps({"rows": [{"jax_s": 1.0}]}))
    (tmp_path / "broken.json").write_text("{")
    lines = summary.main(["--root", str(tmp_path)])
    assert capsys.readouterr().out.splitlines() == lines
    assert lines[0].startswith("b.json  (2026-12-02, peak RSS not recorded)")
    assert lines[1] == "  rows[0] latent=64: ratio_torch_over_jax 1.14"
    assert lines[2] == "benchmarks/a.json  (2026-12-03, AMD EPYC, peak RSS 2.0 GB)"
    # the NaN row and the model configuration's mlp_ratio are left out
    assert lines[3] == "  rows[0] config=tiny: torch_over_jax 1.25"
    assert lines[5] == "c.json  (2026-12-06, Xeon, peak RSS 1.0 GB)"
    assert lines[6] == ("  flag_sets default rows[0] dtype=bfloat16 lhs=8x4 rhs=4x2: "
                        "torch_over_jax 0.2")
    assert any("broken.json: unreadable" in line for line in lines)
    assert not any("no_ratios" in line for line in lines)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        summary.main(["--root", str(tmp_path / "nope")])
