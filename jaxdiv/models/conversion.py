"""PyTorch -> Flax nnx weight conversion: every key-mapping rule of every model port.

A converter maps a PyTorch state dict (``{torch_name: array}``, from
:func:`~jaxdiv.models.checkpoint.load_state_dict`) to ``{nnx_path: array}`` for
:func:`~jaxdiv.models.checkpoint.assign_params`; nnx paths are the module's state paths
joined with ``"."`` (``"down_blocks.0.resnets.1.conv1.kernel"``). A ``bias`` keeps its name
and layout; a ``weight`` is converted by the kind of layer that owns it
(:data:`WEIGHT_RULES`, shared by all ports):

* conv ``weight`` (O, I, kH, kW)      -> ``kernel`` (kH, kW, I, O)     :func:`conv_kernel`
* linear ``weight`` (out, in)         -> ``kernel`` (in, out)          :func:`linear_kernel`
* norm (LayerNorm / GroupNorm) ``weight`` -> ``scale``
* embedding ``weight``                -> ``embedding`` (same layout)

What differs per port is how the kind is recognised and which blocks are renamed:

* diffusers UNet / VAE (:func:`convert_torch_weights`): by rank (1: norm, 2: linear,
  4: conv) with explicit exceptions, after the substring renames of
  :data:`UNET_RENAMES` / :data:`VAE_RENAMES`;
* transformers CLIP (:func:`convert_clip_state_dict`): by the owning module's name;
* diffusers SD3 MMDiT (:func:`convert_mmdit_state_dict`): as the UNet, after the renames of
  :data:`MMDIT_RENAMES`, plus the position table kept as stored;
* transformers T5 encoder (:func:`convert_t5_state_dict`): by the owning module's name,
  with the tied token embedding (``shared`` / ``encoder.embed_tokens``) read from either;
* transformers DINOv2 (:func:`convert_dinov2_state_dict`): by the owning module's name,
  after the legacy renames of :data:`DINOV2_RENAMES` and the split of the fused SwiGLU
  ``weights_in``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from jaxdiv import validation
from jaxdiv.models.checkpoint import config_field

__all__ = [
    "DINOV2_RENAMES",
    "MMDIT_RENAMES",
    "UNET_RENAMES",
    "VAE_RENAMES",
    "WEIGHT_RULES",
    "conv_kernel",
    "convert_clip_state_dict",
    "convert_dinov2_state_dict",
    "convert_mmdit_state_dict",
    "convert_t5_state_dict",
    "convert_torch_weights",
    "convert_unet_state_dict",
    "convert_vae_state_dict",
    "convert_weight",
    "fits",
    "linear_kernel",
]


# --------------------------------------------------------------------------- layouts


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kH, kW) -> Flax ``nnx.Conv`` kernel (kH, kW, I, O).

    Args:
        w: 4-d array in PyTorch OIHW layout.

    Returns:
        The HWIO array (a transposed view).

    Example:
        >>> import numpy as np
        >>> conv_kernel(np.zeros((8, 3, 5, 7))).shape
        (5, 7, 3, 8)
    """
    w = np.asarray(w)
    if w.ndim != 4:
        raise ValueError(f"conv_kernel: w must be 4-d (O, I, kH, kW), got shape {w.shape}")
    return w.transpose(2, 3, 1, 0)


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight (out, in) -> Flax ``nnx.Linear`` kernel (in, out).

    A 1x1 conv weight (out, in, 1, 1) is accepted too (SD1 transformer ``proj_in`` is a
    1x1 conv in one checkpoint family and a linear layer in another).

    Args:
        w: 2-d array (out, in) or 4-d (out, in, 1, 1).

    Returns:
        The (in, out) array.

    Example:
        >>> import numpy as np
        >>> linear_kernel(np.zeros((8, 3))).shape
        (3, 8)
    """
    w = np.asarray(w)
    if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise ValueError(
            f"linear_kernel: w must be 2-d (out, in) or (out, in, 1, 1), got shape {w.shape}"
        )
    return w.T


def _pointwise_conv_kernel(w: np.ndarray) -> np.ndarray:
    # a linear weight (out, in) serving a 1x1 conv (SD1 transformer projections saved by
    # a linear-projection checkpoint) becomes (out, in, 1, 1) first
    return conv_kernel(w[:, :, None, None] if np.ndim(w) == 2 else w)


def _unchanged(w: np.ndarray) -> np.ndarray:
    return w


# kind of the owning layer -> (nnx leaf name, layout function) for its PyTorch ``weight``
WEIGHT_RULES: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "conv": ("kernel", _pointwise_conv_kernel),
    "linear": ("kernel", linear_kernel),
    "norm": ("scale", _unchanged),
    "embedding": ("embedding", _unchanged),
}


def fits(kind: str, w: np.ndarray) -> bool:
    """Whether ``w``'s rank fits the layout rule of ``kind`` (:data:`WEIGHT_RULES`): a
    converter keeps a weight that does not fit under its PyTorch name, so that
    :func:`~jaxdiv.models.checkpoint.assign_params` reports it (as unexpected, its
    converted name as missing) instead of a layout function failing on it.

    Example:
        >>> fits("linear", np.zeros((3, 2))), fits("linear", np.zeros((3, 2, 2)))
        (True, False)
    """
    shape = np.shape(w)
    if kind == "linear":
        return len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1))
    if kind == "conv":
        return len(shape) in (2, 4)
    return True


def convert_weight(module: str, kind: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    """The nnx path and array of the ``weight`` of ``module``, a layer of the given kind.

    Args:
        module: the module path (``"down_blocks.0.resnets.0.conv1"``).
        kind: a key of :data:`WEIGHT_RULES` (``"conv"``, ``"linear"``, ``"norm"``,
            ``"embedding"``).
        w: the PyTorch weight.

    Returns:
        ``(nnx_path, array)``.

    Example:
        >>> import numpy as np
        >>> name, k = convert_weight("mid.proj", "linear", np.zeros((3, 2)))
        >>> name, k.shape
        ('mid.proj.kernel', (2, 3))
    """
    leaf, layout = WEIGHT_RULES[kind]
    return f"{module}.{leaf}", layout(w)


# --------------------------------------------------------------------------- diffusers

# diffusers' attention projections are linear whatever their rank (old VAE checkpoints
# store them as 1x1 convs)
_LINEAR_ONLY = frozenset({"to_q", "to_k", "to_v", "to_out"})


def convert_torch_weights(
    state_dict: dict[str, Any],
    *,
    renames: tuple[tuple[str, str], ...] = (),
    linear_modules: Callable[[str], bool] = lambda module: False,
    conv_modules: Callable[[str], bool] = lambda module: False,
) -> dict[str, Any]:
    """Map a diffusers state dict to ``{nnx_path: array}`` for :mod:`~jaxdiv.models.layers` modules.

    Rules, applied to every tensor:

    1. ``renames``: ``(old, new)`` substrings replaced in ``"." + key`` (in order), e.g.
       ``(".to_out.0.", ".to_out.")``.
    2. ``bias`` keeps its name and layout.
    3. ``weight`` of rank 1 is a norm affine scale -> ``scale``.
    4. ``weight`` of a module whose name is ``to_q/to_k/to_v/to_out``, or for which
       ``linear_modules(module_path)`` is true, is a linear weight (a ``(out, in, 1, 1)``
       1x1-conv weight is squeezed) -> ``kernel`` ``(in, out)``.
    5. ``weight`` for which ``conv_modules(module_path)`` is true is a conv weight (a 2-d
       linear weight becomes a 1x1 conv) -> ``kernel`` ``(kH, kW, in, out)``.
    6. any other ``weight``: rank 4 -> conv kernel (OIHW -> HWIO), rank 2 -> linear
       kernel (transposed).
    7. anything else (a name that is neither a weight nor a bias, a weight whose rank
       fits no rule) keeps its PyTorch name; :func:`~jaxdiv.models.checkpoint.assign_params`
       then reports it as unexpected (and the tensor the model wanted as missing).

    Args:
        state_dict: PyTorch names -> numpy arrays.
        renames: ordered substring renames.
        linear_modules: predicate on the renamed module path forcing rule 4.
        conv_modules: predicate on the renamed module path forcing rule 5.

    Returns:
        nnx path -> numpy array.

    Example:
        >>> import numpy as np
        >>> sd = {"a.to_out.0.weight": np.zeros((3, 2)), "a.norm.weight": np.ones(3)}
        >>> out = convert_torch_weights(sd, renames=((".to_out.0.", ".to_out."),))
        >>> sorted((k, v.shape) for k, v in out.items())
        [('a.norm.scale', (3,)), ('a.to_out.kernel', (2, 3))]
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = "." + key
        for old, new in renames:
            name = name.replace(old, new)
        name = name[1:]
        module, _, leaf = name.rpartition(".")
        if leaf == "bias":
            out[name] = value
            continue
        ndim = len(np.shape(value))
        if leaf != "weight":
            kind = None
        elif ndim == 1:
            kind = "norm"
        elif module.rpartition(".")[2] in _LINEAR_ONLY or linear_modules(module):
            kind = "linear"
        elif conv_modules(module) or ndim == 4:
            kind = "conv"
        elif ndim == 2:
            kind = "linear"
        else:
            kind = None
        if kind is None or not fits(kind, value):
            out[key] = value  # rule 7: reported by assign_params
            continue
        new_name, new_value = convert_weight(module, kind, value)
        out[new_name] = new_value
    return out


