"""Loading PyTorch (diffusers / transformers) checkpoints into Flax nnx modules.

Everything here reads **local** folders only; there is no network access anywhere.

A component folder (``unet/``, ``vae/``, ``text_encoder/``, ...) holds a ``config.json``
and its weights:

* ``*.safetensors`` (one file), or shards listed in ``*.safetensors.index.json`` (a
  variant's in ``*.safetensors.index.<variant>.json``; every listed shard must exist and
  hold the tensors the index says it holds);
* pickled ``*.bin`` / ``*.pt`` / ``*.ckpt`` files are **refused** unless the caller passes
  ``allow_pickle=True`` (then read with ``torch.load(weights_only=True)``).

The tensors read here keep their PyTorch names and layouts; a converter from
:mod:`jaxdiv.models.conversion` maps them to the module's nnx paths (``"."``-joined state
paths such as ``"down_blocks.0.resnets.1.conv1.kernel"``).

:func:`assign_params` then compares the converted dict with the module's own parameter
tree and reports **all** missing, unexpected and mis-shaped tensors by name in a single
:class:`CheckpointError`, before anything is modified.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxdiv import validation

__all__ = [
    "CheckpointError",
    "CheckpointTypeError",
    "path_problem",
    "assign_params",
    "config_field",
    "config_list",
    "float_dtype",
    "load_component",
    "load_state_dict",
    "local_only_hint",
    "read_config",
    "read_model_index",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# safetensors dtype tags -> numpy dtypes (bf16 / fp8 via ml_dtypes, which numpy lacks).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# How many names an error message lists per category before summarising the rest.
_MAX_NAMES = 50


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or does not match the model.

    The message always names the folder or component and the offending files/tensors.

    Example:
        >>> err = CheckpointError("unet: missing tensors (1): conv_in.kernel")
        >>> isinstance(err, ValueError)
        True
    """


class CheckpointTypeError(CheckpointError, TypeError):
    """A config value of the wrong type, reported with its file: a :class:`CheckpointError`
    that is still the ``TypeError`` the config check raised.

    Example:
        >>> isinstance(CheckpointTypeError("x"), TypeError | CheckpointError)
        True
    """


