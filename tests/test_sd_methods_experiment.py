"""``experiments.sd_methods`` and ``experiments.generate --method`` on a tiny random SD folder.

One folder (16x16 images, a CLIP vision tower) and one CLIP text projection serve every
test; the generate runs use the shapes and knobs of the sd_methods run (3 images, 2 DDIM
steps, CFG 3), though generate's DDIM (diffusers' endpoint) is another program than
sd_methods' (``clean_endpoint=True``). The numbers are meaningless on a
random model; the tests prove the machinery: every method runs, the JSON holds finite
metrics, metadata records the knobs, a completed run resumes as a no-op, a coupled batch
is regenerated whole and byte-identical, other knobs are refused, bad knobs fail before
the model loads.
"""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import generate, run_folder, sd_methods
from jaxdiv.pipelines import generation, stable_diffusion

pytest.importorskip("diffusers")  # the random folder is built by diffusers / transformers

N, STEPS, CFG = 3, 2, "3"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxdiv.testing import save_random_pipeline

    folder = tmp_path_factory.mktemp("sd_tiny_methods")
    save_random_pipeline(folder, seed=0, image_encoder=True)
    return folder


@pytest.fixture(scope="module")
def projection(tmp_path_factory):
    """A CLIP text model with projection of the tiny text encoder's width (32 -> 16, the
    vision tower's projection width)."""
    import transformers

    from jaxdiv.testing import TINY_TEXT

    folder = tmp_path_factory.mktemp("clip_projection")
    cfg = transformers.CLIPTextConfig(**TINY_TEXT, vocab_size=83)
    transformers.CLIPTextModelWithProjection(cfg).save_pretrained(folder)
    return folder


def no_load(*a, **k):
    raise AssertionError("the model was loaded")


# -- experiments.sd_methods --------------------------------------------------------------


def test_sd_methods_runs_every_method_end_to_end(model, projection, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--prompts", str(prompts), "--n", str(N), "--steps",
            str(STEPS), "--cfg", CFG, "--out", str(out), "--clip-projection", str(projection),
            "--pg-strength", "100", "--tpso-null-pool", "3", "--gass-max-iters", "3",
            "--tpso-ratio", "0.5"]  # fmt: skip  (0.4 of 2 steps would be none: refused)
    assert sd_methods.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    sd_only = [m for m in generate.METHODS if m != "contextual"]  # contextual: SD3 only
    assert list(res["skipped"]) == ["contextual"]
    assert "runs on SD3 / SD3.5 folders only" in res["skipped"]["contextual"]
    assert list(res["methods"]) == sd_only
    assert res["methods"]["spell"]["knobs"] == {"radius": "auto", "overcompensation": 1.6}
    assert res["methods"]["gass"]["knobs"]["projection"] == str(projection.resolve())
    for method in ("cads", "interval"):  # the paper defaults
        assert res["methods"][method]["knobs"] == generate.method_knobs(method, {}, str(model))
    assert res["methods"]["tpso"]["knobs"]["null_pool"] == 3
    assert res["methods"]["gass"]["knobs"]["max_iters"] == 3
    with np.load(out / "tpso_null_pool.npz") as f:
        assert f["hidden"].shape[0] == 3
    (row,) = res["prompts"]
    assert row["prompt"] == "a cat" and row["grid"] == "grid_p000.png"
    metrics = ("vendi", "mss", "spp", "clip_score", "latent_mean_distance", "seconds")
    for method in sd_only:
        values = row["methods"][method]
        for name in metrics:
            assert isinstance(values[name], float) and math.isfinite(values[name]), (method, name)
        assert 1 - 1e-4 <= values["vendi"] <= N + 1e-4 and 0 <= values["clip_score"] <= 100
        assert set(res["mean"][method]) >= set(metrics)
    # SPELL's radius is the unguided row's median distance; its rows end >= r apart
    spell = row["methods"]["spell"]
    assert spell["spell_radius"] == pytest.approx(row["methods"]["none"]["latent_median_distance"])
    from PIL import Image

    with Image.open(out / "grid_p000.png") as im:
        assert im.size == (sd_methods.LABEL_WIDTH + N * 16, len(sd_only) * 16)


