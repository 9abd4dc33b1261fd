"""The T5 encoder (Raffel et al. 2020) in Flax nnx: SD3's third text encoder.

Mirrors ``transformers.models.t5.modeling_t5.T5EncoderModel`` (transformers 5) for both
feed-forward flavours: original T5's ``"relu"`` (``wi -> relu -> wo``) and T5 v1.1's
``"gated-gelu"`` (``gelu_tanh(wi_0 x) * wi_1 x -> wo``, the ``google/t5-v1_1-xxl`` encoder
that SD3 ships as ``text_encoder_3``). The details that make T5 T5:

* one token embedding ``shared`` (transformers ties ``encoder.embed_tokens`` to it); no
  absolute positions;
* a learned **relative position bias** per head, looked up from bidirectional log-spaced
  buckets (:func:`relative_position_bucket`), owned by the first block only and added to
  the attention logits of every block;
* **no** ``1/sqrt(d)`` logit scaling (T5 folds it into the initialisation);
* ``T5LayerNorm``: RMSNorm, ``x / sqrt(mean(x^2) + eps) * w``, no mean, no bias;
* pre-norm residual blocks and a final RMSNorm; all projections are bias-free.

Attribute names follow transformers' (``encoder.block.<i>.layer.0.SelfAttention.q``,
``...layer.1.DenseReluDense.wi_0``), so checkpoints map by the rules of
:func:`jaxdiv.models.conversion.convert_t5_state_dict`.

Precision. ``dtype`` is the compute dtype of the projections; beyond that:

* the RMSNorm statistics, the attention logits (accumulated in float32), the position
  bias, the mask and the softmax are float32;
* the **residual stream is float32** whatever ``dtype``: T5 v1.1 residual activations
  grow to large magnitudes, and bf16 (8 significant bits) would round each small block
  update away against them. transformers reaches the same in float16 through its
  float32 ``wo`` (``_keep_in_fp32_modules``), whose float32 output promotes the residual
  sum; in bf16, transformers 5 keeps everything bf16 (it applies that rule to float16
  only), which the float32 residual makes strictly more accurate at a negligible cost
  (one ``(B, T, d_model)`` float32 buffer);
* for ``dtype=float16`` (whose range is what overflows in T5 v1.1), ``wo`` is stored and
  computed in float32, exactly as transformers does. bf16 has float32's range, so
  there ``wo`` follows ``dtype``/``param_dtype`` like every other projection.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiv import validation
from jaxdiv.models.checkpoint import float_dtype
from jaxdiv.models.clip.config import ACTIVATIONS
from jaxdiv.models.clip.tokenizer import check_token_ids
from jaxdiv.models.conversion import convert_t5_state_dict

__all__ = [
    "T5Config",
    "T5EncoderModel",
    "T5EncoderOutput",
    "load_t5",
    "relative_position_bucket",
    "t5_attention",
]

Dtype = Any


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyperparameters of the T5 encoder (defaults are transformers 5's ``T5Config``).

    ``dense_act_fn`` and ``is_gated_act`` are derived from ``feed_forward_proj`` the way
    transformers 5 derives them (``"gated-<act>"`` is gated; ``"gated-gelu"`` means the
    tanh-approximated ``gelu_new``), so values saved beside it in ``config.json`` are not
    read, as in transformers.

    Example:
        >>> cfg = T5Config.from_dict({"d_model": 64, "feed_forward_proj": "gated-gelu"})
        >>> cfg.d_model, cfg.dense_act_fn, cfg.is_gated_act, cfg.inner_dim
        (64, 'gelu_new', True, 512)
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            validation.integer(f"T5 config: {name}", getattr(self, name), minimum=1)
        _check_buckets(
            self.relative_attention_num_buckets,
            self.relative_attention_max_distance,
            bidirectional=True,
            prefix="T5 config: relative_attention_",
        )
        validation.number("T5 config: layer_norm_epsilon", self.layer_norm_epsilon, lo=0,
                          lo_open=True)  # fmt: skip
        proj = self.feed_forward_proj
        parts = proj.split("-") if isinstance(proj, str) else []
        if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                "T5 config: feed_forward_proj must be '<act>' or 'gated-<act>' (e.g. 'relu', "
                f"'gated-gelu'), got {proj!r}"
            )
        validation.choice("T5 config: activation of feed_forward_proj", self.dense_act_fn,
                          sorted(ACTIVATIONS))  # fmt: skip

    @property
    def dense_act_fn(self) -> str:
        """transformers' ``ACT2FN`` name of the feed-forward activation."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"  # transformers' backward-compatible special case
        return self.feed_forward_proj.split("-")[-1]

    @property
    def is_gated_act(self) -> bool:
        """Gated feed-forward (``wi_0``, ``wi_1``) instead of a single ``wi``."""
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections, ``num_heads * d_kv``."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_dict(cls, config: dict) -> T5Config:
        """Parse a transformers ``T5Config`` dict (a ``config.json``); other keys are ignored.

        Example:
            >>> T5Config.from_dict({"num_layers": 2, "is_encoder_decoder": True}).num_layers
            2
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (parsed config.json), got "
                            f"{type(config).__name__}")  # fmt: skip
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})


def _as_config(config) -> T5Config:
    if isinstance(config, T5Config):
        return config
    if isinstance(config, dict):
        return T5Config.from_dict(config)
    raise TypeError(f"config must be a T5Config or a dict, got {type(config).__name__}")


def _check_buckets(num_buckets, max_distance, *, bidirectional, prefix=""):
    """Refuse bucket settings for which transformers' formula divides by zero."""
    validation.integer(f"{prefix}num_buckets", num_buckets, minimum=4 if bidirectional else 2)
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    validation.integer(f"{prefix}max_distance", max_distance, minimum=max_exact + 1)


