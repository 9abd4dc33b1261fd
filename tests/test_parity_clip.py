"""Parity of the Flax CLIP ports with transformers' PyTorch CLIP on tiny random models.

Each model is built at random by transformers, saved with ``save_pretrained`` (safetensors)
into a temp folder, loaded through ``jaxdiv.models.clip`` and compared output by output.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.clip import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    clip_image_preprocess,
    load_clip_text,
    load_clip_tokenizer,
    load_clip_vision,
    tokenize,
)
from jaxdiv.testing import TINY_TEXT, TINY_VISION

VOCAB = 64
SEQ = 12
EOS = VOCAB - 1  # largest id, as in the real CLIP vocabulary
PAD = 1
FP32_ATOL = 1e-4

# SD1-like: quick_gelu and the legacy eos_token_id=2 config (pooling by argmax of the ids,
# as runwayml/stable-diffusion-v1-5's text_encoder/config.json); SD2-like: gelu and the
# corrected eos_token_id (pooling at the first EOS).
TEXT_CONFIGS = {
    "sd1": dict(hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=PAD),
    "sd2": dict(hidden_act="gelu", eos_token_id=EOS, bos_token_id=0, pad_token_id=PAD),
}
VISION_ACTS = {"sd1": "quick_gelu", "sd2": "gelu"}


# the pipeline's tiny towers, one block deeper (4 hidden states to compare) and with a
# projection width (24) equal to no other width
TOWER = dict(num_hidden_layers=3, projection_dim=24)


def text_config(kind):
    return transformers.CLIPTextConfig(
        **dict(TINY_TEXT, vocab_size=VOCAB, layer_norm_eps=1e-5, **TOWER, **TEXT_CONFIGS[kind])
    )


def vision_config(kind):
    return transformers.CLIPVisionConfig(
        **dict(TINY_VISION, num_channels=3, hidden_act=VISION_ACTS[kind], **TOWER)
    )


def randomise_norms(model, seed):
    # transformers initialises LayerNorms to (1, 0); perturb them so weight->scale and bias
    # are exercised by the comparison.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    return model


def make_ids(seed, batch=3):
    """BOS, random words, EOS at varying positions, then padding with EOS like SD1 tokenizers."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB - 1, size=(batch, SEQ))
    ids[:, 0] = 0
    for i, end in enumerate([3, SEQ - 1, 6][:batch]):
        ids[i, end:] = EOS
    return ids


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    out = {}
    for kind in TEXT_CONFIGS:
        for cls in (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection):
            torch.manual_seed(0)
            model = randomise_norms(cls(text_config(kind)).eval(), seed=1)
            folder = tmp_path_factory.mktemp(f"{kind}_{cls.__name__}")
            model.save_pretrained(folder, safe_serialization=True)
            out[kind, cls.__name__] = (model, folder)
    return out


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    out = {}
    for kind in VISION_ACTS:
        torch.manual_seed(0)
        cls = transformers.CLIPVisionModelWithProjection
        model = randomise_norms(cls(vision_config(kind)).eval(), seed=2)
        folder = tmp_path_factory.mktemp(f"vision_{kind}")
        model.save_pretrained(folder, safe_serialization=True)
        out[kind] = (model, folder)
    return out


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("kind", list(TEXT_CONFIGS))
@pytest.mark.parametrize("cls_name", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_text_parity_fp32(text_models, kind, cls_name):
    torch_model, folder = text_models[kind, cls_name]
    ours = load_clip_text(folder)
    want_cls = CLIPTextModelWithProjection if "Projection" in cls_name else CLIPTextModel
    assert type(ours) is want_cls
    ids = make_ids(seed=3)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    got = ours(jnp.asarray(ids), output_hidden_states=True)
    assert max_diff(got.last_hidden_state, ref.last_hidden_state) <= FP32_ATOL
    assert len(got.hidden_states) == len(ref.hidden_states) == 4
    for g, r in zip(got.hidden_states, ref.hidden_states, strict=True):
        assert max_diff(g, r) <= FP32_ATOL
    if cls_name == "CLIPTextModel":
        assert max_diff(got.pooler_output, ref.pooler_output) <= FP32_ATOL
        final_ln = torch_model.final_layer_norm
    else:
        assert max_diff(got.text_embeds, ref.text_embeds) <= FP32_ATOL
        with torch.no_grad():
            pooled = torch_model.text_model(torch.from_numpy(ids)).pooler_output
        assert max_diff(got.pooler_output, pooled) <= FP32_ATOL
        final_ln = torch_model.text_model.final_layer_norm
    # diffusers' clip_skip: final_layer_norm(hidden_states[-(clip_skip + 1)])
    with torch.no_grad():
        skip_ref = final_ln(ref.hidden_states[-2])
    assert max_diff(ours.encode(jnp.asarray(ids), clip_skip=1), skip_ref) <= FP32_ATOL
    assert max_diff(ours.encode(jnp.asarray(ids)), ref.last_hidden_state) <= FP32_ATOL


def test_pooling_rule_follows_eos_token_id(text_models):
    """Legacy eos_token_id=2 pools at argmax(ids); otherwise at the first EOS occurrence."""
    ids = np.full((3, SEQ), 5)
    ids[0, [2, 7]] = EOS  # early EOS, later EOS: both rules pick position 2
    ids[1, 4] = 9  # no EOS at all: legacy picks the largest id (4), new rule falls back to 0
    ids[2, 3], ids[2, 6] = EOS - 1, EOS  # legacy and new both pick 6
    expected = {"sd1": [2, 4, 6], "sd2": [2, 0, 6]}
    for kind, positions in expected.items():
        torch_model, folder = text_models[kind, "CLIPTextModel"]
        ours = load_clip_text(folder)
        got = ours(jnp.asarray(ids))
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(ids))
        assert max_diff(got.pooler_output, ref.pooler_output) <= FP32_ATOL
        rows = np.asarray(got.last_hidden_state)[np.arange(3), positions]
        np.testing.assert_array_equal(np.asarray(got.pooler_output), rows)


