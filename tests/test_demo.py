"""``experiments.demo`` (``make demo``, ``jaxdiv demo``): every method on the ring toy with
the same noise, its table, JSON and figure, and the effects it is there to show."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments import demo

METHODS = ["unguided", "CFG", "CADS", "interval", "PG", "SPELL", "GASS"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--out", str(out), "--batches", "4", "--batch", "16", "--quiet"]) == 0
    return out, json.loads((out / "demo.json").read_text())


def test_writes_every_method_with_finite_numbers_and_a_figure(ran):
    out, res = ran
    assert [r["method"] for r in res["rows"]] == METHODS
    for r in [*res["rows"], res["exact"]]:
        for k in ("vendi", "recall", "precision", "clip"):
            assert np.isfinite(r[k]), (r.get("method"), k)
    assert {"jaxdiv", "jax", "numpy", "python"} <= set(res["versions"])
    assert res["setting"]["batches"] == 4 and res["setting"]["batch"] == 16
    with Image.open(out / "demo.png") as img:
        assert img.width > 800 and img.height > 400


def test_the_effects_the_demo_shows(ran):
    """CFG is more on-class and less diverse than the conditional model alone; every
    diversity method on top of the same CFG gives back Vendi (and SPELL and GASS recall)."""
    rows = {r["method"]: r for r in ran[1]["rows"]}
    unguided, cfg = rows["unguided"], rows["CFG"]
    assert cfg["clip"] > unguided["clip"] + 5
    assert cfg["vendi"] < 0.6 * unguided["vendi"] and cfg["recall"] < unguided["recall"]
    for name in ("PG", "SPELL", "GASS"):
        assert rows[name]["vendi"] > 1.3 * cfg["vendi"], name
    for name in ("SPELL", "GASS"):
        assert rows[name]["recall"] > cfg["recall"] + 0.1, name
        assert rows[name]["clip"] > unguided["clip"], name  # still on class


def test_prints_the_table_and_refuses_bad_sizes(tmp_path, capsys):
    row = dict(method="CFG", vendi=5.0, recall=0.6, precision=1.0, clip=96.0)
    text = demo.format_table([row], dict(vendi=12, recall=1, precision=1, clip=84))
    assert text.splitlines()[2] == "| CFG | 5.00 | 0.60 | 1.00 | 96.0 |"
    assert text.splitlines()[3].startswith("| exact p(x|c) | 12.00 |")
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--batch", "1"])
    assert "--batch must be >= 2, got 1" in capsys.readouterr().err
    for seed in ("-1", str(2**64)):  # negative, and past the 64-bit keys (an OverflowError)
        with pytest.raises(SystemExit):
            demo.main(["--out", str(tmp_path), "--seed", seed])
        assert f"--seed: must be an integer in [0, 2**62), got {seed!r}" in capsys.readouterr().err
    # 2 x 2 samples passed both size checks and crashed in PRDC (k = 5) with a traceback
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--batches", "2", "--batch", "2"])
    assert "--batches x --batch must give more than 5 samples" in capsys.readouterr().err