def path_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be opened although an entry may exist, or None.

    Distinguishes a dangling symbolic link (naming its target), a symlink loop and a
    permission problem from a plain missing entry, so errors do not claim that a folder
    or file is missing when the entry exists but points nowhere.

    Example:
        >>> import os, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> os.symlink("gone", d / "unet")
        >>> path_problem(d / "unet")
        "is a dangling symbolic link (its target 'gone' does not exist)"
        >>> path_problem(d) is None
        True
    """
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return (f"is a dangling symbolic link (its target {os.readlink(path)!r} does not "
                    "exist)")  # fmt: skip
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop (the link resolves to itself)"
        return f"cannot be accessed ({err.strerror or err})"
    return None


# "owner/name" as the hub spells a repository id (a relative path of two parts)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def local_only_hint(path: str | os.PathLike) -> str:
    """A hint for a missing folder whose name looks like a hub id (``owner/name``): jaxdiv
    reads local folders only. Empty for any other path.

    Example:
        >>> local_only_hint("stabilityai/stable-diffusion-2-1")[:46]
        '; jaxdiv reads local folders only, never a hub'
        >>> local_only_hint("/data/sd/unet")
        ''
    """
    text = os.fspath(path)
    if not _HUB_ID.fullmatch(text) or os.path.exists(text):
        return ""
    return ("; jaxdiv reads local folders only, never a hub: download the model first "
            f"(huggingface-cli download {text} --local-dir DIR, or "
            f"huggingface_hub.snapshot_download({text!r})) and pass that folder")  # fmt: skip


def _missing(path: Path, what: str, kind: str = "does not exist or is not a directory") -> str:
    problem = path_problem(path)
    return f"{what} {str(path)!r} {problem or kind}" + ("" if problem else local_only_hint(path))


def _as_folder(folder: str | os.PathLike, what: str = "component folder") -> Path:
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"folder must be a str or os.PathLike path, got {type(folder).__name__}")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(_missing(path, what))
    return path


# dtypes the loaders accept for weights and compute
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def float_dtype(name: str, value: Any) -> np.dtype | None:
    """``value`` as a floating dtype a model can be loaded in, or None for None.

    Accepts ``jnp.float32``, ``jnp.bfloat16``, ``jnp.float16`` and ``jnp.float64`` (only
    with 64-bit JAX enabled: otherwise JAX would silently give float32), as dtype objects,
    scalar types or names.

    Example:
        >>> float_dtype("dtype", "bfloat16")
        dtype(bfloat16)
        >>> float_dtype("dtype", jnp.int32)
        Traceback (most recent call last):
        ...
        TypeError: dtype must be a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16 or jnp.float64), got int32
    """  # noqa: E501
    if value is None:
        return None
    want = "a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16 or jnp.float64)"
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise TypeError(f"{name} must be {want}, got {type(value).__name__} "
                        f"{value!r}") from None  # fmt: skip
    if isinstance(value, bool) or dt.name not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be {want}, got {dt.name}")
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(f"{name}={dt.name} needs 64-bit JAX (jax.config.update("
                         "'jax_enable_x64', True) or `with jax.enable_x64(True)`), got it "
                         "disabled: the weights would silently be float32")  # fmt: skip
    return dt


def config_field(config: Mapping, key: str, default: Any, check: Callable, **kwargs) -> Any:
    """``config[key]`` (``default`` when absent) checked by a :mod:`jaxdiv.validation`
    function (``validation.boolean``, ``integer``, ``number``, ...) under the name
    ``config['key']``, so a bad value is named with what was expected and what came.

    Example:
        >>> config_field({"use_linear_projection": "false"}, "use_linear_projection", False,
        ...              validation.boolean)
        Traceback (most recent call last):
        ...
        TypeError: config['use_linear_projection'] must be a bool, got str 'false'
        >>> config_field({}, "norm_eps", 1e-5, validation.number, lo=0, lo_open=True)
        1e-05
    """
    return check(f"config[{key!r}]", config.get(key, default), **kwargs)


def config_list(config: Mapping, key: str, default: Any) -> tuple:
    """``config[key]`` (``default`` when absent) as a tuple, refusing anything that is not
    a JSON list (a string would otherwise be split into characters).

    Example:
        >>> config_list({"down_block_types": "DownBlock2D"}, "down_block_types", ())
        Traceback (most recent call last):
        ...
        TypeError: config['down_block_types'] must be a list, got str 'DownBlock2D'
    """
    value = config.get(key, default)
    if not isinstance(value, list | tuple):
        raise TypeError(f"config[{key!r}] must be a list, got {type(value).__name__} {value!r}")
    return tuple(value)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        problem = path_problem(path)
        if problem:
            raise CheckpointError(f"{what}: {str(path)!r} {problem}")
        raise CheckpointError(f"{what}: {path.name} not found in {str(path.parent)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what}: {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{what}: {str(path)!r} must hold a JSON object, got {type(data).__name__}"
        )
    return data


def read_config(folder: str | os.PathLike) -> dict:
    """Read ``config.json`` of a diffusers/transformers component folder.

    Args:
        folder: a local component folder (e.g. ``.../stable-diffusion-2-1/unet``).

    Returns:
        The parsed config as a dict.

    Raises:
        CheckpointError: folder or ``config.json`` missing, or not a JSON object.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text(json.dumps({"in_channels": 4}))
        >>> read_config(d)["in_channels"]
        4
    """
    path = _as_folder(folder)
    return _read_json(path / "config.json", f"component folder {str(path)!r}")


def read_model_index(folder: str | os.PathLike) -> dict:
    """Read ``model_index.json`` of a diffusers pipeline folder.

    Args:
        folder: a local pipeline folder (holding ``model_index.json`` and component folders).

    Returns:
        The parsed index (component name -> ``[library, class]`` plus ``_class_name`` ...).

    Raises:
        CheckpointError: folder or ``model_index.json`` missing or invalid.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> idx = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
        >>> _ = (d / "model_index.json").write_text(json.dumps(idx))
        >>> read_model_index(d)["unet"]
        ['diffusers', 'UNet2DConditionModel']
    """  # noqa: E501
    path = _as_folder(folder, "pipeline folder")
    return _read_json(path / "model_index.json", f"pipeline folder {str(path)!r}")


_FLOAT_TAGS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _header_entry(path: Path, name: str, info) -> tuple:
    """``(tag, shape, begin, end)`` of one safetensors header entry, or a CheckpointError
    naming the file, the tensor and what is wrong with the entry."""
    where = f"{str(path)!r}: header entry {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} must be an object with dtype, shape and "
                              f"data_offsets, got {type(info).__name__} {info!r:.80}")  # fmt: skip
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)} (has {sorted(info)})")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if tag not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {tag!r}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(shape, list) or not all(is_int(v) for v in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, "
                              f"got {shape!r}")  # fmt: skip
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
            and offsets[0] <= offsets[1]):  # fmt: skip
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with "
                              f"0 <= begin <= end, got {offsets!r}")  # fmt: skip
    return tag, tuple(shape), offsets[0], offsets[1]


def _non_finite(arr: np.ndarray) -> int:
    """Number of NaN/inf entries of a floating array (bf16 / fp8 through ml_dtypes)."""
    if arr.dtype in (np.float64, np.float32, np.float16):
        return int(arr.size - np.count_nonzero(np.isfinite(arr)))
    return int(arr.size - np.count_nonzero(np.isfinite(arr.astype(np.float32))))


def _check_finite(path: Path, tensors: dict[str, np.ndarray]) -> None:
    bad = []
    for name, arr in tensors.items():
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype in (
                _SAFETENSORS_DTYPES["BF16"], _SAFETENSORS_DTYPES["F8_E4M3"],
                _SAFETENSORS_DTYPES["F8_E5M2"]):  # fmt: skip
            count = _non_finite(arr)
            if count:
                bad.append(f"{name} ({count} of {arr.size})")
    if bad:
        raise CheckpointError(
            f"{str(path)!r}: tensors with NaN or inf values: {_names(bad)} (a corrupt or "
            "diverged checkpoint; pass check_finite=False only for a folder you trust)"
        )


def _read_safetensors(path: Path, check_finite: bool = True) -> dict[str, np.ndarray]:
    """Parse one safetensors file (format: u64 header length, JSON header, raw data).

    Written out here rather than via ``safetensors.numpy`` because that cannot return
    bfloat16 tensors, which most released SD checkpoints in half precision use. Every
    header entry is validated (an object with a known dtype, a shape of non-negative
    ints and ``[begin, end]`` offsets matching it and the file); two entries whose byte
    ranges overlap are refused (one tensor's bytes read as another's); with
    ``check_finite`` floating tensors holding NaN/inf are reported by name.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{str(path)!r}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{str(path)!r}: corrupt safetensors header length {n}")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{str(path)!r}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r}: safetensors header must be a JSON object, got "
                              f"{type(header).__name__}")  # fmt: skip
    header.pop("__metadata__", None)
    start = 8 + n
    if not header:
        return {}
    entries = {name: _header_entry(path, name, info) for name, info in header.items()}
    ranges = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise CheckpointError(
                f"{str(path)!r}: header entries {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) "
                "point at overlapping bytes (a corrupt or hand-edited header)"
            )
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size - start,))
    out = {}
    for name, (tag, shape, begin, end) in entries.items():
        dt = _SAFETENSORS_DTYPES[tag]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if end - begin != nbytes or end > raw.shape[0] or begin < 0:
            raise CheckpointError(
                f"{str(path)!r}: tensor {name!r} byte range [{begin}, {end}) does not match "
                f"shape {shape} of {tag} or the file size (truncated file?)"
            )
        out[name] = np.array(raw[begin:end]).view(dt).reshape(shape)
    del raw
    if check_finite:
        _check_finite(path, out)
    return out