def test_text_attention_mask_parity(text_models):
    torch_model, folder = text_models["sd2", "CLIPTextModelWithProjection"]
    ours = load_clip_text(folder)
    ids = make_ids(seed=6)
    mask = (np.arange(SEQ)[None] <= np.array([[3], [SEQ - 1], [6]])).astype(np.int64)
    ids = np.where(mask == 1, ids, PAD)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    got = ours(jnp.asarray(ids), jnp.asarray(mask))
    keep = mask.astype(bool)  # padded query rows are not used by anyone
    assert max_diff(np.asarray(got.last_hidden_state)[keep], ref.last_hidden_state[keep]) <= (
        FP32_ATOL
    )
    assert max_diff(got.text_embeds, ref.text_embeds) <= FP32_ATOL


@pytest.mark.parametrize("kind", list(VISION_ACTS))
def test_vision_parity_fp32_and_gradient(vision_models, kind):
    torch_model, folder = vision_models[kind]
    ours = load_clip_vision(folder)
    assert type(ours) is CLIPVisionModelWithProjection
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    ref = torch_model(xt, output_hidden_states=True)
    got = ours(jnp.asarray(x.transpose(0, 2, 3, 1)), output_hidden_states=True)
    assert max_diff(got.last_hidden_state, ref.last_hidden_state.detach()) <= FP32_ATOL
    assert max_diff(got.image_embeds, ref.image_embeds.detach()) <= FP32_ATOL
    with torch.no_grad():
        pooled = torch_model.vision_model(torch.from_numpy(x)).pooler_output
    assert max_diff(got.pooler_output, pooled) <= FP32_ATOL
    assert len(got.hidden_states) == len(ref.hidden_states) == 4
    # hidden_states[-2] is what diffusers' IP-adapter path feeds on
    for g, r in zip(got.hidden_states, ref.hidden_states, strict=True):
        assert max_diff(g, r.detach()) <= FP32_ATOL

    # guidance (GASS, CLIP score) differentiates through the image tower: gradients agree
    w = np.random.default_rng(8).standard_normal((2, 24)).astype(np.float32)
    (ref.image_embeds * torch.from_numpy(w)).sum().backward()

    def loss(img):
        return jnp.sum(ours(img).image_embeds * w)

    grad = jax.jit(jax.grad(loss))(jnp.asarray(x.transpose(0, 2, 3, 1)))
    ref_grad = xt.grad.numpy().transpose(0, 2, 3, 1)
    assert max_diff(grad, ref_grad) <= 1e-4 * max(1.0, float(np.abs(ref_grad).max()))


def test_full_clip_model_folder_loads_each_tower(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=text_config("sd2").to_dict(),
        vision_config=vision_config("sd1").to_dict(),
        projection_dim=20,
    )
    model = randomise_norms(transformers.CLIPModel(cfg).eval(), seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True)
    text = load_clip_text(tmp_path)
    vision = load_clip_vision(tmp_path)
    ids = make_ids(seed=9)
    x = np.random.default_rng(10).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        t_ref = model.get_text_features(torch.from_numpy(ids))
        v_ref = model.get_image_features(torch.from_numpy(x))
    t_ref = getattr(t_ref, "pooler_output", t_ref)
    v_ref = getattr(v_ref, "pooler_output", v_ref)
    assert max_diff(text(jnp.asarray(ids)).text_embeds, t_ref) <= FP32_ATOL
    got_v = vision(jnp.asarray(x.transpose(0, 2, 3, 1))).image_embeds
    assert max_diff(got_v, v_ref) <= FP32_ATOL


