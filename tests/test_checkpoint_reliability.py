"""Reliability of checkpoint loading (issue 11): every damaged file is named with what is
wrong with it; nothing loads silently wrong. The tests write the damaged files themselves.
"""

import json
import os
import re
import shutil
import struct
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file as st_load
from safetensors.numpy import save_file as st_save

from jaxdiv.models.checkpoint import (
    CheckpointError,
    load_component,
    load_state_dict,
    read_config,
)
from jaxdiv.models.clip import load_clip_text, load_clip_vision
from jaxdiv.models.clip.tokenizer import load_clip_tokenizer
from jaxdiv.models.conversion import conv_kernel, linear_kernel
from jaxdiv.models.dinov2 import load_dinov2
from jaxdiv.models.mmdit import load_mmdit
from jaxdiv.models.t5 import load_t5
from jaxdiv.models.unet import load_unet
from jaxdiv.models.vae import load_vae
from jaxdiv.pipelines import stable_diffusion_3 as sd3
from jaxdiv.pipelines.folder import check_pipeline_folder, image_preprocess_stats
from jaxdiv.testing import TINY_MMDIT, TINY_T5, TINY_UNET, TINY_VAE, write_tiny_vocab


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


# ------------------------------------------------------------------ tiny saved models


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny ``save_pretrained`` folders: a UNet, a VAE and an SD3 MMDiT (diffusers)."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(root / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    SD3Transformer2DModel(**TINY_MMDIT).save_pretrained(root / "transformer")
    return root


def with_tensors(saved, tmp_path, component, **tensors):
    """A copy of a saved component whose weight file gains / replaces ``tensors``."""
    folder = tmp_path / component
    shutil.copytree(saved / component, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = st_load(str(weights))
    sd.update(tensors)
    st_save(sd, str(weights))
    return folder


# ------------------------------------------------------------------ dtype overflow


def test_finite_weights_that_overflow_the_dtype_are_named(tmp_path):
    w = np.ones((2, 3), np.float32)
    w[0, 1] = 1e5  # finite in float32, inf in float16 (max 65504)
    d = linear_folder(tmp_path, w, np.full(2, -7e4, np.float32))
    with pytest.raises(CheckpointError) as err:
        load_linear(d, dtype=jnp.float16)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(d))
    assert ("finite weights overflow to inf when cast to float16 (max |x| 65504): "
            "bias (2 of 2, max |x| 70000), kernel (1 of 6, max |x| 100000)") in msg  # fmt: skip
    assert "pass check_finite=False" in msg
    # bfloat16 has float32's range: the same weights load (rounded)
    assert float(load_linear(d, dtype=jnp.bfloat16).kernel[1, 0]) == 99840.0
    # a trusted folder: the cast's inf is accepted
    lin = load_linear(d, dtype=jnp.float16, check_finite=False)
    assert np.isinf(np.asarray(lin.kernel[...], np.float32)).sum() == 1


def test_unet_loaded_in_float16_refuses_overflowing_weights(saved, tmp_path):
    d = with_tensors(saved, tmp_path, "unet", **{"conv_in.bias": np.full(32, 1e5, np.float32)})
    with pytest.raises(CheckpointError, match=re.escape(
            f"{d}: finite weights overflow to inf when cast to float16 (max |x| 65504): "
            "conv_in.bias (32 of 32, max |x| 100000)")):  # fmt: skip
        load_unet(d, dtype=jnp.float16)
    assert not np.isfinite(load_unet(d, dtype=jnp.float16, check_finite=False)
                           .conv_in.bias[...]).any()  # fmt: skip


LOADERS = [load_unet, load_vae, load_clip_text, load_clip_vision, load_t5, load_mmdit,
           load_dinov2]  # fmt: skip
WANT_FLOAT = "must be a floating dtype (jnp.float32, jnp.bfloat16, jnp.float16 or jnp.float64)"


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype, got", [(jnp.int32, "int32"), ("foo", "str 'foo'"),
                                        (np.bool_, "bool"), (True, "bool True")])  # fmt: skip