# diffusers name -> nnx name (substring rules on "." + key, applied in order).
UNET_RENAMES: tuple[tuple[str, str], ...] = (
    (".to_out.0.", ".to_out."),
    (".ff.net.0.", ".ff.geglu."),
    (".ff.net.2.", ".ff.proj_out."),
    (".downsamplers.0.", ".downsampler."),
    (".upsamplers.0.", ".upsampler."),
)

# diffusers name -> nnx name, as UNET_RENAMES. The query/key/value/proj_attn names are the
# pre-0.14 attention-block layout that diffusers still converts on load
# (ModelMixin._fix_state_dict_keys_on_load); some released VAE checkpoints use it.
VAE_RENAMES: tuple[tuple[str, str], ...] = (
    (".to_out.0.", ".to_out."),
    (".query.", ".to_q."),
    (".key.", ".to_k."),
    (".value.", ".to_v."),
    (".proj_attn.", ".to_out."),
    (".downsamplers.0.", ".downsampler."),
    (".upsamplers.0.", ".upsampler."),
)


def convert_unet_state_dict(state_dict: dict, config: dict) -> dict:
    """Convert a diffusers ``UNet2DConditionModel`` state dict to the UNet port's nnx paths.

    Rules (see :func:`convert_torch_weights`): conv ``weight`` OIHW -> ``kernel`` HWIO;
    linear ``weight`` -> ``kernel`` transposed; norm ``weight`` -> ``scale``; renames in
    :data:`UNET_RENAMES`. Transformer ``proj_in``/``proj_out`` follow
    ``use_linear_projection`` (a 1x1-conv weight is squeezed for a linear projection and a
    linear weight expanded for a conv projection).

    Args:
        state_dict: PyTorch parameter name -> array.
        config: the diffusers config dict.

    Returns:
        nnx path -> array.

    Example:
        >>> import numpy as np
        >>> sd = {"conv_in.weight": np.zeros((32, 4, 3, 3)), "conv_in.bias": np.zeros(32)}
        >>> sorted((k, v.shape) for k, v in convert_unet_state_dict(sd, {}).items())
        [('conv_in.bias', (32,)), ('conv_in.kernel', (3, 3, 4, 32))]
    """
    linear = config_field(config, "use_linear_projection", False, validation.boolean)

    def is_proj(module: str) -> bool:
        # "<block>.attentions.<j>.proj_in": the Transformer2DModel's own projections only.
        parts = module.split(".")
        return (
            len(parts) >= 3 and parts[-3] == "attentions" and parts[-1] in ("proj_in", "proj_out")
        )

    return convert_torch_weights(
        state_dict,
        renames=UNET_RENAMES,
        linear_modules=lambda m: linear and is_proj(m),
        conv_modules=lambda m: (not linear) and is_proj(m),
    )