# --------------------------------------------------------------------------- position bias


def relative_position_bucket(
    relative_position, *, bidirectional: bool = True, num_buckets: int = 32,
    max_distance: int = 128,
):  # fmt: skip
    """T5's bucket of each relative position ``memory_position - query_position``.

    Raffel et al. 2020, Sec. 2.1 ("each embedding is simply a scalar ... offsets up to 128
    in logarithmically-sized bins"): with ``n = num_buckets`` (halved when bidirectional,
    the upper half then holding positive offsets) and ``m = n // 2``, an offset ``|r| < m``
    has its own bucket and a larger one falls in
    ``min(m + floor(log(|r| / m) / log(max_distance / m) * (n - m)), n - 1)``.
    Computed in float32 exactly as transformers' ``T5Attention._relative_position_bucket``
    (so boundary offsets round the same way). A numpy input gives a numpy result, computed
    on the host (what the model does with its static sequence length: the same table on
    every device); a JAX array gives a JAX array.

    Args:
        relative_position: integer array of offsets.
        bidirectional: separate buckets for positive offsets (encoder); otherwise positive
            offsets share bucket 0 (causal decoder).
        num_buckets: number of buckets (``relative_attention_num_buckets``).
        max_distance: offsets at least this far share the last bucket.

    Returns:
        int32 array of the input's shape, values in ``[0, num_buckets)``.

    Example:
        >>> import numpy as np
        >>> relative_position_bucket(np.array([-200, -9, -8, -1, 0, 1, 8, 200])).tolist()
        [15, 8, 8, 1, 0, 17, 24, 31]
    """
    _check_buckets(num_buckets, max_distance, bidirectional=bidirectional)
    xp = jnp if isinstance(relative_position, jax.Array) else np
    rp = xp.asarray(relative_position).astype(xp.int32)
    buckets = xp.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rp > 0).astype(xp.int32) * num_buckets
        rp = xp.abs(rp)
    else:
        rp = -xp.minimum(rp, 0)
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    # float32 like torch: log(rp / m) / float32(log(max_distance / m)) * (n - m), truncated;
    # small offsets are clamped to m first (they are not used, and log(0) would warn)
    ratio = xp.maximum(rp, max_exact).astype(xp.float32) / xp.float32(max_exact)
    scaled = (xp.log(ratio) / xp.float32(math.log(max_distance / max_exact))
              * xp.float32(num_buckets - max_exact))  # fmt: skip
    large = xp.minimum(max_exact + scaled.astype(xp.int32), num_buckets - 1)
    return (buckets + xp.where(is_small, rp, large)).astype(xp.int32)