def test_loader_dtype_must_be_a_float_dtype(tmp_path, load, dtype, got):
    with pytest.raises(TypeError, match=re.escape(f"dtype {WANT_FLOAT}, got {got}")):
        load(tmp_path, dtype=dtype)  # checked before the folder is read


@pytest.mark.parametrize("load", [load_clip_text, load_t5, load_dinov2], ids=lambda f: f.__name__)
def test_loader_param_dtype_must_be_a_float_dtype(tmp_path, load):
    with pytest.raises(TypeError, match=re.escape(f"param_dtype {WANT_FLOAT}, got uint8")):
        load(tmp_path, param_dtype=np.uint8)


def test_float64_without_x64_is_refused_not_silently_float32(tmp_path):
    with pytest.raises(ValueError, match=r"dtype=float64 needs 64-bit JAX .*jax_enable_x64.*"
                                         r"would silently be float32"):  # fmt: skip
        load_unet(tmp_path, dtype=jnp.float64)


# ------------------------------------------------------------------ flags must be bools


@pytest.mark.parametrize("flag, value", [("allow_pickle", "no"), ("allow_pickle", 1),
                                         ("check_finite", 0), ("check_finite", "no")])  # fmt: skip
def test_flags_must_be_real_bools(tmp_path, flag, value):
    w = np.ones((2, 3), np.float32)
    w[0, 0] = np.nan
    d = linear_folder(tmp_path, w, np.zeros(2, np.float32))
    torch = pytest.importorskip("torch")
    torch.save({"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, d / "other.bin")
    want = rf"{flag} must be a bool, got {type(value).__name__} {value!r}"
    with pytest.raises(TypeError, match=want):
        load_state_dict(d, **{flag: value})
    with pytest.raises(TypeError, match=want):
        load_linear(d, **{flag: value})
    with pytest.raises(TypeError, match=want):
        load_unet(d, **{flag: value})


def test_with_projection_must_be_a_bool_or_none(tmp_path):
    with pytest.raises(TypeError, match="with_projection must be a bool, got str 'yes'"):
        load_clip_text(tmp_path, with_projection="yes")


# ------------------------------------------------------------------ unknown tensors


@pytest.mark.parametrize("component", ["unet", "vae", "transformer"])
@pytest.mark.parametrize("name, shape", [("foo.weight", (3, 3, 3)), ("foo.running_mean", (3,)),
                                         ("foo.weight", (2, 2, 2, 2, 2))])  # fmt: skip
def test_unknown_tensors_are_reported_as_unexpected(saved, tmp_path, component, name, shape):
    d = with_tensors(saved, tmp_path, component, **{name: np.zeros(shape, np.float32)})
    load = {"unet": load_unet, "vae": load_vae, "transformer": load_mmdit}[component]
    with pytest.raises(CheckpointError, match=re.escape(
            f"{d}: checkpoint does not match the model\n  unexpected tensors (1): {name}")):
        load(d)  # fmt: skip


def test_conv_weight_of_wrong_rank_is_named(saved, tmp_path):
    d = with_tensors(saved, tmp_path, "unet", **{"conv_in.weight": np.zeros((32, 4, 9), np.float32),
                                                 "conv_in.bias": np.zeros((32,), np.float32)})
    with pytest.raises(CheckpointError) as err:
        load_unet(d)
    assert str(err.value) == (f"{d}: checkpoint does not match the model\n"
                              "  missing tensors (1): conv_in.kernel\n"
                              "  unexpected tensors (1): conv_in.weight")  # fmt: skip


def test_converter_errors_name_the_folder(tmp_path):
    d = linear_folder(tmp_path, np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    build = lambda c: nnx.Linear(c["in"], c["out"], rngs=nnx.Rngs(0))
    conv = lambda sd, c: {"kernel": conv_kernel(sd["weight"]), "bias": sd["bias"]}
    with pytest.raises(CheckpointError, match=re.escape(
            f"'{d}': cannot convert the checkpoint: conv_kernel: w must be 4-d")):  # fmt: skip
        load_component(d, build, conv)


# ------------------------------------------------------------------ variants


def test_variant_shard_indexes_of_diffusers_and_transformers(tmp_path):
    """diffusers >= 0.28 and transformers 5 name a variant's index
    ``*.safetensors.index.<variant>.json``: its missing shards are named as such."""
    import torch
    import transformers
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet, t5 = tmp_path / "unet", tmp_path / "t5"
    UNet2DConditionModel(**TINY_UNET).save_pretrained(unet, variant="fp16",
                                                      max_shard_size="300KB")  # fmt: skip
    transformers.T5EncoderModel(transformers.T5Config(**TINY_T5)).save_pretrained(
        t5, variant="fp16", max_shard_size="20KB")  # fmt: skip
    for folder, index, load in ((unet, "diffusion_pytorch_model.safetensors.index.fp16.json",
                                 load_unet), (t5, "model.safetensors.index.fp16.json", load_t5)):
        assert (folder / index).is_file(), sorted(p.name for p in folder.iterdir())
        shards = sorted(p.name for p in folder.iterdir() if ".fp16-" in p.name)
        assert len(shards) >= 2
        load(folder, variant="fp16")
        with pytest.raises(CheckpointError, match=re.escape(
                "no weight files found (expected")) as err:  # fmt: skip
            load(folder)
        assert str(err.value).endswith("weight files of another variant are present: "
                                       "pass variant='fp16'")  # fmt: skip
        (folder / shards[-1]).unlink()
        with pytest.raises(CheckpointError, match=re.escape(
                f"'{folder}': shard files listed in {index} are missing: {shards[-1]}")):
            load(folder, variant="fp16")  # fmt: skip


def test_only_variant_files_hint_at_variant(tmp_path):
    d = linear_folder(tmp_path, np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    (d / "model.safetensors").rename(d / "model.fp16.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_linear(d)
    msg = str(err.value)
    assert "no weight files found" in msg and "model.fp16.safetensors" in msg
    assert msg.endswith("; weight files of another variant are present: pass variant='fp16'")
    with pytest.raises(CheckpointError, match=r"no weight files with variant 'bf16' found .*"
                                              r"present: pass variant='fp16'$"):  # fmt: skip
        load_linear(d, variant="bf16")
    load_linear(d, variant="fp16")


# ------------------------------------------------------------------ local folders only


def test_hub_ids_are_told_jaxdiv_reads_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = "stabilityai/stable-diffusion-2-1"
    hint = (f"; jaxdiv reads local folders only, never a hub: download the model first "
            f"(huggingface-cli download {hub} --local-dir DIR, or "
            f"huggingface_hub.snapshot_download('{hub}')) and pass that folder")  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        load_unet(hub)
    assert str(err.value) == f"component folder '{hub}' does not exist or is not a directory{hint}"
    with pytest.raises(CheckpointError) as err:
        check_pipeline_folder(Path(hub))
    assert str(err.value) == f"pipeline folder '{hub}' does not exist or is not a directory{hint}"
    # an absolute path is not a hub id: no hint
    with pytest.raises(CheckpointError, match=r"is not a directory$"):
        load_unet(tmp_path / "nope")


def test_home_folder_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    linear_folder(tmp_path, np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    assert load_linear("~").kernel[...].shape == (3, 2)
    with pytest.raises(CheckpointError, match=re.escape(f"'{tmp_path / 'nope'}' does not exist")):
        load_state_dict("~/nope")
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "X"]}))
    with pytest.raises(CheckpointError, match=re.escape(f"pipeline folder '{tmp_path}' ")):
        check_pipeline_folder(Path("~"))


# ------------------------------------------------------------------ image preprocessing stats


@pytest.mark.parametrize("config, match", [
    ([1, 2], r"must hold a JSON object, got list"),
    ({"image_mean": [0.5]}, r"image_mean must hold 3 numbers \(one per RGB channel\), "
                            r"got \[0\.5\]"),
    ({"image_std": [0.5, 0.5, 0.5, 0.5]}, r"image_std must hold 3 numbers"),
    ({"image_std": [0.0, 0.5, 0.5]}, r"image_std\[0\] must be a finite number > 0, got 0\.0"),
    ({"image_std": [0.5, -0.5, 0.5]}, r"image_std\[1\] must be a finite number > 0, got -0\.5"),
    ({"image_mean": ["a", 0.5, 0.5]}, r"image_mean\[0\] must be a real number, got str 'a'"),
    ({"image_mean": [0.5, 0.5, float("nan")]},
     r"image_mean\[2\] must be a finite number, got nan"),
    ({"image_mean": "0.5"}, r"image_mean must be a list of 3 numbers \(one per RGB channel\), "
                            r"got str '0\.5'"),
])  # fmt: skip
def test_bad_image_preprocessing_stats_name_the_file(tmp_path, config, match):
    encoder, pipeline = tmp_path / "image_encoder", tmp_path
    encoder.mkdir()
    (pipeline / "feature_extractor").mkdir()
    good = pipeline / "feature_extractor" / "preprocessor_config.json"
    good.write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 1]}))
    assert image_preprocess_stats(encoder, pipeline) == ((0.5, 0.4, 0.3), (0.2, 0.25, 1.0),
                                                         str(good))  # fmt: skip
    (encoder / "preprocessor_config.json").write_text(json.dumps(config))  # read first
    with pytest.raises(CheckpointError, match=re.escape(
            repr(str(encoder / "preprocessor_config.json"))) + ".*" + match):  # fmt: skip
        image_preprocess_stats(encoder, pipeline)


