"""The CLIP BPE tokenizer from a local folder, and token ids padded as SD pipelines pad them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdiv.models.checkpoint import CheckpointError

__all__ = ["load_clip_tokenizer", "tokenize"]


def load_clip_tokenizer(folder: str | os.PathLike):
    """Load a ``transformers.CLIPTokenizer`` from a local folder (never the hub).

    Args:
        folder: a ``tokenizer/`` folder with ``vocab.json`` and ``merges.txt`` (and
            usually ``tokenizer_config.json`` / ``special_tokens_map.json``).

    Returns:
        The tokenizer.

    Raises:
        CheckpointError: folder or vocabulary files missing, or transformers not installed.

    Example:
        >>> import tempfile
        >>> from jaxdiv.testing import write_tiny_vocab
        >>> d = tempfile.mkdtemp()
        >>> write_tiny_vocab(d)  # vocab.json + merges.txt: (bos, eos) ids
        (81, 82)
        >>> load_clip_tokenizer(d)("a cat").input_ids
        [81, 1, 73, 82]
    """
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"folder must be a str or os.PathLike path, got {type(folder).__name__}")
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer folder {str(path)!r} does not exist")
    has_fast = (path / "tokenizer.json").is_file()
    missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing and not has_fast:
        raise CheckpointError(
            f"tokenizer folder {str(path)!r} lacks {', '.join(missing)} (and tokenizer.json)"
        )
    try:
        from transformers import CLIPTokenizer
    except ImportError as err:
        raise CheckpointError(
            "loading the CLIP tokenizer needs transformers (pip install 'jaxdiv[sd]')"
        ) from err
    # A local path with local_files_only never reaches the hub.
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids as SD pipelines make them: padded to ``max_length``, truncated.

    Args:
        tokenizer: a CLIP tokenizer (:func:`load_clip_tokenizer`).
        prompts: one prompt or a list.
        max_length: defaults to ``tokenizer.model_max_length`` (77 for SD).

    Returns:
        int32 array (num_prompts, max_length).

    Example:
        >>> import tempfile
        >>> from jaxdiv.testing import write_tiny_vocab
        >>> d = tempfile.mkdtemp()
        >>> _ = write_tiny_vocab(d)
        >>> tokenize(load_clip_tokenizer(d), ["a cat", "a dog"], max_length=6).tolist()
        [[81, 1, 73, 82, 82, 82], [81, 1, 75, 82, 82, 82]]
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a str or a sequence of str")
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length is None or max_length > 100_000:
            raise ValueError(
                "max_length: the tokenizer has no model_max_length; pass max_length explicitly"
            )
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return np.asarray(ids, dtype=np.int32)
