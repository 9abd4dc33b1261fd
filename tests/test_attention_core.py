"""``attention_core``: the blocked (online-softmax) path equals ``jax.nn.dot_product_attention``
and an independent float64 NumPy softmax, in value and gradient, on ragged, cross-attention,
single-head, masked and causal shapes; dtypes are kept; bad arguments are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiv.models import layers
from jaxdiv.models.layers import attention_core


def reference(q, k, v, scale=None, mask=None, is_causal=False):
    """``softmax(q k^T scale) v`` in float64 NumPy, (B, T, H, D) layout: the independent truth."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    keep = np.ones(logits.shape, bool)
    if is_causal:
        keep &= np.tril(np.ones(logits.shape[-2:], bool))
    if mask is not None:
        keep &= np.broadcast_to(np.asarray(mask), logits.shape)
    logits = np.where(keep, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def qkv(b, t, s, h, d, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d))
    k, v = rng.standard_normal((2, b, s, h, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# (B, T, S, H, D, kv_block): ragged T and S (not multiples of the block), cross-attention
# (S != T, S < block), H = 1, a single block, many blocks
SHAPES = [
    (2, 37, 53, 3, 8, 16),
    (1, 50, 50, 1, 16, 7),
    (2, 33, 5, 2, 8, 512),
    (1, 64, 64, 2, 4, 64),
    (2, 9, 130, 1, 8, 32),
]


@pytest.mark.parametrize("b,t,s,h,d,block", SHAPES)
def test_blocked_equals_dense_and_float64_reference(b, t, s, h, d, block):
    q, k, v = qkv(b, t, s, h, d)
    out = attention_core(q, k, v, implementation="blocked", kv_block=block)
    assert out.shape == (b, t, h, d) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5, rtol=0)
    dense = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(out, dense, atol=1e-5, rtol=0)
    scaled = attention_core(q, k, v, scale=0.3, implementation="blocked", kv_block=block)
    np.testing.assert_allclose(scaled, reference(q, k, v, scale=0.3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", [None, "xla", "blocked"])
def test_causal_and_masked_match_reference(impl):
    b, t, h, d = 2, 45, 3, 8
    q, k, v = qkv(b, t, t, h, d, seed=1)
    lengths = np.array([45, 30])  # CLIP-style padding mask on the keys, plus causal
    mask = (np.arange(t)[None, :] < lengths[:, None])[:, None, None, :]
    kw = dict(implementation=impl)
    if impl == "blocked":
        kw["kv_block"] = 16
    causal = attention_core(q, k, v, is_causal=True, **kw)
    np.testing.assert_allclose(causal, reference(q, k, v, is_causal=True), atol=1e-5, rtol=0)
    masked = attention_core(q, k, v, mask=jnp.asarray(mask), **kw)
    np.testing.assert_allclose(masked, reference(q, k, v, mask=mask), atol=1e-5, rtol=0)
    both = attention_core(q, k, v, mask=jnp.asarray(mask), is_causal=True, **kw)
    want = reference(q, k, v, mask=mask, is_causal=True)
    np.testing.assert_allclose(both, want, atol=1e-5, rtol=0)
    # a per-head (B, H, T, S) mask too
    rng = np.random.default_rng(2)
    full = rng.random((b, h, t, t)) < 0.7
    full[..., 0] = True  # every query keeps a key
    out = attention_core(q, k, v, mask=jnp.asarray(full), **kw)
    np.testing.assert_allclose(out, reference(q, k, v, mask=full), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_gradients_match_dense(causal):
    b, t, s, h, d = 2, 21, 21 if causal else 26, 2, 8
    q, k, v = qkv(b, t, s, h, d, seed=3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal((b, t, h, d)), jnp.float32)

    def loss(impl, **kw):
        return lambda q, k, v: jnp.sum(
            w * attention_core(q, k, v, implementation=impl, is_causal=causal, **kw)
        )

    got = jax.grad(loss("blocked", kv_block=8), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=0)
        assert float(jnp.abs(r).max()) > 1e-2  # non-trivial gradients
    # through jit as the models use it
    jitted = jax.jit(jax.grad(loss("blocked", kv_block=8), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(jitted, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=0)


@pytest.mark.parametrize("loop_heads", [True, False])
def test_looped_and_vmapped_heads_match_reference_in_value_and_gradient(loop_heads):
    # the CPU path runs (batch, head) pairs one by one, other backends vmap them: both forms
    # must give the float64 reference under a per-head mask plus causal, ragged blocks
    b, t, h, d = 2, 29, 3, 8
    q, k, v = qkv(b, t, t, h, d, seed=12)
    rng = np.random.default_rng(13)
    mask = rng.random((b, h, t, t)) < 0.7
    mask[..., 0] = True

    def attend(q, k, v):
        return layers._blocked_attention(
            q, k, v, scale=0.3, mask=jnp.asarray(mask), is_causal=True, kv_block=8,
            loop_heads=loop_heads,
        )  # fmt: skip

    want = reference(q, k, v, 0.3, mask, True)
    np.testing.assert_allclose(attend(q, k, v), want, atol=1e-5, rtol=0)
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    got = jax.jit(jax.grad(lambda *a: jnp.sum(w * attend(*a)), argnums=(0, 1, 2)))(q, k, v)
    dense = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=0.3, mask=jnp.asarray(mask), is_causal=True
    )
    ref = jax.grad(lambda *a: jnp.sum(w * dense(*a)), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=0)


def test_heads_are_looped_on_cpu_only_when_keys_span_several_blocks():
    q, k, v = qkv(2, 24, 24, 3, 4, seed=14)

    def scans(kv_block):  # the pair loop is a scan around the key-block scan
        jaxpr = jax.make_jaxpr(
            lambda q, k, v: layers._blocked_attention(
                q, k, v, scale=0.5, mask=None, is_causal=False, kv_block=kv_block
            )
        )(q, k, v)
        return str(jaxpr).count("scan[")

    cpu = jax.default_backend() == "cpu"
    assert scans(8) == (2 if cpu else 1)  # three blocks
    assert scans(24) == 1  # one block: the pairs are vmapped


@pytest.mark.parametrize("causal,masked", [(False, False), (True, True)])
def test_fused_forward_xla_gradient_equals_jax_attention(causal, masked):
    # odd lengths (CLIP's 77, ViT's 257 are odd): value and gradient as JAX's own attention
    b, t, s, h, d = 2, 11, 11 if causal else 7, 2, 8
    q, k, v = qkv(b, t, s, h, d, seed=8)
    mask = None
    if masked:
        mask = jnp.asarray((np.arange(s)[None, :] < np.array([s, 6])[:, None])[:, None, None])
    w = jnp.asarray(np.random.default_rng(9).standard_normal((b, t, h, d)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(w * fn(q, k, v))

    ours = lambda q, k, v: layers._fused_forward_xla_gradient(q, k, v, mask, 0.4, causal, "xla")
    jaxs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.4, mask=mask,
                                                        is_causal=causal)  # fmt: skip
    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v, 0.4, mask, causal), atol=1e-5)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(jaxs), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=0)
        assert float(jnp.abs(r).max()) > 1e-2


def test_cudnn_at_odd_lengths_differentiates_through_xla(monkeypatch):
    # JAX's cuDNN rule refuses odd lengths under differentiation; attention_core keeps the
    # fused forward and takes XLA's gradient there. A stand-in records which
    # implementation each call asked for (cuDNN itself needs a GPU).
    calls = []
    real = jax.nn.dot_product_attention

    def fake(*a, implementation=None, **kw):
        calls.append(implementation)
        return real(*a, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v = qkv(1, 77, 77, 2, 8, seed=10)
    f = lambda q: jnp.sum(attention_core(q, k, v, implementation="cudnn", is_causal=True) ** 2)
    g = jax.grad(f)(q)
    assert calls == ["cudnn", "xla"]  # fused forward, XLA recomputed for the VJP
    want = jax.grad(lambda q: jnp.sum(real(q, k, v, is_causal=True) ** 2))(q)
    np.testing.assert_allclose(g, want, atol=1e-5, rtol=0)
    calls.clear()
    q2, k2, v2 = qkv(1, 64, 64, 2, 8, seed=11)  # even lengths: JAX's cuDNN rule as is
    attention_core(q2, k2, v2, implementation="cudnn")
    assert calls == ["cudnn"]


def test_bfloat16_close_and_kept():
    q, k, v = qkv(2, 40, 40, 2, 16, seed=5)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out = attention_core(qb, kb, vb, implementation="blocked", kv_block=16)
    assert out.dtype == jnp.bfloat16
    want = reference(qb.astype(jnp.float32), kb.astype(jnp.float32), vb.astype(jnp.float32))
    err = np.abs(np.asarray(out, np.float32) - want).max() / np.abs(want).max()
    assert err < 0.03


def test_float64_stays_float64():
    with jax.enable_x64(True):
        q, k, v = qkv(1, 23, 31, 2, 8, dtype=np.float64, seed=6)
        want = reference(q, k, v, is_causal=False)
        for impl in (None, "xla", "blocked"):
            out = attention_core(q, k, v, implementation=impl, kv_block=8)
            assert out.dtype == jnp.float64, impl
            np.testing.assert_allclose(out, want, atol=1e-12, rtol=0)
        g = jax.grad(lambda q: attention_core(q, k, v, implementation="blocked", kv_block=8).sum())
        assert g(q).dtype == jnp.float64


def test_automatic_choice_is_blocked_only_for_many_logits_on_cpu(monkeypatch):
    calls = []
    real = layers._blocked_attention

    def spy(*a, **kw):
        calls.append(kw["kv_block"])
        return real(*a, **kw)

    monkeypatch.setattr(layers, "_blocked_attention", spy)
    monkeypatch.setattr(layers, "BLOCKED_MIN_LOGITS", 40 * 40)
    q, k, v = qkv(1, 40, 40, 1, 4, seed=7)
    attention_core(q, k, v)
    assert calls == ([layers.BLOCKED_KV_BLOCK] if jax.default_backend() == "cpu" else [])
    calls.clear()
    attention_core(q, k[:, :39], v[:, :39])  # 40 x 39 logits per head: dense
    attention_core(q, k, v, implementation="xla")  # an explicit choice is kept
    assert calls == []


def test_bad_arguments_are_refused():
    q, k, v = qkv(1, 4, 4, 1, 2)
    with pytest.raises(ValueError, match="implementation must be one of"):
        attention_core(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="kv_block"):
        attention_core(q, k, v, implementation="blocked", kv_block=0)
    with pytest.raises(ValueError, match=r"\(B, T, H, D\)"):
        attention_core(q[0], k[0], v[0])