# ------------------------------------------------------------------ SD3 text encoders


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    from jaxdiv.testing import save_random_sd3_pipeline

    return save_random_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3")


def sd3_copy(sd3_folder, tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(sd3_folder, folder)
    return folder


def test_sd3_text_encoders_without_architectures_load_with_projection(sd3_folder, tmp_path):
    folder = sd3_copy(sd3_folder, tmp_path)
    for name in ("text_encoder", "text_encoder_2"):
        config = json.loads((folder / name / "config.json").read_text())
        del config["architectures"]  # diffusers goes by model_index.json, not this
        (folder / name / "config.json").write_text(json.dumps(config))
    pipe = sd3.load(folder, t5=False)
    cond = pipe.encode_prompt(pipe.tokenize(["a cat"]))
    assert cond.pooled.shape == (1, pipe.configs["transformer"]["pooled_projection_dim"])


def test_sd3_t5_tokenizer_is_the_class_model_index_names(sd3_folder, tmp_path):
    import transformers

    folder = sd3_copy(sd3_folder, tmp_path)
    config_file = folder / "tokenizer_3" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "BertTokenizer"  # AutoTokenizer would follow this one
    config_file.write_text(json.dumps(config))
    pipe = sd3.load(folder)
    reference = transformers.T5TokenizerFast.from_pretrained(str(sd3_folder / "tokenizer_3"),
                                                             local_files_only=True)  # fmt: skip
    assert isinstance(pipe.tokenizers[2], transformers.T5TokenizerFast)
    prompt = "a red cat"
    assert pipe.tokenizers[2](prompt).input_ids == reference(prompt).input_ids


@pytest.mark.parametrize("text, match", [("[1]", r"TypeError"), ("{not json", r"JSONDecodeError")])
def test_sd3_t5_tokenizer_errors_name_the_folder(sd3_folder, tmp_path, text, match):
    folder = sd3_copy(sd3_folder, tmp_path)
    which = "tokenizer_config.json" if text == "[1]" else "tokenizer.json"
    (folder / "tokenizer_3" / which).write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(
            f"tokenizer folder '{folder / 'tokenizer_3'}': transformers could not build a "
            "T5Tokenizer from it (") + match):  # fmt: skip
        sd3.load(folder)


def test_sd3_scheduler_flag_must_be_a_bool(sd3_folder, tmp_path):
    folder = sd3_copy(sd3_folder, tmp_path)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["stochastic_sampling"] = "false"  # bool("false") would turn it on
    config_file.write_text(json.dumps(config))
    with pytest.raises(TypeError, match="scheduler config 'stochastic_sampling' must be a bool, "
                                        "got str 'false'"):  # fmt: skip
        sd3.load(folder, t5=False)
