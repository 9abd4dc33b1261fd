"""``experiments.evaluate`` on folders written by ``experiments.generate`` itself.

Two runs of the tiny random SD pipeline (unguided CFG and SPELL with the automatic radius)
are evaluated with the pipeline's own tiny CLIP vision tower: every image generate listed
in its ``metadata.json`` is encoded once, the prompt and method of each set come from that
metadata, and the numbers are finite and consistent (the unguided set against itself as
reference has FD 0).
"""

from __future__ import annotations

import json
import math

import numpy as np

from experiments import evaluate, generate
from jaxdiv.testing import example_pipeline

PROMPTS = ("a cat", "a dog")


def _generate(model, out, method):
    argv = ["--model", model, "--prompt", *PROMPTS, "--sampler", "ddim", "--clean-endpoint",
            "--steps", "2", "--cfg", "3", "--batch-size", "4", "--n", "4", "--seed", "0",
            "--method", method, "--out", str(out)]  # fmt: skip
    assert generate.main(argv) == 0
    return json.loads((out / "metadata.json").read_text())


def test_evaluate_reads_generate_folders(tmp_path):
    pipe = example_pipeline(image_encoder=True)
    model = str(pipe.path)
    runs = {m: tmp_path / m for m in ("none", "spell")}
    metas = {m: _generate(model, out, m) for m, out in runs.items()}
    assert metas["spell"]["method_resolved"]["spell_radius"]  # the radius was resolved
    out = tmp_path / "eval"
    argv = ["--images", str(runs["none"]), str(runs["spell"]), "--reference", str(runs["none"]),
            "--encoders", "clip", "--clip", f"{model}/image_encoder", "--out", str(out),
            "--bootstrap", "50"]  # fmt: skip
    assert evaluate.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["sets"]) == ["none", "spell"]
    for name, meta in metas.items():
        s = res["sets"][name]
        assert s["method"] == name
        per = s["encoders"]["clip"]["per_prompt"]
        assert [p["prompt"] for p in per] == list(PROMPTS) and all(p["n"] == 4 for p in per)
        for p in per:
            assert 1 - 1e-4 <= p["vendi"] <= 4 + 1e-4 and math.isfinite(p["mss"])
        (cache,) = (out / "features").glob(f"{name}-*/clip-*.npz")
        with np.load(cache) as f:
            files = sorted(str(x) for x in f["files"])
            assert np.isfinite(f["features"]).all()
        assert files == sorted(e["file"] for e in meta["images"])
        pooled = s["encoders"]["clip"]["pooled"]
        for key in ("fd", "kid_mean", "precision", "recall", "density", "coverage", "cmmd"):
            assert math.isfinite(pooled[key]), (name, key)
    assert abs(res["sets"]["none"]["encoders"]["clip"]["pooled"]["fd"]) < 1e-3