# --------------------------------------------------------------------------- blocks


def _acc_dtype(dtype) -> Any:
    """float32, or float64 when computing in float64 (x64 parity and gradient checks)."""
    return jnp.promote_types(jnp.float32 if dtype is None else dtype, jnp.float32)


class T5LayerNorm(nnx.Module):
    """RMSNorm ``y = x / sqrt(mean(x^2) + eps) * w`` (Zhang & Sennrich 2019, Eq. 4).

    Statistics in float32; the normalised value is cast to ``dtype`` before the scale,
    as transformers' ``T5LayerNorm`` casts to its half-precision weight.

    Example:
        >>> import jax.numpy as jnp
        >>> norm = T5LayerNorm(2, eps=0.0, dtype=jnp.float32, param_dtype=jnp.float32)
        >>> norm(jnp.array([[2.0, -2.0], [0.5, 0.5]])).tolist()  # no mean is subtracted
        [[1.0, -1.0], [1.0, 1.0]]
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype: Dtype, param_dtype: Dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        acc = _acc_dtype(x.dtype)
        x = x.astype(acc)
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        out_dtype = x.dtype if self.dtype is None else self.dtype
        y = (x * jax.lax.rsqrt(var + self.eps)).astype(out_dtype)
        return self.scale[...].astype(out_dtype) * y


def _linear(cin, cout, *, dtype, param_dtype, rngs):
    return nnx.Linear(cin, cout, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def t5_attention(q, k, v, position_bias, mask=None):
    """``softmax(q k^T + B + M) v`` per head, unscaled (Raffel et al. 2020, Sec. 2.1).

    Logits are accumulated in float32 and the bias, the mask and the softmax stay float32;
    the probabilities are cast to the dtype of ``v`` for the second product.

    Args:
        q: queries ``(B, T, H, D)``.
        k: keys ``(B, S, H, D)``.
        v: values ``(B, S, H, D)``.
        position_bias: ``(1 or B, H, T, S)`` additive logit bias.
        mask: optional ``(B, S)`` bool, True for keys that may be attended to. A row with
            no key left attends uniformly (as transformers' finite-minimum mask does).

    Returns:
        ``(B, T, H, D)`` in the dtype of ``v``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = k = jnp.zeros((1, 2, 1, 4))
        >>> v = jnp.arange(8.0).reshape(1, 2, 1, 4)
        >>> bias = jnp.array([[[[0.0, -1e9], [0.0, 0.0]]]])  # query 0 sees key 0 only
        >>> t5_attention(q, k, v, bias)[0, :, 0, 0].tolist()
        [0.0, 2.0]
    """
    acc = _acc_dtype(q.dtype)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=acc)
    logits = logits + position_bias.astype(acc)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(acc).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


class T5Attention(nnx.Module):
    """T5 self-attention: bias-free ``q/k/v/o``, an additive relative position bias.

    Only the first block's instance owns ``relative_attention_bias`` (``num_buckets x
    num_heads``) and computes the bias (:meth:`compute_bias`); the encoder passes it to
    every block.
    """

    def __init__(self, cfg: T5Config, *, has_relative_attention_bias: bool, dtype,
                 param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.q = _linear(cfg.d_model, cfg.inner_dim, **kw)
        self.k = _linear(cfg.d_model, cfg.inner_dim, **kw)
        self.v = _linear(cfg.d_model, cfg.inner_dim, **kw)
        self.o = _linear(cfg.inner_dim, cfg.d_model, **kw)
        self.relative_attention_bias = (
            nnx.Embed(self.num_buckets, cfg.num_heads, **kw) if has_relative_attention_bias
            else None
        )  # fmt: skip

    def compute_bias(self, query_length: int, key_length: int) -> jax.Array:
        """``(1, H, T, S)`` float32 bias ``B[h, i, j] = E[bucket(j - i), h]``."""
        context = np.arange(query_length)[:, None]
        memory = np.arange(key_length)[None, :]
        buckets = relative_position_bucket(memory - context, bidirectional=True,
                                           num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)  # fmt: skip
        table = self.relative_attention_bias.embedding[...]
        values = table.astype(_acc_dtype(table.dtype))[buckets]  # (T, S, H)
        return jnp.transpose(values, (2, 0, 1))[None]

    def __call__(self, x, position_bias, mask=None):
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.d_kv)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
        return self.o(t5_attention(q, k, v, position_bias, mask).reshape(b, t, -1))


class T5DenseActDense(nnx.Module):
    """Original T5 feed-forward ``wo(act(wi x))`` (Raffel et al. 2020, Sec. 3.1.1)."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs, wo_dtype, wo_param_dtype):
        self.act = ACTIVATIONS[cfg.dense_act_fn]
        self.wi = _linear(cfg.d_model, cfg.d_ff, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wo = _linear(cfg.d_ff, cfg.d_model, dtype=wo_dtype, param_dtype=wo_param_dtype,
                          rngs=rngs)  # fmt: skip

    def __call__(self, x):
        return self.wo(self.act(self.wi(x)))


class T5DenseGatedActDense(nnx.Module):
    """T5 v1.1 gated feed-forward ``wo(act(wi_0 x) * wi_1 x)`` (Shazeer 2020, Eq. 6, GEGLU)."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs, wo_dtype, wo_param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ACTIVATIONS[cfg.dense_act_fn]
        self.wi_0 = _linear(cfg.d_model, cfg.d_ff, **kw)
        self.wi_1 = _linear(cfg.d_model, cfg.d_ff, **kw)
        self.wo = _linear(cfg.d_ff, cfg.d_model, dtype=wo_dtype, param_dtype=wo_param_dtype,
                          rngs=rngs)  # fmt: skip

    def __call__(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerSelfAttention(nnx.Module):
    """``x + SelfAttention(layer_norm(x))``."""

    def __init__(self, cfg: T5Config, *, has_relative_attention_bias, dtype, param_dtype, rngs):
        self.SelfAttention = T5Attention(
            cfg, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype,
                                      param_dtype=param_dtype)  # fmt: skip

    def __call__(self, x, position_bias, mask=None):
        out = self.SelfAttention(self.layer_norm(x), position_bias, mask)
        return x + out.astype(x.dtype)


class T5LayerFF(nnx.Module):
    """``x + DenseReluDense(layer_norm(x))``."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        # transformers keeps ``wo`` in float32 for float16 (``_keep_in_fp32_modules``)
        half = jnp.dtype(jnp.float16)
        wo_dtype = jnp.float32 if dtype is not None and jnp.dtype(dtype) == half else dtype
        wo_param = jnp.float32 if jnp.dtype(param_dtype) == half else param_dtype
        ff = T5DenseGatedActDense if cfg.is_gated_act else T5DenseActDense
        self.DenseReluDense = ff(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 wo_dtype=wo_dtype, wo_param_dtype=wo_param)  # fmt: skip
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype,
                                      param_dtype=param_dtype)  # fmt: skip

    def __call__(self, x):
        return x + self.DenseReluDense(self.layer_norm(x)).astype(x.dtype)


