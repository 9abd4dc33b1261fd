"""Configs of the CLIP text and vision towers, parsed from transformers ``config.json`` dicts.

Both configs keep transformers 5's defaults and field names. ``from_dict`` accepts the
tower's own config or a full ``CLIPModel`` config (the tower is picked from
``text_config`` / ``vision_config``, the shared ``projection_dim`` from the top level) and
checks the fields the modules rely on.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxdiv import validation

__all__ = ["ACTIVATIONS", "CLIPTextConfig", "CLIPVisionConfig"]


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ``hidden_act`` names (ACT2FN) -> functions. Kept with the configs because
# the config check names the valid choices; the MLP looks its function up here.
ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _pick_sub_config(config: dict, key: str) -> dict:
    """A full ``CLIPModel`` config nests the towers; the shared projection is top level."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (parsed config.json), got {type(config).__name__}")
    if key in config and isinstance(config[key], dict):
        sub = dict(config[key])
        if "projection_dim" in config:
            sub["projection_dim"] = config["projection_dim"]
        return sub
    return config


# positive integer fields of either tower (the ones a tower has are checked)
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "projection_dim", "vocab_size", "max_position_embeddings", "num_channels",
          "image_size", "patch_size")  # fmt: skip


def _check_common(cfg) -> None:
    for name in _SIZES:
        if hasattr(cfg, name):
            validation.integer(f"CLIP config: {name}", getattr(cfg, name), minimum=1)
    if hasattr(cfg, "eos_token_id"):
        validation.integer("CLIP config: eos_token_id", cfg.eos_token_id, minimum=0)
    validation.number("CLIP config: layer_norm_eps", cfg.layer_norm_eps, lo=0, lo_open=True)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"CLIP config: hidden_size ({cfg.hidden_size}) must be divisible by "
            f"num_attention_heads ({cfg.num_attention_heads})"
        )
    validation.choice("CLIP config: hidden_act", cfg.hidden_act, sorted(ACTIVATIONS))


def _from_dict(cls, config: dict, key: str):
    """``cls`` from the tower's fields in ``config`` (``None`` keeps the default), checked."""
    sub = _pick_sub_config(config, key)
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in sub.items() if k in names and v is not None})
    _check_common(cfg)
    return cfg


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of the CLIP text tower (defaults are transformers 5's).

    Example:
        >>> CLIPTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4}).hidden_size
        64
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, config: dict) -> CLIPTextConfig:
        """Parse a transformers ``CLIPTextConfig`` (or full ``CLIPConfig``) dict.

        Example:
            >>> CLIPTextConfig.from_dict({"text_config": {"vocab_size": 10}}).vocab_size
            10
        """
        return _from_dict(cls, config, "text_config")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyperparameters of the CLIP vision tower (defaults are transformers 5's).

    Example:
        >>> CLIPVisionConfig.from_dict({"image_size": 32, "patch_size": 8}).num_patches
        16
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, config: dict) -> CLIPVisionConfig:
        """Parse a transformers ``CLIPVisionConfig`` (or full ``CLIPConfig``) dict.

        Example:
            >>> CLIPVisionConfig.from_dict({"vision_config": {"patch_size": 14}}).patch_size
            14
        """
        cfg = _from_dict(cls, config, "vision_config")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"CLIP vision config: image_size ({cfg.image_size}) must be a multiple of "
                f"patch_size ({cfg.patch_size})"
            )
        return cfg


def _as_config(config, cls):
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        return cls.from_dict(config)
    raise TypeError(f"config must be a {cls.__name__} or a dict, got {type(config).__name__}")