def convert_vae_state_dict(state_dict: dict, config: dict) -> dict:
    """Convert a diffusers ``AutoencoderKL`` state dict to the VAE port's nnx paths.

    Rules (see :func:`convert_torch_weights`): conv ``weight`` OIHW -> ``kernel`` HWIO;
    linear ``weight`` -> ``kernel`` transposed (attention projections stored as 1x1 convs
    are squeezed); norm ``weight`` -> ``scale``; renames in :data:`VAE_RENAMES`.

    Args:
        state_dict: PyTorch parameter name -> array.
        config: the diffusers config dict (unused: the rules do not depend on it).

    Returns:
        nnx path -> array.

    Example:
        >>> import numpy as np
        >>> sd = {"encoder.mid_block.attentions.0.query.weight": np.zeros((8, 8, 1, 1))}
        >>> list(convert_vae_state_dict(sd, {}))
        ['encoder.mid_block.attentions.0.to_q.kernel']
    """
    del config
    return convert_torch_weights(state_dict, renames=VAE_RENAMES)


# --------------------------------------------------------------------------- CLIP

# transformers' CLIP module names -> the kind of their ``weight``
_CLIP_KINDS: dict[str, str] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"), "linear"),
    **dict.fromkeys(("text_projection", "visual_projection"), "linear"),
    **dict.fromkeys(
        ("layer_norm1", "layer_norm2", "final_layer_norm", "pre_layrnorm", "post_layernorm"),
        "norm",
    ),
    **dict.fromkeys(("token_embedding", "position_embedding"), "embedding"),
    "patch_embedding": "conv",
}