def _torch_to_numpy(name: str, tensor: Any, path: Path) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(
            f"{str(path)!r}: entry {name!r} is a {type(tensor).__name__}, not a tensor"
        )
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _read_pickled(path: Path, check_finite: bool = True) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"{str(path)!r}: reading pickled weights needs PyTorch, which is not installed "
            "(pip install 'jaxdiv[parity]'), or convert the file to safetensors"
        ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt / unsafe pickles
        raise CheckpointError(
            f"{str(path)!r}: torch.load(weights_only=True) failed: {err}"
        ) from err
    # Original SD .ckpt files nest the weights under "state_dict".
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{str(path)!r}: expected a state dict (mapping of name -> tensor), "
            f"got {type(obj).__name__}"
        )
    out = {str(k): _torch_to_numpy(str(k), v, path) for k, v in obj.items()}
    if check_finite:
        _check_finite(path, out)
    return out


def _merge(parts: list[tuple[Path, dict[str, np.ndarray]]], folder: Path) -> dict:
    merged: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    dupes = []
    for path, tensors in parts:
        for k, v in tensors.items():
            if k in merged:
                dupes.append(f"{k} ({origin[k].name} and {path.name})")
            merged[k] = v
            origin[k] = path
    if dupes:
        raise CheckpointError(
            f"{str(folder)!r}: tensors stored in more than one weight file: "
            + _names(dupes)
            + " (several variants in one folder? pass variant=...)"
        )
    return merged


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    if len(items) > _MAX_NAMES:
        shown += f", ... ({len(items) - _MAX_NAMES} more)"
    return shown


