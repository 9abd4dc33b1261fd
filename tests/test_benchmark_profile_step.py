"""``python -m benchmarks.profile_step`` on the tiny UNet: the profiler's thunk events are
joined with the compiled module, every group is present and the shares add up, the
Winograd products are found where the tiny UNet has them, and the GEMM table times real
product shapes against torch."""

import json

import pytest

pytest.importorskip("torch")

from benchmarks import profile_step  # noqa: E402


def test_tiny_profile(tmp_path):
    out = tmp_path / "p.json"
    # --threads 0: pinning would bind the test worker to one core for good
    argv = ["--config", "tiny", "--latent", "32", "--batch", "2", "--threads", "0",
            "--gemm-peers", "2", "--rounds", "1", "--out", str(out)]  # fmt: skip
    r = profile_step.main(argv)
    assert json.loads(out.read_text())["groups"] == r["groups"]
    assert set(r["groups"]) == set(profile_step.GROUPS)
    assert abs(sum(g["share"] for g in r["groups"].values()) - 1) < 1e-9
    assert r["thunk_total_s"] > 0 and r["step_s"] > 0
    # 2 x 16 x 16 = 512 output tiles at the first level: Winograd
    assert r["groups"]["winograd_gemm"]["thunks"] > 0
    assert r["groups"]["winograd_kernel_transform"]["thunks"] > 0
    assert len(r["gemm_peers"]) == 2
    for row in r["gemm_peers"]:
        assert row["lhs"][-1] == row["rhs"][-2] and row["jax_gflops"] > 0
        lo, hi = row["jax_min_max_s"]
        assert 0 < lo <= row["jax_s"] <= hi and row["rounds"] == 1
    assert r["torch_version"] and r["environment"]["date"] and "threads" in r
    assert r["top"] and r["environment"]["cpu"]


def test_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--config must be one of"):
        profile_step.main(["--config", "sd99", "--threads", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--latent must be"):
        profile_step.main(["--latent", "12", "--threads", "0", "--out", str(tmp_path / "x")])


def test_malloc_reuse_is_taken_before_anything_runs(tmp_path, monkeypatch):
    # in-process, with no command line to start again under the setting, it refuses
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with pytest.raises(ValueError, match="--malloc reuse needs GLIBC_TUNABLES"):
        profile_step.main(["--config", "tiny", "--threads", "0", "--malloc", "reuse",
                           "--out", str(tmp_path / "x.json")])  # fmt: skip
    assert not (tmp_path / "x.json").exists()