def test_bf16_close_and_jittable(text_models, vision_models):
    """bf16 compute with bf16 weights against the fp32 PyTorch reference.

    bf16 keeps 8 significant bits (unit roundoff 2**-8 ~ 3.9e-3); each of the 3 blocks adds
    a few rounded matmul / LayerNorm stages on O(1) activations, so relative errors around
    1e-2 are expected (measured 0.7e-2 to 1e-2 on these models). We require the relative
    Frobenius error <= 5e-2 (fp32 gives ~3e-7): loose enough for bf16 rounding, tight
    enough to catch a wrong layer or mask.
    """
    torch_model, folder = text_models["sd1", "CLIPTextModelWithProjection"]
    ours = load_clip_text(folder, dtype=jnp.bfloat16)
    assert ours.text_projection.kernel[...].dtype == jnp.bfloat16
    ids = make_ids(seed=11)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state, ids):
        return nnx.merge(graphdef, state)(ids).text_embeds

    got = run(state, jnp.asarray(ids))
    assert got.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids)).text_embeds.numpy()
    rel = np.linalg.norm(np.asarray(got, np.float32) - ref) / np.linalg.norm(ref)
    assert rel <= 5e-2, rel

    vmodel, vfolder = vision_models["sd2"]
    vours = load_clip_vision(vfolder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert vours.visual_projection.kernel[...].dtype == jnp.float32
    x = np.random.default_rng(12).standard_normal((2, 3, 16, 16)).astype(np.float32)
    vgot = vours(jnp.asarray(x.transpose(0, 2, 3, 1))).image_embeds
    assert vgot.dtype == jnp.bfloat16
    with torch.no_grad():
        vref = vmodel(torch.from_numpy(x)).image_embeds.numpy()
    rel = np.linalg.norm(np.asarray(vgot, np.float32) - vref) / np.linalg.norm(vref)
    assert rel <= 5e-2, rel


def test_loader_errors_name_the_tensor(text_models, tmp_path):
    _, folder = text_models["sd1", "CLIPTextModel"]
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    del sd["encoder.layers.1.mlp.fc2.bias"]
    sd["embeddings.token_embedding.weight"] = sd["embeddings.token_embedding.weight"][:-1]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_clip_text(tmp_path)
    msg = str(err.value)
    assert "missing tensors (1): encoder.layers.1.mlp.fc2.bias" in msg
    assert "embeddings.token_embedding.embedding (expected (64, 32), got (63, 32))" in msg
    with pytest.raises(ValueError, match="sequence length 17 exceeds"):
        load_clip_text(folder)(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="clip_skip must be an int in"):
        load_clip_text(folder).encode(jnp.zeros((1, 4), jnp.int32), clip_skip=3)


def test_vision_rejects_wrong_image_shape(vision_models):
    ours = load_clip_vision(vision_models["sd1"][1])
    with pytest.raises(ValueError, match=r"NHWC of shape \(batch, 16, 16, 3\)"):
        ours(jnp.zeros((1, 3, 16, 16)))


def test_image_preprocess_close_to_clip_image_processor():
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    yy, xx = np.mgrid[0:48, 0:64] / 48.0
    img = np.stack([0.5 + 0.4 * np.sin(2 * yy + c) * np.cos(3 * xx) for c in range(3)], -1)
    u8 = (img * 255).round().astype(np.uint8)
    ref = processor(images=[u8], return_tensors="np").pixel_values[0].transpose(1, 2, 0)
    ours = np.asarray(clip_image_preprocess(jnp.asarray(u8 / 255.0)[None], 32))[0]
    # PIL resamples on uint8 (0.5/255/std ~ 7.5e-3 rounding) with its own cubic weights
    assert max_diff(ours, ref) <= 3e-2
    same = np.asarray(
        clip_image_preprocess(jnp.asarray(2 * img[:32, :32] - 1)[None], 32, input_range=(-1, 1))
    )
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    np.testing.assert_allclose(same[0], (img[:32, :32] - mean) / std, atol=1e-5)


def test_tokenizer_from_local_folder(tmp_path):
    words = ["a", "photo", "of", "cat"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(words))):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = ["p h", "ph o", "pho t", "phot o</w>", "o f</w>", "c a", "ca t</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    tok = load_clip_tokenizer(tmp_path)
    ids = tokenize(tok, ["a photo of a cat", "A CAT"])
    want_row0 = [0, vocab["a</w>"], vocab["photo</w>"], vocab["of</w>"], vocab["a</w>"]]
    want_row0 += [vocab["cat</w>"], 1, 1]
    assert ids.tolist() == [want_row0, [0, vocab["a</w>"], vocab["cat</w>"], 1, 1, 1, 1, 1]]
    assert ids.dtype == np.int32
    # truncation keeps the length
    assert tokenize(tok, "a a a a a a a a a a").shape == (1, 8)
    with pytest.raises(CheckpointError, match="lacks merges.txt"):
        (tmp_path / "merges.txt").unlink()
        load_clip_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip_tokenizer(tmp_path / "nope")