def _variant_of(name: str, suffix: str) -> str | None:
    """``model.fp16.safetensors`` -> ``fp16``; ``model-00001-of-00002.safetensors`` -> None."""
    stem = name[: -len(suffix)]
    if "." not in stem:
        return None
    variant = stem.rsplit(".", 1)[1]
    # variant shards are named ``model.fp16-00001-of-00002.safetensors``
    return variant.split("-", 1)[0]


# ``model.safetensors.index.json``, older ``model.fp16.safetensors.index.json`` and the
# ``model.safetensors.index.fp16.json`` that diffusers >= 0.28 and transformers 5 write
_INDEX = re.compile(r"(?P<stem>.+\.safetensors)\.index(?:\.(?P<variant>[^.]+))?\.json")


def _index_variant(name: str) -> tuple[bool, str | None]:
    """``(is a safetensors index file, its variant)`` of a file name.

    >>> _index_variant("model.safetensors.index.fp16.json"), _index_variant("a.safetensors")
    ((True, 'fp16'), (False, None))
    """
    m = _INDEX.fullmatch(name)
    if m is None:
        return False, None
    return True, m["variant"] or _variant_of(m["stem"], ".safetensors")


def _file_variant(name: str) -> tuple[bool, str | None]:
    """``(is a weight or index file, its variant)`` of a file name."""
    is_index, variant = _index_variant(name)
    if is_index:
        return True, variant
    for suffix in (".safetensors", *PICKLE_SUFFIXES):
        if name.endswith(suffix):
            return True, _variant_of(name, suffix)
    return False, None


