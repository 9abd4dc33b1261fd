"""Reliability of checkpoint loading (issue 11): every damaged file is named with what is
wrong with it; nothing loads silently wrong. The tests write the damaged files themselves.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxdiv.models.checkpoint import (
    CheckpointError,
    load_component,
    load_state_dict,
    read_config,
)
from jaxdiv.models.clip.tokenizer import load_clip_tokenizer
from jaxdiv.models.conversion import linear_kernel
from jaxdiv.pipelines.folder import check_pipeline_folder
from jaxdiv.testing import write_tiny_vocab


def write_safetensors(path, header, data=b""):
    """A safetensors file with exactly this header (a JSON value) and data bytes."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + data)


def tensors_file(path, tensors):
    """Write ``{name: array}`` (any dtype incl. bf16 / bool) with our own writer."""
    tags = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64",
            np.dtype(np.bool_): "BOOL", np.dtype(np.int32): "I32"}  # fmt: skip
    header, data, off = {}, b"", 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": tags[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [off, off + len(b)]}  # fmt: skip
        data, off = data + b, off + len(b)
    write_safetensors(path, header, data)


def linear_folder(tmp_path, weight, bias):
    (tmp_path / "config.json").write_text(json.dumps({"in": 3, "out": 2}))
    tensors_file(tmp_path / "model.safetensors", {"weight": weight, "bias": bias})
    return tmp_path


def load_linear(folder, **kw):
    build = lambda c: nnx.Linear(c["in"], c["out"], rngs=nnx.Rngs(0))
    conv = lambda sd, c: {"kernel": linear_kernel(sd["weight"]), "bias": sd["bias"]}
    return load_component(folder, build, conv, **kw)[0]


# ------------------------------------------------------------------ non-float tensors


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_non_float_tensors_where_floats_are_expected_are_refused(tmp_path, dtype):
    d = linear_folder(tmp_path, np.ones((2, 3), dtype), np.zeros(2, np.float32))
    want = np.dtype(dtype).name
    with pytest.raises(CheckpointError, match=rf"non-float tensors where the model has "
                                              rf"floating-point weights \(1\): kernel "
                                              rf"\(expected floating point, got {want}\)"):
        load_linear(d)


# ------------------------------------------------------------------ non-finite weights


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_reported_by_name(tmp_path, dtype, bad):
    w = np.ones((2, 3), dtype)
    w[1, 2] = bad
    d = linear_folder(tmp_path, w, np.zeros(2, dtype))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*tensors with NaN or inf "
                                              r"values: weight \(1 of 6\)"):  # fmt: skip
        load_state_dict(d)
    with pytest.raises(CheckpointError, match=r"weight \(1 of 6\)"):
        load_linear(d)
    # a trusted folder skips the check (and then loads what is there)
    sd = load_state_dict(d, check_finite=False)
    assert not np.isfinite(np.asarray(sd["weight"], np.float32)).all()


def test_finite_weights_load_unchanged(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    lin = load_linear(linear_folder(tmp_path, w, np.ones(2, np.float32)))
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), w.T)


# ------------------------------------------------------------------ safetensors headers


@pytest.mark.parametrize("header, match", [
    ({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, r"header entry 'w' lacks shape"),
    ({"w": {"shape": [1], "data_offsets": [0, 4]}}, r"header entry 'w' lacks dtype"),
    ({"w": {"dtype": "F32", "shape": [1]}}, r"header entry 'w' lacks data_offsets"),
    ({"w": [1, 2, 3]}, r"header entry 'w' must be an object with dtype, shape and "
                       r"data_offsets, got list"),
    ({"w": "F32"}, r"header entry 'w' must be an object.*got str"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
     r"'w': shape must be a list of non-negative integers, got \[-1\]"),
    ({"w": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, r"shape must be a list"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
     r"data_offsets must be \[begin, end\] with 0 <= begin <= end, got \[4, 0\]"),
    ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, r"unsupported dtype 'X9'"),
    ([1, 2], r"safetensors header must be a JSON object, got list"),
])  # fmt: skip
def test_malformed_header_entries_name_the_file_and_entry(tmp_path, header, match):
    write_safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors'?: .*" + match):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("offsets", [([0, 8], [0, 8]), ([0, 8], [4, 12]), ([4, 12], [0, 8])])
def test_header_entries_pointing_at_overlapping_bytes_are_refused(tmp_path, offsets):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": offsets[0]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": offsets[1]}}  # fmt: skip
    write_safetensors(tmp_path / "model.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"header entries '[ab]' \[\d+, \d+\) and '[ab]' "
                                              r"\[\d+, \d+\) point at overlapping bytes"):
        load_state_dict(tmp_path)
    # adjacent (touching) ranges and empty tensors are fine
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
              "e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}  # fmt: skip
    write_safetensors(tmp_path / "model.safetensors", header, b"\0" * 16)
    assert sorted(load_state_dict(tmp_path)) == ["a", "b", "e"]


# ------------------------------------------------------------------ tokenizer files


@pytest.mark.parametrize("vocab, match", [
    ("{not json", r"vocab\.json' is not valid JSON"),
    ("[1, 2]", r"vocab\.json' must hold a non-empty JSON object token -> id, got list"),
    ("{}", r"vocab\.json' must hold a non-empty JSON object"),
    ('{"a": "x", "b": 1}', r"vocab\.json': token ids must be non-negative integers, got 'a': 'x'"),
    ('{"a": -3}', r"token ids must be non-negative integers, got 'a': -3"),
    ('{"a": 1, "b": 1}', r"vocab\.json': several tokens share one id"),
])  # fmt: skip
def test_corrupt_vocab_json_is_named(tmp_path, vocab, match):
    write_tiny_vocab(tmp_path)
    (tmp_path / "vocab.json").write_text(vocab)
    with pytest.raises(CheckpointError, match=r"tokenizer file '.*" + match):
        load_clip_tokenizer(tmp_path)


def test_non_utf8_merges_txt_is_named(tmp_path):
    write_tiny_vocab(tmp_path)
    (tmp_path / "merges.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CheckpointError, match=r"merges\.txt' is not UTF-8 text"):
        load_clip_tokenizer(tmp_path)


# ------------------------------------------------------------------ symlinks


def _dangling(link):
    os.symlink(link.parent / "nowhere", link)


def _loop(link):
    os.symlink(link.name, link)  # a link to itself


@pytest.mark.parametrize("make, what", [(_dangling, r"is a dangling symbolic link \(its "
                                                    r"target '.*nowhere' does not exist\)"),
                                        (_loop, r"is a symbolic link loop")])  # fmt: skip
def test_broken_links_are_named_not_called_missing(tmp_path, make, what):
    # a component folder that is a broken link
    make(tmp_path / "unet")
    with pytest.raises(CheckpointError, match=r"component folder '.*unet' " + what):
        load_state_dict(tmp_path / "unet")
    # a weight file that is a broken link
    comp = tmp_path / "vae"
    comp.mkdir()
    make(comp / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"weight files that cannot be read: "
                                              r"model\.safetensors \(" + what):  # fmt: skip
        load_state_dict(comp)
    # config.json that is a broken link
    make(comp / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json' " + what):
        read_config(comp)
    # tokenizer files
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    write_tiny_vocab(tok)
    (tok / "vocab.json").unlink()
    make(tok / "vocab.json")
    with pytest.raises(CheckpointError, match=r"tokenizer file '.*vocab\.json' " + what):
        load_clip_tokenizer(tok)
    # a pipeline whose component entry is a broken link
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "X"]}))
    with pytest.raises(CheckpointError, match=r"unet/ " + what):
        check_pipeline_folder(tmp_path)
