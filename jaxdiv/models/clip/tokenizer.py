"""The CLIP BPE tokenizer from a local folder, and token ids padded as SD pipelines pad them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxdiv.models.checkpoint import CheckpointError, path_problem

__all__ = ["check_token_ids", "load_clip_tokenizer", "tokenize"]


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
    path = Path(folder).expanduser()
    if not path.is_dir():
        problem = path_problem(path) or "does not exist"
        raise CheckpointError(f"tokenizer folder {str(path)!r} {problem}")
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        problem = path_problem(path / name)
        if problem:
            raise CheckpointError(f"tokenizer file {str(path / name)!r} {problem}")
    has_fast = (path / "tokenizer.json").is_file()
    missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing and not has_fast:
        raise CheckpointError(
            f"tokenizer folder {str(path)!r} lacks {', '.join(missing)} (and tokenizer.json)"
        )
    if not missing:
        _check_vocab_files(path)
    try:
        from transformers import CLIPTokenizer
    except ImportError as err:
        raise CheckpointError(
            "loading the CLIP tokenizer needs transformers (pip install 'jaxdiv[sd]')"
        ) from err
    # A local path with local_files_only never reaches the hub.
    try:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # tokenizers' own errors name no file
        raise CheckpointError(
            f"tokenizer folder {str(path)!r}: transformers could not build a CLIPTokenizer "
            f"from it ({type(err).__name__}: {err})"
        ) from err


def _check_vocab_files(path: Path) -> None:
    """``vocab.json`` must map token strings to distinct non-negative int ids and
    ``merges.txt`` must be UTF-8 text: errors name the file and the problem."""
    vocab_file = path / "vocab.json"
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"tokenizer file {str(vocab_file)!r} is not valid JSON "
                              f"({err})") from err  # fmt: skip
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"tokenizer file {str(vocab_file)!r} must hold a non-empty JSON "
                              f"object token -> id, got {type(vocab).__name__}")  # fmt: skip
    bad = [(k, v) for k, v in vocab.items()
           if isinstance(v, bool) or not isinstance(v, int) or v < 0]  # fmt: skip
    if bad:
        shown = ", ".join(f"{k!r}: {v!r}" for k, v in bad[:5])
        raise CheckpointError(f"tokenizer file {str(vocab_file)!r}: token ids must be "
                              f"non-negative integers, got {shown}")  # fmt: skip
    if len(set(vocab.values())) != len(vocab):
        raise CheckpointError(f"tokenizer file {str(vocab_file)!r}: several tokens share "
                              "one id")  # fmt: skip
    merges_file = path / "merges.txt"
    try:
        merges_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"tokenizer file {str(merges_file)!r} is not UTF-8 text "
                              f"({err})") from err  # fmt: skip


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
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a str or a sequence of str, got "
                        f"{type(prompts).__name__}")  # fmt: skip
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt, got an empty sequence")
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


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids") -> None:
    """Refuse concrete token ids outside ``[0, vocab_size)``.

    An embedding lookup would otherwise return NaN rows for ids past the table and wrap
    negative ids around to the end of it, silently. Traced ids cannot be inspected and
    pass unchecked.

    Example:
        >>> check_token_ids(np.array([[0, 5]]), 10)
        >>> check_token_ids(np.array([[0, 12, -1]]), 10)
        Traceback (most recent call last):
        ...
        ValueError: input_ids must be token ids in [0, 10) (the text encoder's vocab_size), got 12, -1
    """  # noqa: E501
    import jax

    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(input_ids)):
        return
    ids = np.asarray(input_ids)
    if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        return
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in list(dict.fromkeys(bad.tolist()))[:5])
        raise ValueError(
            f"{name} must be token ids in [0, {vocab_size}) (the text encoder's vocab_size), "
            f"got {shown}"
        )