def load_state_dict(
    folder: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    variant: str | None = None,
    check_finite: bool = True,
) -> dict[str, np.ndarray]:
    """Read all weights of a component folder into numpy arrays (PyTorch names and layouts).

    Safetensors only by default: a sharded checkpoint is read through its
    ``*.safetensors.index.json`` (``*.safetensors.index.<variant>.json`` for a variant;
    every listed shard must exist and hold its tensors),
    otherwise every ``*.safetensors`` file of the requested ``variant`` is read. Pickled
    ``*.bin``/``*.pt``/``*.ckpt`` files are used only when no safetensors exist and
    ``allow_pickle=True``; they are then read with ``torch.load(weights_only=True)``.
    Never touches the network.

    Args:
        folder: local component folder.
        allow_pickle: permit pickled PyTorch weight files (a pickle can run code on load;
            ``weights_only=True`` restricts that, but safetensors is the safe format).
        variant: weight-file variant such as ``"fp16"`` (``model.fp16.safetensors``);
            ``None`` reads the files without a variant tag.
        check_finite: refuse floating tensors holding NaN or inf, naming each tensor and
            file (one pass over the weights as they are read, about as fast as reading
            them); ``False`` skips it for a folder you trust.

    Returns:
        Mapping from PyTorch parameter name to numpy array (bf16 as ``ml_dtypes.bfloat16``).

    Raises:
        CheckpointError: folder missing, no weights, missing shard, only pickled files
            without ``allow_pickle``, duplicate tensors, corrupt files.

    Example:
        >>> import tempfile, numpy as np
        >>> from safetensors.numpy import save_file
        >>> d = tempfile.mkdtemp()
        >>> save_file({"w": np.ones((2, 3), np.float32)}, d + "/model.safetensors")
        >>> load_state_dict(d)["w"].shape
        (2, 3)
    """
    allow_pickle = validation.boolean("allow_pickle", allow_pickle)
    check_finite = validation.boolean("check_finite", check_finite)
    path = _as_folder(folder)
    if variant is not None and (not isinstance(variant, str) or not variant):
        raise TypeError(f"variant must be a non-empty str or None, got {variant!r}")
    files = sorted(p for p in path.iterdir() if p.is_file())
    st_suffix = ".safetensors"
    broken = [f"{p.name} ({problem})" for p in sorted(path.iterdir())
              if p.name.endswith((st_suffix, *PICKLE_SUFFIXES)) and not p.is_file()
              and (problem := path_problem(p))]  # fmt: skip
    if broken:
        raise CheckpointError(f"{str(path)!r}: weight files that cannot be read: "
                              + _names(broken))  # fmt: skip

    indexes = [p for p in files if _index_variant(p.name) == (True, variant)]
    singles = [p for p in files if p.name.endswith(st_suffix)]
    singles = [p for p in singles if _variant_of(p.name, st_suffix) == variant]

    if indexes:
        parts = []
        for index_path in indexes:
            index = _read_json(index_path, f"component folder {str(path)!r}")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    f"{str(index_path)!r}: no 'weight_map' object (tensor name -> shard file)"
                )
            shard_names = sorted(set(weight_map.values()))
            missing = [s + (f" ({p})" if (p := path_problem(path / s)) else "")
                       for s in shard_names if not (path / s).is_file()]  # fmt: skip
            if missing:
                raise CheckpointError(
                    f"{str(path)!r}: shard files listed in {index_path.name} are missing: "
                    + _names(missing)
                )
            for shard in shard_names:
                tensors = _read_safetensors(path / shard, check_finite)
                expected = sorted(k for k, s in weight_map.items() if s == shard)
                absent = [k for k in expected if k not in tensors]
                if absent:
                    raise CheckpointError(
                        f"{str(path / shard)!r}: tensors listed in {index_path.name} are "
                        "not in the shard: " + _names(absent)
                    )
                parts.append((path / shard, tensors))
        return _merge(parts, path)

    if singles:
        return _merge([(p, _read_safetensors(p, check_finite)) for p in singles], path)

    pickled = [
        p
        for p in files
        if p.name.endswith(PICKLE_SUFFIXES)
        and _variant_of(p.name, "." + p.name.rsplit(".", 1)[1]) == variant
    ]
    if pickled:
        if not allow_pickle:
            raise CheckpointError(
                f"{str(path)!r}: only pickled PyTorch weights found ("
                + _names([p.name for p in pickled])
                + "); pickled weights are refused because unpickling can execute code. "
                "Convert them to safetensors, or opt in with allow_pickle=True "
                "(read via torch.load(weights_only=True))."
            )
        # A sharded .bin checkpoint has a pytorch_model.bin.index.json; reading every
        # shard file present gives the same union.
        return _merge([(p, _read_pickled(p, check_finite)) for p in pickled], path)

    tag = f" with variant {variant!r}" if variant else ""
    others = sorted({v for ok, v in map(_file_variant, (p.name for p in files)) if ok} - {variant},
                    key=str)  # fmt: skip
    hint = " or ".join(f"variant={v!r}" for v in others)
    hint = f"; weight files of another variant are present: pass {hint}" if hint else ""
    raise CheckpointError(
        f"{str(path)!r}: no weight files{tag} found (expected *.safetensors, "
        f"*.safetensors.index.json, or pickled {'/'.join('*' + s for s in PICKLE_SUFFIXES)}); "
        f"files present: {_names([p.name for p in files]) or 'none'}{hint}"
    )


def _flat_params(model: nnx.Module, filter_: Any) -> dict[str, Any]:
    flat = nnx.to_flat_state(nnx.state(model, filter_))
    return {".".join(str(k) for k in path): var for path, var in flat}


def _is_abstract(value: Any) -> bool:
    return isinstance(value, jax.ShapeDtypeStruct)


