"""SD3 beyond parity: precomputed prompt embeddings, diversity terms on the SD3 condition,
and ``experiments.generate`` on an SD3 folder (tiny random pipeline, ``jaxdiv.testing``).

Parity with diffusers is ``tests/test_pipeline_sd3.py``; here the checks are what a
researcher relies on when running SD3 through jaxdiv's own entry points.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reuse_loaded
from safetensors.numpy import save_file

import jaxdiv
from experiments import generate
from jaxdiv import guidance
from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.pipelines import stable_diffusion_3 as sd3
from jaxdiv.testing import example_sd3_pipeline


@pytest.fixture(scope="module")
def pipe():
    return example_sd3_pipeline()


def _sample(pipe, cond, noise, steps=3, g=None):
    g = guidance.cfg(4.0, null_cond=pipe.null_cond) if g is None else g
    return jaxdiv.sample(pipe.flow_euler(steps), pipe.denoiser, noise, key=jax.random.key(1),
                         cond=cond, guidance=g).x0  # fmt: skip


def test_precomputed_embeddings_run_without_t5(pipe, tmp_path):
    """Encode with T5, save, then sample from the file with a pipeline that never loaded
    T5: the same images as the full pipeline (the workflow for a machine without room for
    T5's weights)."""
    cond = pipe.encode_prompt(pipe.tokenize(["a cat", "a dog"]))
    path = tmp_path / "cats.safetensors"
    sd3.save_prompt_embeds(path, cond)
    light = sd3.load(pipe.path, t5=False)
    assert not light.has_t5 and light.tokenize(["a cat"]).t5 is None
    loaded = sd3.load_prompt_embeds(path, light)
    np.testing.assert_array_equal(loaded.prompt_embeds, cond.prompt_embeds)
    noise = jax.random.normal(jax.random.key(0), pipe.noise_shape(2))
    # the null branch differs between the two (T5 of "" vs zeros): use the full one's
    g = guidance.cfg(4.0, null_cond=pipe.null_cond)
    np.testing.assert_allclose(_sample(light, loaded, noise, g=g), _sample(pipe, cond, noise),
                               rtol=0, atol=1e-6)  # fmt: skip
    # without T5 the sequence tail is zeros, as diffusers' text_encoder_3=None
    own = light.encode_prompt(light.tokenize(["a cat"]))
    assert float(jnp.abs(own.prompt_embeds[:, light.max_length :]).max()) == 0.0
    assert float(jnp.abs(cond.prompt_embeds[:, pipe.max_length :]).max()) > 0.0


def test_bad_embedding_files_are_refused(pipe, tmp_path):
    good = {"prompt_embeds": np.ones((1, 5, 20), np.float32),
            "pooled": np.ones((1, 12), np.float32)}
    cases = {
        "missing": ({"prompt_embeds": good["prompt_embeds"]}, "lacks tensor(s) ['pooled']"),
        "nan": (dict(good, pooled=np.full((1, 12), np.nan, np.float32)), "12 non-finite"),
        "width": (dict(good, pooled=np.ones((1, 7), np.float32)), "width 7, the pipeline's"),
        "batch": (dict(good, pooled=np.ones((2, 12), np.float32)), "batch of prompt_embeds 1"),
        "dtype": (dict(good, pooled=np.ones((1, 12), np.int32)), "dtype int32"),
    }
    for name, (arrays, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(arrays, str(path))
        with pytest.raises(CheckpointError, match=re.escape(message)):
            sd3.load_prompt_embeds(path, pipe)
    with pytest.raises(CheckpointError, match="does not exist"):
        sd3.load_prompt_embeds(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        sd3.load_prompt_embeds(tmp_path / "junk.safetensors")


def test_diversity_terms_act_on_the_sd3_condition(pipe):
    """The SD3 condition is a pytree: CADS anneals both leaves, SPELL repels the latents,
    and both keep the one-compile rule for a new strength."""
    noise = jax.random.normal(jax.random.key(0), pipe.noise_shape(3))
    noise = noise.at[1].set(noise[0] + 1e-3 * noise[1])  # two near-duplicates
    cond = pipe.encode_prompt(pipe.tokenize(["a cat"] * 3))
    cfg = guidance.cfg(4.0, null_cond=pipe.null_cond)
    base = _sample(pipe, cond, noise, 4, cfg)
    d = lambda x: float(jnp.linalg.norm((x[0] - x[1]).ravel()))  # noqa: E731
    r = 2.0 * d(base)
    spelled = _sample(pipe, cond, noise, 4, guidance.chain(cfg, guidance.spell(r)))
    # the guarantee on a clean-endpoint sampler: the pair ends >= r apart
    assert d(spelled) >= r * (1 - 1e-4) > d(base)
    before = jaxdiv.compile_count()
    a = _sample(pipe, cond, noise, 4, guidance.chain(guidance.cads(noise_scale=0.5), cfg))
    b = _sample(pipe, cond, noise, 4, guidance.chain(guidance.cads(noise_scale=0.0), cfg))
    assert jaxdiv.compile_count() - before == 1
    assert float(jnp.abs(a - base).max()) > 1e-3 * float(jnp.abs(base).max())
    np.testing.assert_allclose(b, base, rtol=0, atol=1e-5 * float(jnp.abs(base).max()))


# -- experiments.generate on an SD3 folder ----------------------------------------------------


@pytest.mark.parametrize("method", [["spell", "--spell-radius", "5", "--sampler", "flow_heun"],
                                    ["contextual", "--contextual-eta", "50",
                                     "--contextual-inner-steps", "10", "--contextual-tau", "1"],
                                    ["tpso", "--tpso-max-steps", "4", "--tpso-null-pool", "2",
                                     "--tpso-ratio", "0.5"]])
def test_generate_runs_an_sd3_folder_and_resumes(pipe, tmp_path, monkeypatch, method):
    reuse_loaded(monkeypatch, pipe)
    out = tmp_path / "run"
    argv = ["--model", pipe.path, "--prompt", "a cat", "--n", "2", "--steps", "2", "--cfg", "3",
            "--method", *method, "--out", str(out)]  # fmt: skip
    assert generate.main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    if method[0] == "contextual":
        assert meta["settings"]["method_knobs"] == {"eta": 50.0, "inner_steps": 10, "tau": 1}
    if method[0] == "tpso":  # the public SD3.5 lambda; each CLIP encoder's own projection
        assert meta["settings"]["method_knobs"] == {
            "ratio": 0.5, "kappa": 0.8, "diversity_weight": 10.0, "max_steps": 4,
            "projection": "text_encoder", "null_pool": 2}  # fmt: skip
        with np.load(out / "tpso_null_pool.npz") as f:  # one pool per CLIP encoder
            assert f["clip_l.hidden"].shape[0] == f["clip_g.hidden"].shape[0] == 2
    heun = "flow_heun" in method  # diffusers' FlowMatchHeunDiscreteScheduler: 2N - 1 calls
    assert meta["settings"]["sampler"] == ("flow_heun" if heun else "flow_euler")
    assert meta["pipeline"]["prediction_type"] == "flow"
    assert meta["sampler"]["nfe"] == (3 if heun else 2)
    assert meta["pipeline"]["latent_shape"][0] == 16
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 2
    first = [p.read_bytes() for p in pngs]
    pngs[1].unlink()  # a coupled batch is regenerated whole, byte for byte
    assert generate.main(argv) == 0
    assert [p.read_bytes() for p in sorted((out / "images").glob("*.png"))] == first


def test_tpso_null_pool_file_keeps_both_encoders(pipe, tmp_path):
    """``generate.tpso_null_pool`` on SD3: the public SD3.5 pool (each encoder's own
    projection, lambda 0 whatever the conditional lambda) saved with both encoders' results
    and read back bit for bit; other knobs rebuild it."""
    from jaxdiv.pipelines import tpso

    knobs = generate.method_knobs("tpso", {"--tpso-max-steps": "3", "--tpso-null-pool": "2"},
                                  pipe.path)  # fmt: skip
    key, path = jax.random.key(5), tmp_path / "pool.npz"
    built = generate.tpso_null_pool(pipe, knobs, key, path)
    stamp = path.stat().st_mtime_ns
    loaded = generate.tpso_null_pool(pipe, knobs, key, path)
    assert path.stat().st_mtime_ns == stamp  # read, not rebuilt
    direct = tpso.tpso_null_pool(pipe, key, size=2)  # SD3.5 protocol: lambda 0
    for a, b, c in zip(jax.tree.leaves(built), jax.tree.leaves(loaded), jax.tree.leaves(direct),
                       strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert type(loaded).__name__ == "SD3TPSOResult"
    generate.tpso_null_pool(pipe, {**knobs, "kappa": 0.7}, key, path)
    assert path.stat().st_mtime_ns != stamp


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sampler", "ddim"], "--sampler ddim does not apply to SD3"),
        (["--method", "tpso", "--tpso-projection", "none"],
         "--tpso-projection applies to SD 1.x/2.x folders"),
        (["--method", "tpso", "--clip-projection", "."],
         "--clip-projection applies to SD 1.x/2.x folders"),
        (["--method", "contextual"], "--method contextual needs --contextual-eta"),
        (["--method", "contextual", "--contextual-eta", "5", "--contextual-tau", "0"],
         "--contextual-tau must be an integer >= 1"),
        (["--width", "18"], "--width must be a positive multiple of 4, got 18 (the multiple "
                            "comes from this model's MMDiT and VAE configs)"),
    ],
)
def test_generate_refuses_what_sd3_cannot_run(pipe, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        generate.main(["--model", pipe.path, "--prompt", "a cat", "--out", str(tmp_path / "o"),
                       *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err, err


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "flow_euler"], "does not apply to SD 1.x/2.x folders"),
    (["--method", "contextual", "--contextual-eta", "5"],
     "--method contextual runs on SD3 / SD3.5 folders only"),
])  # fmt: skip
def test_generate_refuses_what_an_sd_folder_cannot_run(tmp_path, capsys, extra, message):
    folder = Path(tmp_path / "sd")
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(SystemExit) as info:
        generate.main(["--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "o"),
                       *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err, err


def test_omitted_static_keywords_do_not_recompile(pipe):
    """``encode_prompt(t)`` and ``encode_prompt(t, clip_skip=None)`` share one program (jit
    keys on the keywords as passed; T5-XXL would otherwise compile twice per batch size)."""
    from jaxdiv.pipelines.stable_diffusion import _jitted

    jitted = _jitted(pipe.encode_prompt.apply, pipe.encode_prompt.static_argnames)
    tokens = pipe.tokenize([""])  # the shape load() already compiled for the null embedding
    before = jitted._cache_size()
    a = pipe.encode_prompt(tokens)
    b = pipe.encode_prompt(tokens, clip_skip=None)
    assert jitted._cache_size() == before
    np.testing.assert_array_equal(a.prompt_embeds, b.prompt_embeds)


def test_sd_methods_runs_an_sd3_folder_with_contextual_repulsion(pipe, tmp_path, monkeypatch):
    """``experiments.sd_methods`` on an SD3 folder with a CLIP vision tower given by
    ``--image-encoder`` of CLIP-L's projection width: flow Euler, contextual repulsion and
    TPSO (both CLIP encoders) in the table, every metric finite (SPP and CLIP score on
    CLIP-L's own projected text embedding). GASS is left out: the tiny CLIP-L's 5-wide
    embedding leaves 4 directions, fewer than the CLI's 10."""
    import math

    import transformers

    from experiments import sd_methods
    from jaxdiv.testing import TINY_VISION

    vision = tmp_path / "vision"
    width = pipe.configs["text_encoder"]["projection_dim"]  # CLIP-L's text_embeds
    config = transformers.CLIPVisionConfig(**dict(TINY_VISION, projection_dim=width))
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(vision)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    argv = ["--model", pipe.path, "--prompts", str(prompts), "--n", "3", "--steps", "2",
            "--cfg", "3", "--out", str(out), "--image-encoder", str(vision),
            "--contextual-eta", "50", "--contextual-inner-steps", "10",
            "--contextual-tau", "1", "--tpso-max-steps", "3", "--tpso-null-pool", "3",
            "--tpso-ratio", "0.5",
            "--methods", "none,spell,tpso,contextual"]  # fmt: skip
    assert sd_methods.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["pipeline"] == "sd3" and res["settings"]["sampler"] == "flow_euler"
    assert res["skipped"] == {}
    # SPELL and CADS on the SD3 condition: test_diversity_terms_act_on_the_sd3_condition;
    # PG and interval guidance are the generic terms of tests/test_sd_methods.py. Here: the
    # flow sampler, the SD3 condition per prompt, the model term, the metrics on SD3
    assert list(res["methods"]) == ["none", "spell", "tpso", "contextual"]
    assert res["methods"]["tpso"]["knobs"]["diversity_weight"] == 10.0  # SD3.5's lambda
    assert res["methods"]["contextual"]["knobs"] == {"eta": 50.0, "inner_steps": 10, "tau": 1}
    (row,) = res["prompts"]
    for method, values in row["methods"].items():
        for name in ("vendi", "mss", "spp", "clip_score", "latent_mean_distance"):
            assert isinstance(values[name], float) and math.isfinite(values[name]), (method, name)
        assert 1 - 1e-4 <= values["vendi"] <= 3 + 1e-4 and 0 <= values["clip_score"] <= 100
    assert res["metric_notes"]["null"] is None
    # contextual repulsion changed the images (same noise and key as the unguided row)
    none, ctx = row["methods"]["none"], row["methods"]["contextual"]
    assert ctx["latent_mean_distance"] != none["latent_mean_distance"]


def test_truncated_prompts_names_each_encoder_and_what_it_drops(pipe):
    """A prompt longer than an encoder reads is reported per encoder (CLIP-L, CLIP-G, T5)
    with its full token count; what tokenization keeps is its first kept - 1 tokens and
    EOS, so the rest never reaches the model. The CLI logs it in one line per encoder."""
    from jaxdiv.models.clip.tokenizer import tokenize
    from jaxdiv.pipelines.generation import truncated_prompts

    long = "a cat on a mat " * 40
    cut = truncated_prompts(pipe, ["a cat", long])
    assert [c[1] for c in cut] == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    limits = (pipe.max_length, pipe.max_length, pipe.max_sequence_length)
    for (j, _, tokens, kept), tok, limit in zip(cut, pipe.tokenizers, limits, strict=True):
        full = tok(long).input_ids
        assert j == 1 and kept == limit and tokens == len(full) > limit
        ids = tokenize(tok, [long], max_length=limit)[0].tolist()
        assert ids[:-1] == full[: limit - 1] and ids[-1] == full[-1]  # EOS kept
    lines = []
    generate.log_truncated(pipe, ["a cat"], negative_prompt=long, say=lines.append)
    assert len(lines) == 3 and all(line.startswith("the negative prompt has ") for line in lines)
