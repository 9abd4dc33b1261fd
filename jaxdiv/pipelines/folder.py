"""Checks and lookups on a diffusers Stable Diffusion folder, before any weight is read.

:func:`check_pipeline_folder` reports every missing or unsupported component in one
:class:`~jaxdiv.models.checkpoint.CheckpointError`; the other functions find the scheduler
config, the optional image encoder and its preprocessing statistics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxdiv.models.checkpoint import (
    CheckpointError,
    _read_json,
    local_only_hint,
    path_problem,
    read_model_index,
)
from jaxdiv.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, channel_stats

__all__ = [
    "COMPONENTS",
    "check_pipeline_folder",
    "image_encoder_folder",
    "image_preprocess_stats",
    "read_scheduler_config",
]

# Required components -> the classes model_index.json may name for them.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": (),  # any diffusers scheduler class; only its config is read
}


def _entry_class(index: dict, name: str) -> str | None:
    """The class model_index.json names for a component, or None when absent / null."""
    entry = index.get(name)
    if isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def _tokenizer_files_missing(folder: Path, name: str, cls: str | None) -> str | None:
    """What a tokenizer folder lacks: CLIP needs vocab.json + merges.txt, T5 its
    SentencePiece model (spiece.model); either may come as one tokenizer.json instead."""
    if (folder / "tokenizer.json").is_file():
        return None
    if cls is not None and cls.startswith("T5"):
        return None if (folder / "spiece.model").is_file() else (
            f"{name}/spiece.model (and no tokenizer.json)")  # fmt: skip
    vocab = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if not vocab:
        return None
    return f"{name}/" + f" and {name}/".join(vocab) + " (and no tokenizer.json)"


def check_pipeline_folder(path: Path, components: dict | None = None,
                          what: str = "Stable Diffusion") -> dict:  # fmt: skip
    """Read ``model_index.json`` and report every missing / unsupported component at once.

    Args:
        path: the pipeline folder.
        components: name -> accepted classes (default :data:`COMPONENTS`, SD 1.x/2.x).
        what: the kind of pipeline, for the messages.

    Returns:
        The parsed ``model_index.json``.

    Raises:
        CheckpointError: ``path`` is not a folder, has no ``model_index.json``, or lacks
            (or holds an unsupported class for) any of :data:`COMPONENTS`; all are named.

    Example:
        >>> import tempfile
        >>> try:
        ...     check_pipeline_folder(Path(tempfile.mkdtemp()))
        ... except CheckpointError as err:
        ...     print("has no model_index.json" in str(err))
        True
    """
    parts = ", ".join(f"{c}/" for c in (COMPONENTS if components is None else components))
    path = Path(path).expanduser()
    if not path.is_dir():
        if path.is_file():
            raise CheckpointError(
                f"pipeline folder {str(path)!r} is a file; expected a diffusers-format folder "
                f"(model_index.json, {parts}). "
                "Single-file .ckpt/.safetensors checkpoints are not read: convert them with "
                "diffusers first"
            )
        problem = path_problem(path) or ("does not exist or is not a directory"
                                          + local_only_hint(path))  # fmt: skip
        raise CheckpointError(f"pipeline folder {str(path)!r} {problem}")
    if not (path / "model_index.json").is_file():
        present = sorted(p.name for p in path.iterdir())[:20]
        hint = ""
        if (path / "config.json").is_file():
            hint = " (it has a config.json: is this a single component folder like unet/?)"
        raise CheckpointError(
            f"pipeline folder {str(path)!r} has no model_index.json{hint}; expected a diffusers "
            f"{what} folder. Present: {', '.join(present) or 'nothing'}"
        )
    index = read_model_index(path)
    problems = []
    for name, classes in (COMPONENTS if components is None else components).items():
        cls = _entry_class(index, name)
        folder = path / name
        problem = path_problem(folder)
        if problem:  # the entry exists but cannot be opened: say why, not "missing"
            problems.append(f"{name}/ {problem}")
            continue
        if cls is None and not folder.is_dir():
            problems.append(f"{name}/ (not in model_index.json and no folder)")
            continue
        if classes and cls is not None and cls not in classes:
            problems.append(f"{name} is a {cls}, expected one of {list(classes)}")
            continue
        if not folder.is_dir():
            problems.append(f"{name}/ (listed in model_index.json as {cls}, folder missing)")
        elif name == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                problems.append("scheduler/scheduler_config.json")
        elif name.startswith("tokenizer"):
            missing = _tokenizer_files_missing(folder, name, cls)
            if missing:
                problems.append(missing)
        elif not (folder / "config.json").is_file():
            problem = path_problem(folder / "config.json")
            problems.append(f"{name}/config.json" + (f" ({problem})" if problem else ""))
    if problems:
        kind = index.get("_class_name", "unknown pipeline")
        raise CheckpointError(
            f"pipeline folder {str(path)!r} ({kind}) is incomplete or unsupported; missing or "
            f"wrong: {'; '.join(problems)}"
        )
    return index


def image_preprocess_stats(encoder_folder: Path, pipeline_folder: Path) -> tuple:
    """Mean / std of the CLIPImageProcessor config next to the encoder, else OpenAI's.

    Looks in ``<encoder>/preprocessor_config.json``, then
    ``<pipeline>/feature_extractor/preprocessor_config.json``.

    Args:
        encoder_folder: the image encoder's folder.
        pipeline_folder: the pipeline folder.

    Returns:
        ``(mean, std, file)``: per-channel tuples and the config file they came from
        (``None`` for OpenAI CLIP's defaults).

    Raises:
        CheckpointError: a preprocessor config that is not a valid JSON object, or whose
            ``image_mean`` / ``image_std`` are not 3 finite numbers each (``std > 0``),
            naming the file (checked by :func:`~jaxdiv.models.clip.channel_stats`).

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> image_preprocess_stats(d, d) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, None)
        True
    """
    for candidate in (
        Path(encoder_folder).expanduser() / "preprocessor_config.json",
        Path(pipeline_folder).expanduser() / "feature_extractor" / "preprocessor_config.json",
    ):
        if candidate.is_file():
            cfg = _read_json(candidate, "image preprocessing config")
            try:
                mean, std = channel_stats(cfg.get("image_mean", OPENAI_CLIP_MEAN),
                                          cfg.get("image_std", OPENAI_CLIP_STD),
                                          names=("image_mean", "image_std"))  # fmt: skip
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"{str(candidate)!r}: {err}") from err
            return mean, std, str(candidate)
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, None


def read_scheduler_config(path: Path) -> dict:
    """The parsed ``scheduler/scheduler_config.json`` of a pipeline folder.

    Args:
        path: a pipeline folder (checked by :func:`check_pipeline_folder`).

    Returns:
        The config dict.

    Raises:
        CheckpointError: the file is not valid JSON or not a JSON object.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> (d / "scheduler").mkdir()
        >>> _ = (d / "scheduler" / "scheduler_config.json").write_text('{"steps_offset": 1}')
        >>> read_scheduler_config(d)
        {'steps_offset': 1}
    """
    sched_file = Path(path).expanduser() / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(sched_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(sched_file)!r} is not valid JSON ({err})") from err
    if not isinstance(scheduler_config, dict):
        raise CheckpointError(f"{str(sched_file)!r} must hold a JSON object")
    return scheduler_config


def image_encoder_folder(path: Path, image_encoder) -> Path | None:
    """The image encoder folder that :func:`~jaxdiv.pipelines.stable_diffusion.load` reads.

    Args:
        path: the pipeline folder.
        image_encoder: ``None`` (``<path>/image_encoder`` when present), ``True`` (that
            folder, required), ``False`` (none) or a folder path.

    Returns:
        The folder, or ``None`` for no image encoder.

    Raises:
        TypeError: ``image_encoder`` is of another type.
        CheckpointError: a requested folder does not exist.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> image_encoder_folder(d, None) is None, image_encoder_folder(d, d) == d
        (True, True)
    """
    path = Path(path).expanduser()
    if image_encoder is None:
        enc_folder = path / "image_encoder"
        return enc_folder if enc_folder.is_dir() else None
    if image_encoder is False:
        return None
    if image_encoder is True:
        enc_folder = path / "image_encoder"
    elif isinstance(image_encoder, str | os.PathLike):
        enc_folder = Path(image_encoder).expanduser()
    else:
        raise TypeError(
            f"image_encoder must be None, a bool or a folder path, got {image_encoder!r}"
        )
    if not enc_folder.is_dir():
        raise CheckpointError(f"image_encoder folder {str(enc_folder)!r} does not exist")
    return enc_folder