def assign_params(
    model: nnx.Module,
    params: Mapping[str, Any],
    *,
    component: str,
    dtype: Any = None,
    filter: Any = nnx.Param,
    check_finite: bool = True,
) -> None:
    """Copy converted weights into an nnx module in place, after checking them all.

    Keys are the module's nnx state paths joined with ``"."``. Every missing, unexpected,
    mis-shaped and non-float tensor (an int or bool tensor where the model has a
    floating-point weight; it would otherwise be cast silently) is collected and reported
    in one :class:`CheckpointError` (expected vs got) before the model is touched. So are
    finite values that the cast to a narrower dtype turns into inf (``1e5`` in float16).

    Args:
        model: the nnx module (concrete, or abstract from ``nnx.eval_shape``).
        params: ``{nnx_path: array}`` from a converter.
        component: name used in error messages (e.g. the folder path or ``"unet"``).
        dtype: cast floating-point weights to this dtype (see :func:`float_dtype`);
            ``None`` keeps each parameter's dtype as declared by the model (its
            ``param_dtype``).
        filter: which nnx variables the checkpoint must cover (default: ``nnx.Param``).
        check_finite: refuse weights that overflow the dtype they are cast to; ``False``
            lets them become inf.

    Raises:
        CheckpointError: any missing / unexpected / mis-shaped tensor, or one that
            overflows its dtype.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> assign_params(lin, {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}, component="demo")
        >>> float(lin.kernel[...].sum())
        6.0
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping name -> array, got {type(params).__name__}")
    dtype = float_dtype("dtype", dtype)
    check_finite = validation.boolean("check_finite", check_finite)
    target = _flat_params(model, filter)
    missing = sorted(k for k in target if k not in params)
    unexpected = sorted(k for k in params if k not in target)
    mis_shaped, mis_typed = [], []
    for k in sorted(set(target) & set(params)):
        want = tuple(target[k].get_value().shape)
        got = tuple(np.shape(params[k]))
        if want != got:
            mis_shaped.append(f"{k} (expected {want}, got {got})")
        declared = target[k].get_value().dtype
        src = getattr(params[k], "dtype", None)
        src = np.asarray(params[k]).dtype if src is None else src
        if jnp.issubdtype(declared, jnp.floating) and not jnp.issubdtype(src, jnp.floating):
            mis_typed.append(f"{k} (expected floating point, got {src})")
    if missing or unexpected or mis_shaped or mis_typed:
        lines = [f"{component}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {_names(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {_names(unexpected)}")
        if mis_shaped:
            lines.append(f"  mis-shaped tensors ({len(mis_shaped)}): {_names(mis_shaped)}")
        if mis_typed:
            lines.append(f"  non-float tensors where the model has floating-point weights "
                         f"({len(mis_typed)}): {_names(mis_typed)}")  # fmt: skip
        raise CheckpointError("\n".join(lines))

    def out_dtype(declared):
        return declared if dtype is None or not jnp.issubdtype(declared, jnp.floating) else dtype

    if check_finite:
        overflows = {}
        for k, var in target.items():
            found = _overflow(params[k], out_dtype(var.get_value().dtype))
            if found:
                overflows.setdefault(found[0], []).append(f"{k} ({found[1]})")
        if overflows:
            parts = [f"to {dt} (max |x| {float(jnp.finfo(dt).max):.6g}): {_names(names)}"
                     for dt, names in overflows.items()]  # fmt: skip
            raise CheckpointError(
                f"{component}: finite weights overflow to inf when cast {'; '.join(parts)}; "
                "load in a wider dtype (float32 or bfloat16), or pass check_finite=False to "
                "accept inf weights"
            )

    with np.errstate(over="ignore"):  # overflow was refused above, or is accepted
        for k, var in target.items():
            value = params[k]
            src = np.asarray(value) if not isinstance(value, jax.Array) else value
            var.set_value(jnp.asarray(src, dtype=out_dtype(var.get_value().dtype)))


def _overflow(value: Any, dtype: Any) -> tuple[str, str] | None:
    """``(dtype name, "n of size, max |x| m")`` when casting the floating ``value`` to the
    floating ``dtype`` turns finite entries into inf; None otherwise (also for a cast that
    cannot overflow). One max/min pass over the tensor; the cast is only repeated for a
    tensor that may overflow."""
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    src = getattr(value, "dtype", None)
    if src is None:
        value = np.asarray(value)
        src = value.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(src, jnp.floating)):
        return None
    limit = float(jnp.finfo(dtype).max)
    if float(jnp.finfo(src).max) <= limit or np.size(value) == 0:
        return None
    xp = jnp if isinstance(value, jax.Array) else np
    with np.errstate(over="ignore", invalid="ignore"):
        peak = max(float(xp.max(value)), -float(xp.min(value)))
        if peak <= limit:  # False for a NaN source too: then the exact count decides
            return None
        finite = xp.isfinite(value)
        cast = value.astype(dtype)
        count = int(xp.count_nonzero(finite & ~xp.isfinite(cast)))
        if not count:
            return None
        biggest = float(xp.max(xp.abs(xp.where(finite, value, 0))))
    return jnp.dtype(dtype).name, f"{count} of {np.size(value)}, max |x| {biggest:.6g}"


def load_component(
    folder: str | os.PathLike,
    build_model: Callable[[dict], nnx.Module],
    convert: Callable[[dict[str, np.ndarray], dict], dict[str, Any]],
    *,
    allow_pickle: bool = False,
    dtype: Any = None,
    variant: str | None = None,
    check_finite: bool = True,
    kinds: tuple[str, ...] = (),
) -> tuple[nnx.Module, dict]:
    """Build an nnx module from a component folder's config and load its weights.

    Steps: :func:`read_config`; ``build_model(config)`` traced under ``nnx.eval_shape``
    (no random initialisation cost, even for a full-size UNet); :func:`load_state_dict`;
    ``convert(state_dict, config)`` to ``{nnx_path: array}``; :func:`assign_params`.

    Args:
        folder: local component folder.
        build_model: ``config -> nnx.Module`` (may use any rngs; it is only shape-traced).
        convert: ``(torch_state_dict, config) -> {nnx_path: array}``.
        allow_pickle: see :func:`load_state_dict`.
        dtype: cast floating-point weights to this dtype (``None``: model's param dtype;
            see :func:`float_dtype`).
        variant: weight-file variant, see :func:`load_state_dict`.
        check_finite: refuse weights holding NaN/inf (see :func:`load_state_dict`) or
            overflowing to inf in their dtype (see :func:`assign_params`).
        kinds: the models the loader builds, as the config names them (diffusers'
            ``_class_name``, transformers' ``model_type``): a config naming another is
            refused in one line (a VAE folder given to the UNet loader listed hundreds of
            missing tensors); a config without either name is taken.

    Returns:
        ``(model, config)``.

    Raises:
        CheckpointError: bad folder, a config ``build_model`` refuses (naming
            ``config.json``; also a TypeError when the value had the wrong type), weights
            that do not match, or model variables the checkpoint leaves uninitialised.

    Example:
        >>> import json, tempfile, pathlib, numpy as np
        >>> from flax import nnx
        >>> from safetensors.numpy import save_file
        >>> from jaxdiv.models.conversion import linear_kernel
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text(json.dumps({"in": 3, "out": 2}))
        >>> save_file({"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)},
        ...           str(d / "model.safetensors"))
        >>> build = lambda c: nnx.Linear(c["in"], c["out"], rngs=nnx.Rngs(0))
        >>> conv = lambda sd, c: {"kernel": linear_kernel(sd["weight"]), "bias": sd["bias"]}
        >>> lin, cfg = load_component(d, build, conv)
        >>> lin(np.ones((1, 3), np.float32)).tolist()
        [[3.0, 3.0]]
    """
    allow_pickle = validation.boolean("allow_pickle", allow_pickle)
    check_finite = validation.boolean("check_finite", check_finite)
    dtype = float_dtype("dtype", dtype)
    path = _as_folder(folder)
    config = read_config(path)
    field = "_class_name" if "_class_name" in config else "model_type"
    named = config.get(field)
    if kinds and isinstance(named, str) and named not in kinds:
        raise CheckpointError(f"{str(path / 'config.json')!r}: describes a {named!r} model "
                              f"(its {field}), not {' or '.join(map(repr, kinds))}; is this "
                              "the right folder?")  # fmt: skip
    try:
        model = nnx.eval_shape(lambda: build_model(config))
    except (TypeError, ValueError) as err:
        # config checks name the key (config['norm_eps'] ...); this names the file
        kind = CheckpointTypeError if isinstance(err, TypeError) else CheckpointError
        raise kind(f"{str(path / 'config.json')!r}: {err}") from err
    state_dict = load_state_dict(path, allow_pickle=allow_pickle, variant=variant,
                                 check_finite=check_finite)  # fmt: skip
    try:
        params = convert(state_dict, config)
    except KeyError as err:
        raise CheckpointError(
            f"{str(path)!r}: checkpoint lacks tensor {err.args[0]!r} needed by the converter"
        ) from err
    except CheckpointError:
        raise
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r}: cannot convert the checkpoint: {err}") from err
    assign_params(model, params, component=str(path), dtype=dtype, check_finite=check_finite)
    leftover = sorted(k for k, v in _flat_params(model, ...).items() if _is_abstract(v.get_value()))
    if leftover:
        raise CheckpointError(
            f"{str(path)!r}: model variables not covered by the checkpoint (still "
            f"uninitialised): {_names(leftover)}; keep inference modules free of rng state"
        )
    return model, config
