"""``python -m benchmarks.conv``: the convolution gap per XLA flag set, at tiny shapes."""

import json

import pytest

from benchmarks import conv


def test_each_flag_set_runs_in_its_own_process_and_agrees_with_torch(tmp_path):
    out = tmp_path / "conv.json"
    conv.main(["--shapes", "tiny", "--rounds", "2", "--flag-sets", "default", "--out", str(out)])
    data = json.loads(out.read_text())
    entry = data["flag_sets"]["default"]
    assert entry["status"] == "ok", entry
    assert "--xla_cpu_multi_thread_eigen=false" in entry["environment"]["threads"]["XLA_FLAGS"]
    assert entry["environment"]["peak_rss_mb"] > 0
    assert entry["environment"]["versions"]["torch"] and entry["environment"]["date"]
    assert len(entry["rows"]) == len(conv.SHAPES["tiny"])
    paths = [row["path"] for row in entry["rows"]]
    assert paths == ["gathered_patches", "gathered_patches", "winograd", "gathered_patches"]
    assert [row["stride"] for row in entry["rows"]] == [1, 1, 1, 2]
    assert entry["rows"][3]["gflop"] == 2 * 2 * 4 * 4 * 9 * 8 * 8 / 1e9  # the 4 x 4 output
    for row in entry["rows"]:
        assert row["max_abs_diff"] < 1e-4  # the same convolution
        assert set(row["max_abs_error_to_float64"]) == set(row["times"])
        assert all(e < 1e-4 for e in row["max_abs_error_to_float64"].values())
        assert len(row["times"]["jaxdiv"]["runs_s"]) == 2 and row["torch_over_jaxdiv"] > 0
        for ratio in ("per_round_torch_over_jaxdiv", "per_round_lax_over_jaxdiv"):
            lo, hi = row[ratio]
            assert 0 < lo <= hi
    # 2 x 8 x 8 = 128 tiles: batched products; the unrolled ones are timed beside them
    winograd = entry["rows"][2]
    others = [row for row in entry["rows"] if row is not winograd]
    assert [row["winograd_products"] for row in others] == [None, None, None]
    assert all(conv.OTHER_PRODUCTS not in row["times"] for row in others)
    assert winograd["winograd_products"] == "batched"
    assert len(winograd["times"][conv.OTHER_PRODUCTS]["runs_s"]) == 2
    lo, hi = winograd["per_round_other_products_over_jaxdiv"]
    assert 0 < lo <= hi and winograd["other_products_over_jaxdiv"] > 0


def test_unknown_flag_sets_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        conv.main(["--flag-sets", "fastest", "--out", str(tmp_path / "x.json")])


def test_input_gradient_pass_times_the_implementations_and_they_agree(tmp_path):
    out = tmp_path / "conv_grad.json"
    conv.main(["--shapes", "tiny", "--rounds", "1", "--flag-sets", "default", "--pass",
               "input_grad", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["pass"] == "input_grad"
    entry = data["flag_sets"]["default"]
    assert entry["status"] == "ok", entry
    three = {"jaxdiv", "torch", "lax_conv_general_dilated"}
    for row in entry["rows"]:
        assert row["steps"] == 2
        assert row["max_abs_diff"] < 1e-4 and row["max_abs_diff_lax"] < 1e-4  # same steps
        assert row["lax_over_jaxdiv"] > 0 and row["torch_over_jaxdiv"] > 0
        if row["path"] != "winograd":
            assert set(row["times"]) == three
            continue
        # Winograd's input gradient also timed as JAX's autodiff of its transforms
        assert set(row["times"]) == three | {conv.AUTODIFF_WINOGRAD}
        assert row["max_abs_diff_autodiff_winograd"] < 1e-4
        lo, hi = row["per_round_autodiff_winograd_over_jaxdiv"]
        assert 0 < lo <= hi and row["autodiff_winograd_over_jaxdiv"] > 0
    assert [row["path"] for row in entry["rows"]].count("winograd") == 1  # (2, 16, 8, 8)


def test_winograd_can_be_forced_on_every_shape_it_can_take(tmp_path):
    out = tmp_path / "conv_forced.json"
    conv.main(["--shapes", "tiny", "--rounds", "1", "--flag-sets", "default",
               "--winograd-min-tiles", "0", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["flag_sets"]["default"]["rows"]
    # the stride-2 shape stays on the patches: Winograd takes stride 1 only
    paths = ["winograd", "gathered_patches", "winograd", "gathered_patches"]
    assert [row["path"] for row in rows] == paths
    assert all(row["max_abs_diff"] < 1e-4 for row in rows)


def test_small_outputs_can_be_left_to_xla(tmp_path):
    out = tmp_path / "conv_direct.json"
    conv.main(["--shapes", "tiny", "--rounds", "1", "--flag-sets", "default",
               "--small-output-tiles", "0", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["small_output_tiles"] == 0
    rows = data["flag_sets"]["default"]["rows"]
    # the strided one has its own threshold (SMALL_STRIDED_OUTPUT_TILES)
    paths = ["direct", "gathered_patches", "winograd", "gathered_patches"]
    assert [row["path"] for row in rows] == paths


def test_matmul_pass_times_products_per_flag_set(tmp_path):
    out = tmp_path / "conv_matmul.json"
    conv.main(["--pass", "matmul", "--shapes", "tiny", "--rounds", "1", "--flag-sets",
               "default,no_ynn", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert "jnp.matmul vs torch.matmul" in data["benchmark"]
    for name in ("default", "no_ynn"):
        entry = data["flag_sets"][name]
        assert entry["status"] == "ok", entry
        assert [(row["lhs"], row["rhs"]) for row in entry["rows"]] == [
            (list(a), list(b)) for a, b in conv.MATMUL_SHAPES["tiny"]
        ]
        for row in entry["rows"]:
            assert row["jax_gflops"] > 0 and row["torch_gflops"] > 0
            lo, hi = row["per_round_torch_over_jax"]  # one round: the median's own ratio
            assert lo == hi == pytest.approx(row["torch_over_jax"])
    assert "--xla_cpu_experimental_ynn_fusion_type=" in (
        data["flag_sets"]["no_ynn"]["environment"]["threads"]["XLA_FLAGS"]
    )
    with pytest.raises(SystemExit):
        conv.main(["--pass", "matmul", "--shapes", "bottom", "--out", str(tmp_path / "x.json")])


def test_matmul_pass_in_bfloat16_records_both_errors(tmp_path):
    out = tmp_path / "bf16.json"
    conv.main(["--pass", "matmul", "--shapes", "tiny", "--rounds", "1", "--flag-sets",
               "default", "--dtype", "bfloat16", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and "bfloat16" in data["benchmark"]
    for row in data["flag_sets"]["default"]["rows"]:
        assert row["dtype"] == "bfloat16"
        # both round to bfloat16 outputs (8 bits): errors above float32's, below 2^-6
        errors = row["max_rel_error_to_float64"]
        assert set(errors) == {"jax", "torch"}
        assert all(1e-6 < e < 2**-6 for e in errors.values()), errors
    with pytest.raises(SystemExit):
        conv.main(["--dtype", "bfloat16", "--out", str(tmp_path / "x.json")])