class T5Block(nnx.Module):
    """``layer[0]``: :class:`T5LayerSelfAttention`; ``layer[1]``: :class:`T5LayerFF`."""

    def __init__(self, cfg: T5Config, *, has_relative_attention_bias, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer = nnx.List([
            T5LayerSelfAttention(cfg, has_relative_attention_bias=has_relative_attention_bias,
                                 **kw),
            T5LayerFF(cfg, **kw),
        ])  # fmt: skip

    def __call__(self, x, position_bias, mask=None):
        return self.layer[1](self.layer[0](x, position_bias, mask))


class T5Stack(nnx.Module):
    """The encoder stack: ``block`` (the first owns the position bias), ``final_layer_norm``."""

    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.block = nnx.List([
            T5Block(cfg, has_relative_attention_bias=(i == 0), **kw)
            for i in range(cfg.num_layers)
        ])  # fmt: skip
        self.final_layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon,
                                            dtype=dtype, param_dtype=param_dtype)  # fmt: skip

    def __call__(self, x, mask=None, *, output_hidden_states=False):
        """``x``: embeddings in the float32 residual dtype; returns ``(normed, states)``."""
        t = x.shape[1]
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(t, t)
        states = [x]
        for block in self.block:
            x = block(x, position_bias, mask)
            states.append(x)
        x = self.final_layer_norm(x)
        # transformers' hidden_states: the embeddings, every block's output but the last,
        # then the normalised last output (== last_hidden_state)
        return x, ((*states[:-1], x) if output_hidden_states else None)