def test_sd_methods_skips_what_the_folder_lacks(model, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    monkeypatch.setattr(stable_diffusion, "load", no_load)
    args = sd_methods.parse_args(["--model", str(model), "--prompts", str(prompts), "--n", "2",
                                  "--out", str(tmp_path / "o")])  # fmt: skip
    knobs, skipped = sd_methods.plan(args)
    assert set(knobs) == {"none", "spell", "cads", "interval"}
    assert "--pg-strength" in skipped["particle"]
    assert "--clip-projection" in skipped["gass"] and "--tpso-projection" in skipped["tpso"]
    args.pg_strength = "1"
    assert "--n >= 3" in sd_methods.plan(args)[1]["particle"]  # n = 2: one batch
    args.guidance_rescale = 0.7  # the CFG rescale: interval guidance and TPSO take it too
    knobs, skipped = sd_methods.plan(args)
    assert "interval" in knobs and "--guidance-rescale" not in skipped["tpso"]
    args.guidance_rescale = None
    args.cfg = 1.0  # interval guidance at scale 1 is the unguided run
    assert "would be the unguided run" in sd_methods.plan(args)[1]["interval"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "none,foo"], "--methods: unknown foo"),
        (["--n", "1"], "--n must be >= 2"),
        (["--clip-projection", "/nonexistent"], "is not a model folder"),
        # named on purpose: a text encoder without projection is refused, not ignored
        (["--methods", "none", "--clip-projection", "{model}/text_encoder"],
         "holds a CLIPTextModel without a text projection (needs "
         "CLIPTextModelWithProjection or CLIPModel)"),
        (["--pg-strength", "nan"], "--pg-strength must be a finite number"),
        (["--methods", "none,cads", "--spell-radius", "2"],
         "--spell-radius applies to --methods spell, which this run does not include"),
        # a method asked for by name that cannot run (it was skipped: a run of nothing)
        (["--methods", "particle", "--pg-strength", "1", "--n", "2"],
         "--methods particle cannot run: --method particle couples the images of a batch: it "
         "needs --n >= 3"),
        (["--methods", "none,gass"], "--methods gass cannot run: --method gass needs"),
        (["--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1], got 2.0"),
        (["--guidance-rescale", "0.7", "--cfg", "1"],
         "--guidance-rescale has no effect with --cfg 1"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
        # GASS acts at most once per step: refused before the model loads, not at its turn
        (["--methods", "none,gass", "--steps", "4", "--gass-num-active", "5"],
         "--gass-num-active 5 exceeds --steps 4: GASS acts at most once per step"),
    ],
)
def test_sd_methods_bad_values_fail_before_the_model_loads(
    model, tmp_path, monkeypatch, capsys, extra, message
):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    monkeypatch.setattr(stable_diffusion, "load", no_load)
    extra = [e.replace("{model}", str(model)) for e in extra]
    with pytest.raises(SystemExit) as info:
        sd_methods.main(["--model", str(model), "--prompts", str(prompts),
                         "--out", str(tmp_path / "o"), *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_sd_methods_locks_its_folder_and_refuses_another_comparison(
    model, tmp_path, monkeypatch, capsys
):
    """Two comparisons never share --out (their grids would mix): a folder holding other
    settings is refused before the model loads, as is one another run holds; the same
    settings run again."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "o"
    base = ["--model", str(model), "--prompts", str(prompts), "--n", "2", "--steps", "2",
            "--methods", "none,cads", "--out", str(out), "--quiet"]  # fmt: skip
    assert sd_methods.main(base) == 0
    assert sd_methods.main(base) == 0
    assert not (out / ".run.lock").exists()
    # the CFG rescale reaches the rows through the one CFG term they share (its own folder),
    # and interval guidance's own CFG: over every noise level it is the rescaled CFG row
    rescaled = tmp_path / "r"
    assert sd_methods.main([*base, "--guidance-rescale", "0.7", "--out", str(rescaled),
                            "--methods", "none,interval", "--interval-lo", "0",
                            "--interval-hi", "inf"]) == 0  # fmt: skip
    a, b = (json.loads((o / "results.json").read_text())["prompts"][0]["methods"]
            for o in (out, rescaled))  # fmt: skip
    assert a["none"]["latent_mean_distance"] != b["none"]["latent_mean_distance"]
    assert b["interval"]["latent_mean_distance"] == pytest.approx(
        b["none"]["latent_mean_distance"], rel=1e-5)
    monkeypatch.setattr(stable_diffusion, "load", no_load)
    for extra, diff in ((["--steps", "3"], "steps: 2 -> 3"),
                        (["--guidance-rescale", "0.7"], "guidance_rescale: None -> 0.7"),
                        (["--methods", "none,interval"], "methods: ['none', 'cads'] -> "
                                                         "['none', 'interval']"),
                        (["--cads-noise-scale", "0.1"], "--cads-noise-scale: None -> 0.1")):
        with pytest.raises(SystemExit):
            sd_methods.main(base + extra)
        err = capsys.readouterr().err
        assert f"holds a comparison with different settings ({diff})" in err, err
    # values, not their spelling: 0.250 is the 0.25 the first run wrote down
    monkeypatch.undo()
    spelled = [*base, "--cads-noise-scale", "0.25", "--out", str(tmp_path / "s")]
    assert sd_methods.main(spelled) == 0
    monkeypatch.setattr(stable_diffusion, "load", no_load)
    results = tmp_path / "s" / "results.json"
    assert json.loads(results.read_text())["settings"]["knob_flags"] == {
        "--cads-noise-scale": 0.25}
    assert sd_methods.main([*spelled, "--cads-noise-scale", "0.250"]) == 0
    # a file from before values were recorded (the flag's text) reads the same
    data = json.loads(results.read_text())
    data["settings"]["knob_flags"] = {"--cads-noise-scale": "0.25"}
    results.write_text(json.dumps(data))
    assert sd_methods.main([*spelled, "--cads-noise-scale", "0.250"]) == 0
    with run_folder.FolderLock(out):
        with pytest.raises(SystemExit):
            sd_methods.main(base)
    assert "is in use by another run" in capsys.readouterr().err


# -- experiments.generate --method --------------------------------------------------------

# method -> (its flags, a changed knob that must be refused on resume). The resume and
# refusal machinery is one code path for every method: one uncoupled method, two coupled
# ones (one with a required knob) and TPSO's null pool; cads, interval and gass run
# through the same generate.method_term in test_sd_methods_runs_every_method_end_to_end
METHOD_RUNS = {
    "none": ([], ["--method", "cads"]),
    "spell": ([], ["--spell-overcompensation", "1.5"]),
    "particle": (["--pg-strength", "100"], ["--pg-strength", "50"]),
    "tpso": (["--tpso-projection", "{proj}", "--tpso-null-pool", "3", "--tpso-ratio", "0.5"],
             ["--tpso-kappa", "0.7"]),
}


def gen_argv(model, out, method, flags, proj):
    flags = [f.replace("{proj}", str(proj)) for f in flags]
    return ["--model", str(model), "--prompt", "a cat", "--steps", str(STEPS), "--cfg", CFG,
            "--n", str(N), "--out", str(out), "--method", method, *flags]  # fmt: skip


def pngs(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "images").glob("*.png"))}


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_generate_method_records_knobs_resumes_and_refuses_others(
    model, projection, tmp_path, monkeypatch, capsys, method
):
    flags, changed = METHOD_RUNS[method]
    out = tmp_path / method
    argv = gen_argv(model, out, method, flags, projection)
    assert generate.main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    knobs = meta["settings"]["method_knobs"]
    assert meta["settings"]["method"] == method
    if method in ("none", "spell"):  # the paper defaults
        assert knobs == generate.method_knobs(method, {}, str(model))
    if method == "spell":
        assert meta["method_resolved"]["spell_radius"]["0"] > 0
    if method == "tpso":
        assert knobs["projection"] == str(projection.resolve())
    assert meta["method"]["coupling"].startswith(
        "per batch" if method in generate.COUPLED else "none"
    )
    first = pngs(out)
    assert len(first) == N

    # the same command: nothing to do, the model is not even loaded
    monkeypatch.setattr(stable_diffusion, "load", no_load)
    monkeypatch.setattr(generate, "_LOADED", dict(generate._LOADED))
    assert generate.main(argv) == 0
    assert "already in" in capsys.readouterr().out and pngs(out) == first
    again = json.loads((out / "metadata.json").read_text())  # this run's counters
    assert (again["generated_this_run"], again["skipped_this_run"]) == (0, N)
    assert (meta["generated_this_run"], meta["skipped_this_run"]) == (N, 0)

    # another value of a knob: refused, nothing touched
    with pytest.raises(SystemExit) as info:
        generate.main(argv + changed)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "holds a run with different settings" in err, err
    assert pngs(out) == first

    pool_file = out / "tpso_null_pool.npz"
    assert pool_file.is_file() == (method == "tpso")
    if method == "tpso":  # the negative branch's pool: the public code's blank prompts
        with np.load(pool_file) as f:
            assert f["hidden"].shape[0] == 3 and int(f["steps"]) >= 1
            # moved away from the blank prompt, toward the band (0.8 +- 0.01)
            assert (f["cosine"] < 1 - 1e-3).all() and (f["cosine"] > 0.5).all()
        pool_made = pool_file.stat().st_mtime_ns
        # a TPSO folder from before --tpso-null-pool used the plain null: it resumes as none
        meta_file = out / "metadata.json"
        saved = meta_file.read_bytes()
        legacy = json.loads(saved)
        del legacy["settings"]["method_knobs"]["null_pool"]
        meta_file.write_text(json.dumps(legacy))
        with pytest.raises(SystemExit):
            generate.main(argv)
        assert "'null_pool': 'none'" in capsys.readouterr().err
        none_argv = [a if a != "3" or argv[i - 1] != "--tpso-null-pool" else "none"
                     for i, a in enumerate(argv)]  # fmt: skip
        assert generate.main(none_argv) == 0 and "already in" in capsys.readouterr().out
        meta_file.write_bytes(saved)

    if method == "particle":  # a folder from before --pg-time-scaling: the paper's form
        assert knobs == {"strength": 100.0, "time_scaling": "score", "min_noise_level": "none"}
        meta_file = out / "metadata.json"
        saved = meta_file.read_bytes()
        legacy = json.loads(saved)
        for knob in ("time_scaling", "min_noise_level"):
            del legacy["settings"]["method_knobs"][knob]
        meta_file.write_text(json.dumps(legacy))
        assert generate.main(argv) == 0 and "already in" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            generate.main(argv + ["--pg-time-scaling", "eps"])
        assert "'time_scaling': 'score'" in capsys.readouterr().err
        meta_file.write_bytes(saved)

    if method in generate.COUPLED:  # a batch with a missing image is generated whole, again
        monkeypatch.undo()
        (out / "images" / generate.image_name(0, 1)).unlink()
        before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
        assert generate.main(argv) == 0
        assert pngs(out) == first  # deterministic: the same bytes
        after = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
        assert all(after[k] != before[k] for k in before)  # rewritten with its batch
        if method == "tpso":  # the pool was reused, not optimised again
            assert pool_file.stat().st_mtime_ns == pool_made


def test_generate_folder_from_before_method_resumes(model, projection, tmp_path, monkeypatch):
    out = tmp_path / "legacy"
    argv = gen_argv(model, out, "none", [], projection)
    assert generate.main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    for key in ("method", "method_knobs"):
        del meta["settings"][key]
    (out / "metadata.json").write_text(json.dumps(meta))
    monkeypatch.setattr(stable_diffusion, "load", no_load)
    assert generate.main(argv) == 0  # --method none: the same settings


BAD_KNOBS = {
    "foreign-flag": (["--method", "spell", "--pg-strength", "1"],
                     "--pg-strength applies to --method particle only, not to --method spell"),
    "pg-missing": (["--method", "particle"], "--method particle needs --pg-strength"),
    "pg-scaling": (["--method", "particle", "--pg-strength", "1", "--pg-time-scaling", "sigma"],
                   "--pg-time-scaling must be one of score, eps, x0, got 'sigma'"),
    "pg-level": (["--method", "particle", "--pg-strength", "1", "--pg-min-noise-level", "-1"],
                 "--pg-min-noise-level must be >= 0 (or 'none'), got -1"),
    "pg-batch": (["--method", "particle", "--pg-strength", "1", "--batch-size", "2"],
                 "needs --batch-size >= 3"),
    "spell-batch": (["--method", "spell", "--batch-size", "1"], "needs --batch-size >= 2"),
    # no --batch-size given: it is min(n, 4), so --n is the flag to raise
    "spell-n": (["--method", "spell", "--n", "1"], "needs --n >= 2, got 1"),
    "radius-text": (["--method", "spell", "--spell-radius", "big"],
                    "--spell-radius must be a number, got 'big'"),
    "radius-zero": (["--method", "spell", "--spell-radius", "0"],
                    "--spell-radius must be > 0 (or 'auto'), got 0"),
    "lambda-nan": (["--method", "spell", "--spell-overcompensation", "nan"],
                   "--spell-overcompensation must be a finite number"),
    "cads-taus": (["--method", "cads", "--cads-tau1", "0.9", "--cads-tau2", "0.5"],
                  "need --cads-tau1 < --cads-tau2"),
    "cads-psi": (["--method", "cads", "--cads-psi", "2"], "--cads-psi must be in [0, 1], got 2"),
    "interval": (["--method", "interval", "--interval-lo", "3", "--interval-hi", "1"],
                 "need --interval-lo < --interval-hi"),
    "gass-iters": (["--method", "gass", "--gass-max-iters", "0", "--clip-projection", "{proj}"],
                   "--gass-max-iters must be an integer >= 1, got 0"),
    "gass-no-projection": (["--method", "gass"], "--method gass needs --clip-projection PATH"),
    "tpso-no-projection": (["--method", "tpso"], "--method tpso needs --tpso-projection PATH"),
    "tpso-pooled-option": (["--method", "tpso"], "text_projection, or --tpso-projection none "
                           "to measure cosines on the pooled output\n"),
    "tpso-bad-folder": (["--method", "tpso", "--tpso-projection", "/nonexistent"],
                        "is not a CLIP text model folder"),
    "tpso-kappa": (["--method", "tpso", "--tpso-kappa", "1", "--tpso-projection", "none"],
                   "--tpso-kappa must be in (-1, 1)"),
    "tpso-pool": (["--method", "tpso", "--tpso-projection", "none", "--tpso-null-pool", "2",
                   "--batch-size", "3"], "--tpso-null-pool 2 is smaller than --batch-size 3"),
    "tpso-pool-text": (["--method", "tpso", "--tpso-projection", "none", "--tpso-null-pool",
                        "many"], "--tpso-null-pool must be an integer >= 1 (or 'none')"),
    "rescale-range": (["--guidance-rescale", "nan"], "--guidance-rescale must be in [0, 1]"),
    "rescale-cfg1": (["--guidance-rescale", "0.7", "--cfg", "1"],
                     "--guidance-rescale has no effect with --cfg 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_KNOBS))
def test_bad_knobs_fail_before_the_model_loads(
    model, projection, tmp_path, monkeypatch, capsys, case
):
    extra, message = BAD_KNOBS[case]
    extra = [e.replace("{proj}", str(projection)) for e in extra]
    monkeypatch.setattr(stable_diffusion, "load", no_load)
    out = tmp_path / "never"
    argv = ["--model", str(model), "--prompt", "a cat", "--n", "4", "--out", str(out), *extra]
    with pytest.raises(SystemExit) as info:
        generate.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_gass_needs_an_image_encoder_in_the_folder(tmp_path, projection):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="needs a CLIP image encoder"):
        generate.method_knobs("gass", {"--clip-projection": str(projection)}, str(tmp_path))
    assert np.isinf(float(generate.method_knobs(
        "interval", {"--interval-hi": "inf"}, str(tmp_path))["sigma_hi"]))  # fmt: skip


def test_generate_image_encoder_flag_reaches_the_loader_and_the_settings(
    model, projection, tmp_path, monkeypatch
):
    """``--image-encoder`` gives GASS an image encoder the model folder lacks (released
    SD3 folders): it reaches the loader (and is one of the run's settings)."""
    import shutil

    bare = tmp_path / "no_encoder"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("image_encoder"))
    argv = ["--model", str(bare), "--prompt", "a cat", "--n", "2", "--out", str(tmp_path / "o"),
            "--method", "gass", "--clip-projection", str(projection)]  # fmt: skip
    with pytest.raises(SystemExit):  # no encoder anywhere: refused before the load
        generate.parse_args(argv)
    args = generate.parse_args([*argv, "--image-encoder", str(model / "image_encoder")])
    assert args.image_encoder == str((model / "image_encoder").resolve())
    seen = {}

    def loaded(*a, **k):
        seen.update(k)
        raise ValueError("stop here")

    monkeypatch.setattr(stable_diffusion, "load", loaded)
    monkeypatch.setattr(generate, "_LOADED", {})
    with pytest.raises(generate.RunError, match="stop here"):
        generate.run(args)
    assert seen["image_encoder"] == args.image_encoder
    assert not (tmp_path / "o" / "metadata.json").exists()  # nothing written before the load


def test_interval_outside_the_models_noise_levels_is_refused_before_any_image(
    model, tmp_path, capsys
):
    """EDM-style bounds (sigma up to 80) on SD's VP process, whose noise levels end at
    sqrt((1 - abar) / abar) at t = 999 (the tiny model's config: SD's betas): the term
    would never act, so the run stops with one line and writes nothing."""
    cfg = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    betas = np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)[-1]
    top = float(np.sqrt((1 - abar) / abar))
    out = tmp_path / "o"
    argv = ["--model", str(model), "--prompt", "a cat", "--n", "2", "--steps", "2",
            "--out", str(out), "--method", "interval", "--interval-lo", f"{top * 1.01:g}",
            "--interval-hi", "80"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        generate.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m experiments.generate: error: --method interval: ")
    assert f"lies outside the noise levels of the sampler's process, [0, {top:.4g}]" in err[0]
    assert not (out / "images").exists() and not (out / "metadata.json").exists()


def test_generate_hands_interval_guidance_the_cfg_rescale(model, tmp_path, monkeypatch):
    """`generate --method interval --guidance-rescale 0.7` gives the rescale to the method's
    term (`generate.method_term`, whose interval guidance with the rescale is checked against
    CFG with `guidance_rescale` in test_sd_methods.py)."""
    seen, original = [], generate.method_term

    def spy(*args, **kw):
        seen.append(kw.get("rescale"))
        return original(*args, **kw)

    monkeypatch.setattr(generate, "method_term", spy)
    assert generate.main(["--model", str(model), "--prompt", "a cat", "--n", "1", "--steps",
                          "2", "--out", str(tmp_path / "o"), "--method", "interval",
                          "--guidance-rescale", "0.7", "--quiet"]) == 0  # fmt: skip
    assert seen == [0.7]


def test_cli_and_pipe_generate_give_the_same_images_for_the_same_seed(model, tmp_path, capsys):
    """`generate --seed S` and pipe.generate(key=jax.random.key(S)) share the noise of each
    image and the sampler's key (pipelines.generation.image_noise / sampling_key), so a
    stochastic sampler gives the same PNGs; and pipe.generate's image i does not depend
    on n (the CLI's per-image noise). Both with the CFG rescale: `--guidance-rescale`
    reaches the images as `guidance_rescale=` does (recorded in metadata.json)."""
    import jax
    from PIL import Image

    from jaxdiv.pipelines.generation import image_noise

    flags = ["--sampler", "ddim", "--eta", "0.7"]  # stochastic: the sampler's key matters
    out = tmp_path / "o"
    base = ["--model", str(model), "--prompt", "a cat", "--n", "3", "--batch-size", "3",
            "--steps", "3", "--seed", "7", "--out", str(out), "--cfg", CFG, *flags]  # fmt: skip
    assert generate.main([*base, "--guidance-rescale", "0.7"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["settings"]["guidance_rescale"] == 0.7
    pngs = np.stack([np.asarray(Image.open(out / "images" / generate.image_name(0, i)))
                     for i in range(3)])  # fmt: skip
    pipe = generate.load_pipeline(str(model))  # the CLI's (stable_diffusion.load's) pipeline
    s = pipe.ddim(3, eta=0.7)
    kw = dict(key=jax.random.key(7), sampler=s, cfg=float(CFG))
    g = pipe.generate("a cat", 3, guidance_rescale=0.7, **kw)
    np.testing.assert_array_equal(generation.to_uint8(g.images), pngs)
    plain = generation.to_uint8(pipe.generate("a cat", 3, **kw).images)
    # the rescale shows in the PNGs: the run without it differs (by one 8-bit level at most
    # on this tiny random model, whose CFG barely changes the predictions' spread)
    assert (plain != pngs).any()
    # another phi, or none, is another folder's run: refused before the model loads
    for extra, diff in ((["--guidance-rescale", "0.3"], "guidance_rescale: 0.7 -> 0.3"),
                        ([], "guidance_rescale: 0.7 -> None")):
        with pytest.raises(SystemExit) as info:
            generate.main([*base, *extra])
        assert info.value.code == 2 and diff in capsys.readouterr().err
    # the noise of image i is the same whatever n, and the same for every prompt
    five = image_noise(jax.random.key(7), 5, pipe.noise_shape(1)[1:])
    two = pipe.generate(["a cat", "a dog"], 2, key=jax.random.key(7), sampler=s,
                        cfg=float(CFG), trace=True)  # fmt: skip
    np.testing.assert_array_equal(two.output.trace.x[0], np.concatenate([five[:2], five[:2]]))


def test_tpso_ratio_scheduling_no_step_is_refused_before_any_image(model, tmp_path, capsys):
    """--tpso-ratio 0.4 on 2 steps: int(0.4 * 2) = 0 steps use the optimised prompts, so
    TPSO would be plain CFG; refused in one line before the folder is written."""
    out = tmp_path / "o"
    argv = ["--model", str(model), "--prompt", "a cat", "--n", "2", "--steps", "2",
            "--out", str(out), "--method", "tpso", "--tpso-projection", "none"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        generate.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m experiments.generate: error: --method tpso: guidance "
                             "term 'tpso': ratio=0.4 schedules int(|ratio| * N) = 0 of the "
                             "sampler's 2 steps")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())


def test_pg_public_sd_code_knobs_build_that_term(model):
    """``--pg-time-scaling eps --pg-min-noise-level 1`` is ``particle(s,
    time_scaling="eps", min_noise_level=1.0)`` (PG's public SD code); the defaults the
    paper's form, always on."""
    from jaxdiv import guidance

    cond = jnp.zeros((3, 2, 4))
    for flags, want in [
        ({"--pg-time-scaling": "eps", "--pg-min-noise-level": "1"},
         guidance.particle(2.0, time_scaling="eps", min_noise_level=1.0)),
        ({}, guidance.particle(2.0)),
    ]:  # fmt: skip
        knobs = generate.method_knobs("particle", {"--pg-strength": "2", **flags}, str(model))
        term, _ = generate.method_term(None, "particle", knobs, cfg=1.0, null=None, cond=cond,
                                       prompt="a cat", key=None)  # fmt: skip
        assert jax.tree.structure(term) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(term), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_interval_rule_builds_that_term_and_older_folders_resume_per_evaluation(model, tmp_path):
    """``--interval-rule step`` is ``interval(..., per_step=True)`` (EDM2's official code);
    the default the paper's per-evaluation rule, which a folder from before the flag ran
    (it resumes as that, and refuses ``step``)."""
    from jaxdiv import guidance

    null = jnp.zeros((1, 2, 4))
    for flags, per_step in [({"--interval-rule": "step"}, True), ({}, False)]:
        knobs = generate.method_knobs("interval", flags, str(model))
        term, _ = generate.method_term(None, "interval", knobs, cfg=2.0, null=null, cond=null,
                                       prompt="a cat", key=None)  # fmt: skip
        want = guidance.interval(2.0, 0.28, 5.42, null_cond=null, per_step=per_step)
        assert jax.tree.structure(term) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(term), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="--interval-rule must be one of evaluation, step, "
                                         "got 'steps'"):  # fmt: skip
        generate.method_knobs("interval", {"--interval-rule": "steps"}, str(model))
    settings = {k: None for k in generate._RUN_KEYS}
    settings.update(method="interval", method_knobs=generate.method_knobs("interval", {},
                                                                          str(model)))
    legacy = {**settings, "method_knobs": {"sigma_lo": 0.28, "sigma_hi": 5.42}}
    (tmp_path / "metadata.json").write_text(json.dumps({"settings": legacy}))
    assert generate.check_existing(tmp_path, settings) is not None
    step = {**settings, "method_knobs": {**settings["method_knobs"], "rule": "step"}}
    with pytest.raises(generate.RunError, match="'rule': 'evaluation'"):
        generate.check_existing(tmp_path, step)


def test_sd_methods_model_folder_problems_are_one_line(model, tmp_path, capsys):
    """A folder that is not a pipeline, or one missing a component, is refused in one line
    (exit 2) as ``generate`` refuses it, not with the loader's traceback."""
    import shutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    partial = tmp_path / "no_vae"
    shutil.copytree(model, partial)
    shutil.rmtree(partial / "vae")
    for folder, message in [(tmp_path / "nope", "does not exist"), (partial, "vae")]:
        with pytest.raises(SystemExit) as info:
            sd_methods.main(["--model", str(folder), "--prompts", str(prompts), "--methods",
                             "none", "--out", str(tmp_path / f"o_{folder.name}")])  # fmt: skip
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    # nor is a folder of something else (the model's own) taken as --out
    before = sorted(p.name for p in Path(model).iterdir())
    with pytest.raises(SystemExit) as info:
        sd_methods.main(["--model", str(model), "--prompts", str(prompts), "--methods", "none",
                         "--out", str(model)])  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and "holds files that sd-methods did not write" in err, err
    assert sorted(p.name for p in Path(model).iterdir()) == before