def _convert_clip_tensor(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    module, _, leaf = name.rpartition(".")
    kind = _CLIP_KINDS.get(module.rpartition(".")[2]) if module and leaf == "weight" else None
    if kind is not None and fits(kind, value):
        return convert_weight(module, kind, value)
    # biases, class_embedding and anything unknown (or of a rank no rule fits) keep their
    # name; unknown names are then reported as unexpected by assign_params.
    return name, value


def convert_clip_state_dict(
    state_dict: dict[str, np.ndarray], *, tower: str, with_projection: bool
) -> dict[str, np.ndarray]:
    """Map a transformers CLIP state dict onto the nnx parameter paths of the CLIP port.

    Per tensor name:

    * ``*_proj.weight``, ``fc1/fc2.weight``, ``text_projection/visual_projection.weight``
      -> ``kernel`` transposed (:func:`linear_kernel`);
    * ``layer_norm1/2``, ``final_layer_norm``, ``pre_layrnorm`` (sic, the checkpoint
      name), ``post_layernorm``: ``weight`` -> ``scale``;
    * ``token_embedding/position_embedding.weight`` -> ``embedding``;
    * ``patch_embedding.weight`` (O, I, p, p) -> ``kernel`` (p, p, I, O);
    * ``*.position_ids`` buffers (saved by older transformers) are dropped;
    * a ``text_model.`` prefix is stripped for the bare text model (transformers 4 saved
      one, transformers 5 does not); from a full ``CLIPModel`` folder only the requested
      tower's tensors are kept (``logit_scale`` and the other tower are dropped).

    Args:
        state_dict: PyTorch names -> arrays (from
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        tower: ``"text"`` or ``"vision"``.
        with_projection: target is the ``...WithProjection`` class.

    Returns:
        ``{nnx_path: array}`` for :func:`~jaxdiv.models.checkpoint.assign_params`.

    Example:
        >>> import numpy as np
        >>> sd = {"text_model.final_layer_norm.weight": np.ones(4),
        ...       "text_projection.weight": np.zeros((3, 4))}
        >>> out = convert_clip_state_dict(sd, tower="text", with_projection=True)
        >>> sorted(out), out["text_projection.kernel"].shape
        (['text_model.final_layer_norm.scale', 'text_projection.kernel'], (4, 3))
    """
    if tower not in ("text", "vision"):
        raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
    towers = {
        "text": ("text_model.", "text_projection."),
        "vision": ("vision_model.", "visual_projection."),
    }
    prefix, projection = towers[tower]
    other = towers["vision" if tower == "text" else "text"]
    out = {}
    for name, value in state_dict.items():
        if name.endswith("position_ids") or name == "logit_scale" or name.startswith(other):
            continue  # buffers and the other tower of a full CLIPModel checkpoint
        if with_projection:
            if not (name.startswith(prefix) or name.startswith(projection)):
                name = prefix + name  # a bare-tower checkpoint loaded into the wrapper
        else:
            if name.startswith(projection):
                continue  # full CLIPModel folder loaded as a bare tower
            if name.startswith(prefix):
                name = name[len(prefix) :]
        new_name, new_value = _convert_clip_tensor(name, value)
        out[new_name] = new_value
    return out


# --------------------------------------------------------------------------- SD3 MMDiT

# diffusers SD3Transformer2DModel name -> nnx name (substring rules on "." + key, in order):
# Attention's output Linear sits at index 0 of a ModuleList with a Dropout; the GELU MLP's
# layers are net.0.proj / net.2 (in both ``ff`` and ``ff_context``).
MMDIT_RENAMES: tuple[tuple[str, str], ...] = (
    (".to_out.0.", ".to_out."),
    (".net.0.proj.", ".proj_in."),
    (".net.2.", ".proj_out."),
)


def convert_mmdit_state_dict(state_dict: dict, config: dict) -> dict:
    """Convert a diffusers ``SD3Transformer2DModel`` state dict to the MMDiT port's nnx paths.

    Rules (see :func:`convert_torch_weights`): the patchify conv ``pos_embed.proj.weight``
    OIHW -> ``kernel`` HWIO; linear ``weight`` -> ``kernel`` transposed; q/k RMSNorm
    ``weight`` (rank 1) -> ``scale``; renames in :data:`MMDIT_RENAMES`. The position table
    ``pos_embed.pos_embed`` ``(1, M*M, D)`` (a persistent buffer in diffusers, present when
    ``pos_embed_max_size`` is set) keeps its name and layout.

    Args:
        state_dict: PyTorch parameter name -> array.
        config: the diffusers config dict (unused: the rules do not depend on it).

    Returns:
        nnx path -> array.

    Example:
        >>> import numpy as np
        >>> sd = {"transformer_blocks.0.ff.net.0.proj.weight": np.zeros((64, 16)),
        ...       "transformer_blocks.0.attn.to_out.0.bias": np.zeros(16),
        ...       "pos_embed.pos_embed": np.zeros((1, 36, 16))}
        >>> sorted((k, v.shape) for k, v in convert_mmdit_state_dict(sd, {}).items())
        ... # doctest: +NORMALIZE_WHITESPACE
        [('pos_embed.pos_embed', (1, 36, 16)),
         ('transformer_blocks.0.attn.to_out.bias', (16,)),
         ('transformer_blocks.0.ff.proj_in.kernel', (16, 64))]
    """
    del config
    tensors = dict(state_dict)
    table = tensors.pop("pos_embed.pos_embed", None)
    out = convert_torch_weights(tensors, renames=MMDIT_RENAMES)
    if table is not None:
        out["pos_embed.pos_embed"] = table
    return out


# --------------------------------------------------------------------------- T5 encoder

# transformers' T5 module names -> the kind of their ``weight`` (T5 has no biases)
_T5_KINDS: dict[str, str] = {
    **dict.fromkeys(("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"), "linear"),
    **dict.fromkeys(("layer_norm", "final_layer_norm"), "norm"),
    **dict.fromkeys(("relative_attention_bias", "shared"), "embedding"),
}


def convert_t5_state_dict(state_dict: dict[str, np.ndarray], config: dict) -> dict:
    """Map a transformers T5 state dict onto the nnx paths of :class:`~jaxdiv.models.t5.T5EncoderModel`.

    Per tensor name:

    * ``q/k/v/o``, ``wi``, ``wi_0/wi_1``, ``wo`` ``.weight`` -> ``kernel`` transposed
      (:func:`linear_kernel`);
    * ``layer_norm``, ``final_layer_norm`` ``.weight`` -> ``scale``;
    * ``relative_attention_bias.weight`` and ``shared.weight`` -> ``embedding``;
    * the token embedding is tied: ``shared.weight`` is used when present, otherwise
      ``encoder.embed_tokens.weight`` (``save_pretrained`` may store either one, released
      checkpoints often both); the other copy is dropped;
    * ``decoder.*`` and ``lm_head.*`` (a full ``T5ForConditionalGeneration`` folder) are
      dropped, as transformers' ``T5EncoderModel`` ignores them;
    * anything else keeps its name (and is then reported by
      :func:`~jaxdiv.models.checkpoint.assign_params` as unexpected).

    Args:
        state_dict: PyTorch names -> arrays (from
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        config: the transformers config dict (unused: the rules do not depend on it).

    Returns:
        ``{nnx_path: array}``.

    Example:
        >>> import numpy as np
        >>> sd = {"encoder.embed_tokens.weight": np.zeros((10, 4)),
        ...       "encoder.block.0.layer.1.DenseReluDense.wo.weight": np.zeros((4, 6)),
        ...       "encoder.final_layer_norm.weight": np.ones(4)}
        >>> sorted((k, v.shape) for k, v in convert_t5_state_dict(sd, {}).items())
        [('encoder.block.0.layer.1.DenseReluDense.wo.kernel', (6, 4)), ('encoder.final_layer_norm.scale', (4,)), ('shared.embedding', (10, 4))]
    """  # noqa: E501
    del config
    tensors = {k: v for k, v in state_dict.items()
               if not k.startswith(("decoder.", "lm_head."))}  # fmt: skip
    tied = tensors.pop("encoder.embed_tokens.weight", None)
    if tied is not None and "shared.weight" not in tensors:
        tensors["shared.weight"] = tied
    out = {}
    for name, value in tensors.items():
        module, _, leaf = name.rpartition(".")
        kind = _T5_KINDS.get(module.rpartition(".")[2]) if leaf == "weight" else None
        if kind is None or not fits(kind, value):
            out[name] = value
        else:
            new_name, new_value = convert_weight(module, kind, value)
            out[new_name] = new_value
    return out


# --------------------------------------------------------------------------- DINOv2

# released facebook/dinov2-* (and transformers' save_pretrained) layout -> transformers 5's
# module names, which the port uses (substring rules on "." + key, in order)
DINOV2_RENAMES: tuple[tuple[str, str], ...] = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".mlp.weights_out.", ".mlp.down_proj."),
)

