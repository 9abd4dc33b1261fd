"""Smoke test of ``benchmarks/evaluate_encoders.py`` on tiny towers: it runs in-process,
jaxdiv's features (preprocessing included) agree with transformers', and the JSON holds
the fields the README's per-1,000-images figures come from."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import evaluate_encoders  # noqa: E402


def test_tiny_encoders_agree_and_the_json_is_complete(tmp_path):
    out = tmp_path / "ee.json"
    result = evaluate_encoders.main(["--configs", "tiny,tiny-dinov2", "--batch", "2",
                                     "--image", "48", "--rounds", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result, default=float))
    for key in ("date", "command", "versions", "threads", "rows"):
        assert key in data, key
    assert [r["encoder"] for r in data["rows"]] == ["clip", "dinov2"]
    for row in data["rows"]:
        assert row["max_abs_output"] > 1e-2  # a non-trivial output, so agreement means something
        assert row["max_abs_diff"] < 1e-4 * max(1.0, row["max_abs_output"])
        assert row["jax_s_per_1000_images"] == pytest.approx(row["jax_s"] * 500)


def test_unknown_config_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        evaluate_encoders.main(["--configs", "vit-huge", "--out", str(tmp_path / "x.json")])
