"""Smoke test of ``benchmarks/groups.py`` at tiny sizes: it runs in-process, the three
ways to compute independent groups agree (with shared terms, and with a radius per group)
while one coupled batch does not, and the JSON holds the timings the guide quotes."""

import json

import numpy as np
import pytest

from benchmarks import groups


def test_tiny_groups_benchmark_writes_timed_json(tmp_path, capsys):
    out = tmp_path / "g.json"
    result = groups.main(["--rounds", "1", "--groups", "3", "--per-group", "3", "--dim", "4",
                          "--shields", "300", "--steps", "3", "--workloads",
                          "spell_reference,spell_sweep", "--out", str(out)])  # fmt: skip
    assert "user_vmap/groups" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=float))
    for key in ("date", "command", "versions", "threads", "cpu", "peak_rss_mb", "rows"):
        assert key in data, key
    assert [r["workload"] for r in data["rows"]] == ["spell_reference", "spell_sweep"]
    for row in data["rows"]:
        assert row["user_vmap_max_diff_of_scale"] < 1e-5, row
        assert row["loop_max_diff_of_scale"] < 1e-5, row
        assert row["one_batch_differs_of_scale"] > 1e-4, row  # groups coupled: other samples
        for name in groups.IMPLEMENTATIONS:
            assert len(row[f"{name}_runs_s"]) == 1
            lo, hi = row[f"{name}_min_max_s"]
            assert lo <= row[f"{name}_s"] <= hi
        assert row["loop_over_groups"] == pytest.approx(row["loop_s"] / row["groups_s"])


def test_sd_workload_is_one_prompt_per_group_with_cfg(tmp_path):
    """``sd_cfg``'s inputs on the tiny pipeline (its timing runs the same ``measure`` as the
    toy rows; compiling its four UNet programs here would cost ~20 s of the suite)."""
    import jax

    sampler, den, noise, cond, term = groups._sd("tiny", 3, 2, 4, 0, str(tmp_path))
    assert noise.shape == (6, 4, 8, 8) and sampler.num_steps == 4 and term.name == "cfg"
    rows = jax.tree.leaves(cond)[0]
    assert rows.shape[0] == 6
    # one prompt per group: the rows of a group are equal, the groups differ
    np.testing.assert_array_equal(rows[0], rows[1])
    assert float(np.abs(np.asarray(rows[0]) - np.asarray(rows[2])).max()) > 0


@pytest.mark.parametrize("flags", [["--workloads", "cfg"], ["--rounds", "0"],
                                   ["--per-group", "2", "--workloads", "particle"]])  # fmt: skip
def test_bad_arguments_are_refused(tmp_path, flags):
    with pytest.raises(SystemExit):
        groups.main([*flags, "--out", str(tmp_path / "x.json")])