# transformers' DINOv2 module names -> the kind of their ``weight``
_DINOV2_KINDS: dict[str, str] = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"), "linear"),
    **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "linear"),
    **dict.fromkeys(("norm1", "norm2", "layernorm"), "norm"),
    "projection": "conv",
}


def convert_dinov2_state_dict(
    state_dict: dict[str, np.ndarray], config: dict | None = None
) -> dict:
    """Map a transformers DINOv2 state dict onto the nnx paths of :class:`~jaxdiv.models.dinov2.Dinov2Model`.

    Per tensor name (legacy names are those of the released ``facebook/dinov2-*`` files,
    which transformers 5 still writes with ``save_pretrained``):

    * legacy ``attention.attention.query/key/value`` and ``attention.output.dense`` ->
      ``attention.q_proj/k_proj/v_proj/o_proj`` (:data:`DINOV2_RENAMES`);
    * legacy fused SwiGLU ``mlp.weights_in`` ``(2f, d)`` -> ``mlp.gate_proj`` (first
      half) and ``mlp.up_proj`` (second half), as transformers' ``Chunk(dim=0)``;
      ``mlp.weights_out`` -> ``mlp.down_proj``;
    * linear ``weight`` -> ``kernel`` transposed; ``norm1/norm2/layernorm.weight`` ->
      ``scale``; ``patch_embeddings.projection.weight`` (O, I, p, p) -> ``kernel``
      (p, p, I, O); ``cls_token``, ``position_embeddings``, ``lambda1`` and biases keep
      name and layout;
    * ``embeddings.mask_token`` (pre-training only) is dropped; so are a
      ``Dinov2ForImageClassification``'s ``classifier.*``, after its ``dinov2.`` prefix is
      stripped;
    * anything else keeps its name (and is then reported by
      :func:`~jaxdiv.models.checkpoint.assign_params` as unexpected).

    Args:
        state_dict: PyTorch names -> arrays (from
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        config: the transformers config dict (unused: the rules do not depend on it).

    Returns:
        ``{nnx_path: array}``.

    Example:
        >>> import numpy as np
        >>> sd = {"encoder.layer.0.attention.attention.query.weight": np.zeros((4, 6)),
        ...       "encoder.layer.0.mlp.weights_in.bias": np.arange(4.0),
        ...       "embeddings.mask_token": np.zeros((1, 6))}
        >>> out = convert_dinov2_state_dict(sd)
        >>> sorted((k, v.shape) for k, v in out.items())  # doctest: +NORMALIZE_WHITESPACE
        [('encoder.layer.0.attention.q_proj.kernel', (6, 4)),
         ('encoder.layer.0.mlp.gate_proj.bias', (2,)),
         ('encoder.layer.0.mlp.up_proj.bias', (2,))]
    """  # noqa: E501
    del config
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith("dinov2."):
            key = key[len("dinov2.") :]
        elif key.startswith("classifier."):
            continue
        if key == "embeddings.mask_token":
            continue
        name = "." + key
        for old, new in DINOV2_RENAMES:
            name = name.replace(old, new)
        name = name[1:]
        module, _, leaf = name.rpartition(".")
        if module.endswith(".mlp.weights_in") and (leaf != "weight" or fits("linear", value)):
            # torch.chunk(2, dim=0): the first part takes the ceiling of an odd length
            half = -(-np.shape(value)[0] // 2)
            parent = module[: -len("weights_in")]
            parts = {"gate_proj": value[:half], "up_proj": value[half:]}
            for sub, part in parts.items():
                if leaf == "weight":
                    new_name, new_value = convert_weight(parent + sub, "linear", part)
                    out[new_name] = new_value
                else:
                    out[f"{parent}{sub}.{leaf}"] = part
            continue
        kind = _DINOV2_KINDS.get(module.rpartition(".")[2]) if leaf == "weight" else None
        if kind is not None and fits(kind, value):
            new_name, new_value = convert_weight(module, kind, value)
            out[new_name] = new_value
        else:
            out[name] = value
    return out