# --------------------------------------------------------------------------- model


class T5EncoderOutput(NamedTuple):
    """Returned by :class:`T5EncoderModel` when ``output_hidden_states=True``.

    ``hidden_states`` has ``num_layers + 1`` entries, as transformers': the embeddings,
    the output of every block but the last, then ``last_hidden_state`` (the last block's
    output after ``final_layer_norm``).
    """

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]


class T5EncoderModel(nnx.Module):
    """T5 encoder (transformers' ``T5EncoderModel``), Flax nnx.

    Raffel et al. 2020, Sec. 2.1: pre-RMSNorm transformer encoder with shared relative
    position biases and unscaled dot-product attention. See the module docstring for the
    precision policy (float32 residual stream; float32 ``wo`` under float16).

    Args:
        config: :class:`T5Config` or a transformers ``config.json`` dict.
        dtype: compute dtype (``jnp.float32``, ``jnp.bfloat16``, ``jnp.float16``).
        param_dtype: parameter storage dtype (``None``: ``dtype``).
        rngs: initialisation rngs (weights are normally overwritten by a checkpoint).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = {"vocab_size": 10, "d_model": 8, "d_kv": 2, "d_ff": 12, "num_layers": 2,
        ...        "num_heads": 2, "relative_attention_num_buckets": 8,
        ...        "relative_attention_max_distance": 6, "feed_forward_proj": "gated-gelu"}
        >>> m = T5EncoderModel(cfg, rngs=nnx.Rngs(0))
        >>> m(jnp.array([[4, 7, 1, 0, 0]])).shape
        (1, 5, 8)
    """

    def __init__(self, config, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = None,
                 rngs: nnx.Rngs):  # fmt: skip
        self.config = cfg = _as_config(config)
        dtype = jnp.float32 if dtype is None else dtype
        param_dtype = dtype if param_dtype is None else param_dtype
        self.dtype = dtype
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)  # fmt: skip
        self.encoder = T5Stack(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        output_hidden_states: bool = False,
        token_embeds=None,
    ) -> jax.Array | T5EncoderOutput:
        """Encode token ids.

        Args:
            input_ids: int array ``(batch, seq_len)``; any length (relative positions).
            attention_mask: optional ``(batch, seq_len)``, 1 (or True) for tokens to attend
                to, 0 for padding. SD3's pipeline passes none (its T5 sees the padding).
            output_hidden_states: return a :class:`T5EncoderOutput` with every hidden
                state instead of the last hidden state alone.
            token_embeds: optional ``(batch, seq_len, d_model)`` used in place of
                ``shared(input_ids)`` (to optimise prompt embeddings, as TPSO does).

        Returns:
            The last hidden state ``(batch, seq_len, d_model)`` in ``dtype`` (or a
            :class:`T5EncoderOutput` when ``output_hidden_states``).

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = T5EncoderModel({"vocab_size": 10, "d_model": 4, "d_kv": 2, "d_ff": 4,
            ...     "num_layers": 3, "num_heads": 2, "relative_attention_num_buckets": 4,
            ...     "relative_attention_max_distance": 4}, rngs=nnx.Rngs(0))
            >>> out = m(jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6)), output_hidden_states=True)
            >>> out.last_hidden_state.shape, len(out.hidden_states)
            ((2, 6, 4), 4)
        """
        ids = jnp.asarray(input_ids)
        if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be an integer array of shape (batch, seq_len), got shape "
                f"{ids.shape} and dtype {ids.dtype}"
            )
        check_token_ids(input_ids, self.config.vocab_size)  # concrete ids only
        mask = None
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {ids.shape}, got "
                    f"{attention_mask.shape}"
                )
            mask = attention_mask != 0
        if token_embeds is None:
            h = self.shared(ids)
        else:
            token_embeds = jnp.asarray(token_embeds)
            want = (*ids.shape, self.config.d_model)
            if token_embeds.shape != want:
                raise ValueError(f"token_embeds must have shape {want} (input_ids plus d_model), "
                                 f"got {token_embeds.shape}")  # fmt: skip
            h = token_embeds.astype(self.dtype)
        h = h.astype(_acc_dtype(self.dtype))  # the float32 residual stream
        last, states = self.encoder(h, mask, output_hidden_states=output_hidden_states)
        if not output_hidden_states:
            return last
        return T5EncoderOutput(last, tuple(s.astype(self.dtype) for s in states))


