"""Smoke test of ``benchmarks/contextual_overhead.py`` on the tiny MMDiT: it runs
in-process, repulsion changes the output, and the JSON holds the fields the README's
overhead figure comes from."""

import json

import pytest

from benchmarks import contextual_overhead


def test_tiny_overhead_benchmark_writes_timed_json(tmp_path, capsys):
    out = tmp_path / "co.json"
    result = contextual_overhead.main(["--rounds", "1", "--inner-steps", "5", "--eta", "50",
                                       "--out", str(out)])  # fmt: skip
    assert "overhead" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=float))
    for key in ("date", "command", "versions", "threads", "rows"):
        assert key in data, key
    (row,) = data["rows"]
    assert row["model_batch"] == 4 and row["latent_shape"] == [2, 16, 16, 16]
    assert row["relative_change_of_x0"] > 1e-4  # "on" really repelled
    assert len(row["on_runs_s"]) == len(row["off_runs_s"]) == 1
    assert row["overhead"] == pytest.approx(row["on_s"] / row["off_s"] - 1)


@pytest.mark.parametrize("flags", [["--batch", "1"], ["--eta", "0"], ["--eta", "nan"],
                                   ["--latent", "15"], ["--rounds", "0"]])  # fmt: skip
def test_bad_arguments_are_refused(tmp_path, flags):
    with pytest.raises(SystemExit):
        contextual_overhead.main([*flags, "--out", str(tmp_path / "x.json")])
