"""Parity of the Flax T5 encoder port with transformers' PyTorch ``T5EncoderModel``.

Tiny random models are built by transformers (T5 v1.1's gated-gelu as in SD3's
``text_encoder_3``, and original T5's relu), saved with ``save_pretrained`` (safetensors)
into temp folders, loaded with :func:`jaxdiv.models.t5.load_t5` and compared output by
output. The sequence (24 tokens) is longer than both bucket layouts' ``max_distance``, so
the saturated log-spaced buckets are exercised.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.t5 import (
    T5Config,
    T5EncoderModel,
    T5EncoderOutput,
    load_t5,
    relative_position_bucket,
)
from jaxdiv.testing import TINY_T5, randomize_norms_and_biases

SEQ = 24
FP32_ATOL = 1e-4

CONFIGS = {
    # bidirectional: 8 buckets a side, 4 exact; offsets >= 14 saturate (max_distance 20)
    "gated-gelu": dict(TINY_T5, num_layers=3, relative_attention_num_buckets=16,
                       relative_attention_max_distance=20),
    # 4 buckets a side, 2 exact; offsets >= 5 saturate
    "relu": dict(TINY_T5, num_layers=3, d_model=24, d_kv=6, num_heads=2, d_ff=36,
                 feed_forward_proj="relu"),
}  # fmt: skip


def torch_t5(kind, cls=transformers.T5EncoderModel, seed=0):
    torch.manual_seed(seed)
    model = randomize_norms_and_biases(cls(transformers.T5Config(**CONFIGS[kind])), seed + 1)
    with torch.no_grad():  # sharper position biases, so a wrong bucket shows in the output
        for name, p in model.named_parameters():
            if "relative_attention_bias" in name:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def t5_models(tmp_path_factory):
    out = {}
    for kind in CONFIGS:
        model = torch_t5(kind)
        folder = tmp_path_factory.mktemp(f"t5_{kind}")
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
        out[kind] = (model, folder)
    return out


@nnx.jit(static_argnames="hidden")
def encode(model, ids, mask=None, hidden=False, embeds=None):
    """One compile per model structure (eager dispatch of every op is slower on CPU)."""
    return model(ids, mask, output_hidden_states=hidden, token_embeds=embeds)


def make_ids(seed, batch=3, vocab=TINY_T5["vocab_size"]):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, SEQ))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def rel_l2(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference(model, ids, mask=None):
    with torch.no_grad():
        mask = None if mask is None else torch.from_numpy(mask)
        return model(torch.from_numpy(ids), attention_mask=mask, output_hidden_states=True)


def copy_folder(src, dst, state_dict):
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(state_dict, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "num_buckets, max_distance",
    [(32, 128), (16, 20), (8, 12), (8, 8), (10, 7), (12, 50), (64, 256), (24, 17)],
)
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance):
    rp = np.arange(-300, 301)
    for bidirectional in (True, False):
        kw = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
        want = TorchT5Attention._relative_position_bucket(torch.from_numpy(rp), **kw).numpy()
        got_np = relative_position_bucket(rp, **kw)
        got_jax = relative_position_bucket(jnp.asarray(rp), **kw)
        assert isinstance(got_np, np.ndarray) and isinstance(got_jax, jax.Array)
        np.testing.assert_array_equal(got_np, want)
        np.testing.assert_array_equal(np.asarray(got_jax), want)
    with pytest.raises(ValueError, match="max_distance must be an integer >= 3"):
        relative_position_bucket(rp, num_buckets=8, max_distance=2)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_parity_fp32(t5_models, kind):
    torch_model, folder = t5_models[kind]
    ours = load_t5(folder)
    assert type(ours) is T5EncoderModel
    assert ours.config.is_gated_act == (kind == "gated-gelu")
    assert ours.config.dense_act_fn == torch_model.config.dense_act_fn
    ids = make_ids(seed=1)
    ref = reference(torch_model, ids)
    full = encode(ours, jnp.asarray(ids), hidden=True)
    assert isinstance(full, T5EncoderOutput)
    got = full.last_hidden_state
    assert got.shape == (3, SEQ, ours.config.d_model) and got.dtype == jnp.float32
    assert max_diff(got, ref.last_hidden_state) <= FP32_ATOL
    assert len(full.hidden_states) == len(ref.hidden_states) == 4
    for g, r in zip(full.hidden_states, ref.hidden_states, strict=True):
        assert max_diff(g, r) <= FP32_ATOL
    # the bias is shared: only the first block owns a table
    attn = [blk.layer[0].SelfAttention for blk in ours.encoder.block]
    assert attn[0].relative_attention_bias is not None
    assert all(a.relative_attention_bias is None for a in attn[1:])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_parity_attention_mask(t5_models, kind):
    torch_model, folder = t5_models[kind]
    ours = load_t5(folder)
    ids = make_ids(seed=2)
    lengths = np.array([[5], [SEQ], [17]])
    mask = (np.arange(SEQ)[None] < lengths).astype(np.int64)
    mask[2, :3] = 0  # a left-padded row too: T5 has no absolute positions
    ids = np.where(mask == 1, ids, 0)
    ref = reference(torch_model, ids, mask)
    got = encode(ours, jnp.asarray(ids), jnp.asarray(mask))
    # padded queries still attend to the kept keys, so every row is defined and compared
    assert max_diff(got, ref.last_hidden_state) <= FP32_ATOL
    # the mask matters, and an all-ones mask is the same as none (SD3 passes none)
    unmasked = encode(ours, jnp.asarray(ids))
    assert isinstance(unmasked, jax.Array) and unmasked.shape == got.shape
    assert max_diff(unmasked, got) > 1e-2
    ones = encode(ours, jnp.asarray(ids), jnp.ones_like(jnp.asarray(mask)))
    assert max_diff(ones, unmasked) <= 1e-6


def test_bf16_and_fp16_close_to_fp32_and_jittable(t5_models):
    """bf16 (8 significant bits, unit roundoff 2**-8 ~ 3.9e-3) through 3 blocks of a few
    rounded matmul stages each gives relative errors around 1e-2 on O(1) activations; we
    require <= 3e-2 relative L2 against the fp32 PyTorch reference (fp32 gives ~1e-7):
    loose enough for rounding, tight enough to catch a wrong layer, bias or mask."""
    torch_model, folder = t5_models["gated-gelu"]
    ids, mask = make_ids(seed=3), np.ones((3, SEQ), np.int64)
    mask[0, 10:] = 0
    ref = reference(torch_model, ids, mask).last_hidden_state.numpy()

    ours = load_t5(folder, dtype=jnp.bfloat16)
    ff = ours.encoder.block[0].layer[1].DenseReluDense
    assert ff.wo.kernel[...].dtype == jnp.bfloat16 == ours.shared.embedding[...].dtype
    graphdef, state = nnx.split(ours)

    @jax.jit
    def run(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    got = run(state, jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.bfloat16
    assert rel_l2(got, ref) <= 3e-2, rel_l2(got, ref)

    # float16 keeps ``wo`` in float32, as transformers' _keep_in_fp32_modules does
    half = load_t5(folder, dtype=jnp.float16)
    ff = half.encoder.block[0].layer[1].DenseReluDense
    assert ff.wo.kernel[...].dtype == jnp.float32 and ff.wi_0.kernel[...].dtype == jnp.float16
    got16 = encode(half, jnp.asarray(ids), jnp.asarray(mask))
    assert got16.dtype == jnp.float16
    assert rel_l2(got16, ref) <= 1e-2, rel_l2(got16, ref)

    # bf16 compute over fp32 weights: only the storage changes
    mixed = load_t5(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert mixed.encoder.final_layer_norm.scale[...].dtype == jnp.float32


def test_tied_embedding_from_either_name_and_full_t5_folder(t5_models, tmp_path):
    torch_model, folder = t5_models["gated-gelu"]
    ids = make_ids(seed=4)
    want = reference(torch_model, ids).last_hidden_state
    sd = load_file(str(folder / "model.safetensors"))
    assert "shared.weight" in sd and "encoder.embed_tokens.weight" not in sd

    only_encoder = dict(sd)
    only_encoder["encoder.embed_tokens.weight"] = only_encoder.pop("shared.weight")
    a = load_t5(copy_folder(folder, tmp_path / "embed_tokens", only_encoder))
    assert max_diff(encode(a, jnp.asarray(ids)), want) <= FP32_ATOL

    both = dict(sd, **{"encoder.embed_tokens.weight": sd["shared.weight"]})
    b = load_t5(copy_folder(folder, tmp_path / "both", both))
    assert max_diff(encode(b, jnp.asarray(ids)), want) <= FP32_ATOL

    # a full encoder-decoder folder: the decoder and lm_head are ignored
    full = torch_t5("relu", cls=transformers.T5ForConditionalGeneration, seed=5)
    full.save_pretrained(tmp_path / "full")
    with torch.no_grad():
        enc_ref = full.encoder(torch.from_numpy(ids)).last_hidden_state
    assert max_diff(encode(load_t5(tmp_path / "full"), jnp.asarray(ids)), enc_ref) <= FP32_ATOL


def test_load_errors_name_the_tensor(t5_models, tmp_path):
    _, folder = t5_models["gated-gelu"]
    sd = load_file(str(folder / "model.safetensors"))

    wo = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    missing = {k: v for k, v in sd.items() if k != wo}
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): "
                       r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.kernel"):  # fmt: skip
        load_t5(copy_folder(folder, tmp_path / "missing", missing))

    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    bad_shape = dict(sd, **{name: sd[name][:-1]})
    with pytest.raises(CheckpointError) as err:
        load_t5(copy_folder(folder, tmp_path / "shape", bad_shape))
    assert ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.embedding "
            "(expected (16, 3), got (15, 3))") in str(err.value)  # fmt: skip

    nan_name = "encoder.block.2.layer.0.SelfAttention.q.weight"
    poisoned = dict(sd, **{nan_name: sd[nan_name].copy()})
    poisoned[nan_name][0, 0] = np.nan
    with pytest.raises(CheckpointError, match=nan_name.replace(".", r"\.")):
        load_t5(copy_folder(folder, tmp_path / "nan", poisoned))

    # no embedding under either name
    no_embed = {k: v for k, v in sd.items() if k != "shared.weight"}
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): shared\.embedding"):
        load_t5(copy_folder(folder, tmp_path / "no_embed", no_embed))

    # pickled weights are refused unless opted in
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_t5(pickled)
    assert load_t5(pickled, allow_pickle=True).config.num_layers == 3


def test_config_and_input_validation(t5_models):
    for proj, act, gated in [("gated-gelu", "gelu_new", True), ("relu", "relu", False),
                             ("gated-silu", "silu", True), ("gelu", "gelu", False)]:  # fmt: skip
        want = transformers.T5Config(feed_forward_proj=proj)
        cfg = T5Config.from_dict(want.to_dict())
        assert (cfg.dense_act_fn, cfg.is_gated_act) == (want.dense_act_fn, want.is_gated_act)
        assert (cfg.dense_act_fn, cfg.is_gated_act) == (act, gated)
    with pytest.raises(ValueError, match="feed_forward_proj must be"):
        T5Config(feed_forward_proj="gelu-gated")
    with pytest.raises(ValueError, match="activation of feed_forward_proj must be one of"):
        T5Config(feed_forward_proj="gated-tanhh")
    with pytest.raises(ValueError, match="relative_attention_num_buckets must be"):
        T5Config(relative_attention_num_buckets=2)
    with pytest.raises(ValueError, match="relative_attention_max_distance must be"):
        T5Config(relative_attention_num_buckets=32, relative_attention_max_distance=8)
    with pytest.raises(ValueError, match="d_model must be an integer >= 1"):
        T5Config.from_dict({"d_model": 0})
    # an SD3 text_encoder_3/config.json (t5-v1_1-xxl) parses
    sd3 = {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
           "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu", "is_gated_act": True,
           "layer_norm_epsilon": 1e-06, "num_heads": 64, "num_layers": 24,
           "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
           "tie_word_embeddings": False, "vocab_size": 32128}  # fmt: skip
    cfg = T5Config.from_dict(json.loads(json.dumps(sd3)))
    assert (cfg.inner_dim, cfg.dense_act_fn, cfg.num_layers) == (4096, "gelu_new", 24)

    ours = load_t5(t5_models["relu"][1])
    with pytest.raises(ValueError, match=r"token ids in \[0, 64\)"):
        ours(jnp.array([[1, 64]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        ours(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="integer array of shape"):
        ours(jnp.ones((5,), jnp.int32))
    # token_embeds replaces the lookup
    ids = jnp.asarray(make_ids(seed=6))
    same = encode(ours, ids, embeds=ours.shared(ids))
    assert max_diff(same, encode(ours, ids)) == 0.0