# --------------------------------------------------------------------------- loading


def load_t5(
    folder: str | os.PathLike,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    check_finite: bool = True,
) -> T5EncoderModel:
    """Load a T5 encoder from a local transformers folder (e.g. SD3's ``text_encoder_3/``).

    Reads ``config.json`` and the safetensors weights (single file or sharded, as SD3's)
    with :func:`jaxdiv.models.checkpoint.load_component`; never touches the network. A
    full ``T5ForConditionalGeneration`` / ``T5Model`` folder works too (the decoder is
    ignored, as transformers' ``T5EncoderModel`` does).

    Args:
        folder: folder with ``config.json`` and weights.
        dtype: compute dtype (``None``: float32): ``jnp.float32``, ``jnp.bfloat16``,
            ``jnp.float16`` or ``jnp.float64`` (with 64-bit JAX enabled); see
            :func:`~jaxdiv.models.checkpoint.float_dtype`.
        param_dtype: weight dtype in memory (``None``: ``dtype``; ``wo`` is float32 when
            it is float16), one of the same.
        allow_pickle: permit pickled ``.bin`` weights (see
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        variant: weight-file variant such as ``"fp16"``.
        check_finite: refuse NaN/inf weights and weights that overflow their dtype,
            naming them (``False`` for a trusted folder).

    Returns:
        The loaded :class:`T5EncoderModel` (``model.config`` is its :class:`T5Config`).

    Raises:
        CheckpointError: folder incomplete, weights that do not match the config, or an
            invalid config (naming ``config.json`` and the field; a value of the wrong
            type raises a CheckpointError that is also a TypeError).
        TypeError: ``dtype``/``param_dtype`` not a floating dtype, or a flag not a bool.

    Example:
        >>> import tempfile
        >>> import transformers
        >>> cfg = transformers.T5Config(vocab_size=10, d_model=8, d_kv=2, d_ff=12,
        ...     num_layers=1, num_heads=2, relative_attention_num_buckets=8,
        ...     relative_attention_max_distance=6, feed_forward_proj="gated-gelu")
        >>> d = tempfile.mkdtemp()
        >>> transformers.T5EncoderModel(cfg).save_pretrained(d)
        >>> load_t5(d).config.dense_act_fn
        'gelu_new'
    """
    from jaxdiv.models.checkpoint import load_component

    dtype = float_dtype("dtype", dtype)
    param_dtype = float_dtype("param_dtype", param_dtype)

    def build(config: dict) -> T5EncoderModel:
        return T5EncoderModel(T5Config.from_dict(config), dtype=dtype, param_dtype=param_dtype,
                              rngs=nnx.Rngs(0))  # fmt: skip

    # no dtype= here: every weight keeps the dtype its module declares (float32 ``wo``)
    model, _ = load_component(folder, build, convert_t5_state_dict, allow_pickle=allow_pickle,
                              variant=variant, check_finite=check_finite,
                              kinds=("t5",))  # fmt: skip
    return model
