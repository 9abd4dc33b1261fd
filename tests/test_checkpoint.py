"""Tests of the local checkpoint loader (jaxdiv.models.checkpoint) and the layout rules of
jaxdiv.models.conversion."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file as st_load_numpy
from safetensors.numpy import save_file as st_save_numpy
from safetensors.torch import save_file as st_save_torch

from jaxdiv.models.checkpoint import (
    CheckpointError,
    assign_params,
    load_component,
    load_state_dict,
    read_config,
    read_model_index,
)
from jaxdiv.models.conversion import conv_kernel, linear_kernel


class Tiny(nnx.Module):
    """Conv -> GroupNorm -> mean-pool -> Linear, the layout rules SD components use."""

    def __init__(self, cin, cout, nout, *, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), padding=1, rngs=rngs)
        self.norm = nnx.GroupNorm(cout, num_groups=2, epsilon=1e-5, rngs=rngs)
        self.proj = nnx.Linear(cout, nout, rngs=rngs)

    def __call__(self, x):  # x: NHWC
        h = self.norm(self.conv(x))
        return self.proj(h.mean(axis=(1, 2)))


class TorchTiny(torch.nn.Module):
    def __init__(self, cin, cout, nout):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, cout, eps=1e-5)
        self.proj = torch.nn.Linear(cout, nout)

    def forward(self, x):  # x: NCHW
        return self.proj(self.norm(self.conv(x)).mean(dim=(2, 3)))


def convert_tiny(sd, config):
    """Key-mapping rules of the module docstring: conv OIHW->HWIO, linear T, weight->scale."""
    rules = {
        "conv.weight": ("conv.kernel", conv_kernel),
        "conv.bias": ("conv.bias", np.asarray),
        "norm.weight": ("norm.scale", np.asarray),
        "norm.bias": ("norm.bias", np.asarray),
        "proj.weight": ("proj.kernel", linear_kernel),
        "proj.bias": ("proj.bias", np.asarray),
    }
    out = {}
    for k, v in sd.items():
        name, fn = rules.get(k, (k, np.asarray))
        out[name] = fn(v)
    return out


def build_tiny(config):
    return Tiny(config["cin"], config["cout"], config["nout"], rngs=nnx.Rngs(0))


CONFIG = {"cin": 3, "cout": 4, "nout": 5}


def write_torch_tiny(folder, *, seed=0, config=CONFIG):
    torch.manual_seed(seed)
    model = TorchTiny(config["cin"], config["cout"], config["nout"]).eval()
    with torch.no_grad():  # non-trivial norm affine so weight->scale is actually tested
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return model, {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def tiny_outputs(model, jmodel, seed=1):
    x = np.random.default_rng(seed).standard_normal((2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = np.asarray(jmodel(x.transpose(0, 2, 3, 1)))
    return ref, got


def test_load_component_matches_torch(tmp_path):
    model, sd = write_torch_tiny(tmp_path)
    st_save_torch(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    jmodel, config = load_component(tmp_path, build_tiny, convert_tiny)
    assert config == CONFIG
    ref, got = tiny_outputs(model, jmodel)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_sharded_loading_equals_single(tmp_path):
    model, sd = write_torch_tiny(tmp_path)
    names = sorted(sd)
    shards = {"m-00001-of-00002.safetensors": names[:3], "m-00002-of-00002.safetensors": names[3:]}
    for fname, keys in shards.items():
        st_save_torch({k: sd[k] for k in keys}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_state_dict(tmp_path)
    assert sorted(loaded) == names
    for k in names:
        np.testing.assert_array_equal(loaded[k], sd[k].numpy())
    jmodel, _ = load_component(tmp_path, build_tiny, convert_tiny)
    ref, got = tiny_outputs(model, jmodel)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_sharded_missing_shard_and_missing_tensor_named(tmp_path):
    _, sd = write_torch_tiny(tmp_path)
    names = sorted(sd)
    st_save_torch({k: sd[k] for k in names[:3]}, str(tmp_path / "a.safetensors"))
    weight_map = {k: "a.safetensors" for k in names[:3]}
    weight_map.update({k: "b-missing.safetensors" for k in names[3:]})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="b-missing.safetensors"):
        load_state_dict(tmp_path)
    # index claims a tensor that the shard lacks
    weight_map = {k: "a.safetensors" for k in names}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="not in the shard") as err:
        load_state_dict(tmp_path)
    for k in names[3:]:
        assert k in str(err.value)


def test_reader_matches_safetensors_numpy_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.standard_normal((2, 3)),
        "f32": rng.standard_normal((4,)).astype(np.float32),
        "f16": rng.standard_normal((3, 1, 2)).astype(np.float16),
        "i64": rng.integers(-9, 9, (5,)),
        "i8": rng.integers(-9, 9, (2, 2)).astype(np.int8),
        "u8": rng.integers(0, 200, (3,)).astype(np.uint8),
        "b": rng.random((4,)) > 0.5,
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    st_save_numpy(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
    ours = load_state_dict(tmp_path)
    ref = st_load_numpy(str(tmp_path / "model.safetensors"))
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(ours[k], ref[k])


def test_bf16_safetensors_roundtrip_and_dtype_cast(tmp_path):
    _, sd = write_torch_tiny(tmp_path)
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    st_save_torch(sd16, str(tmp_path / "model.safetensors"))
    loaded = load_state_dict(tmp_path)
    for k, v in sd16.items():
        assert loaded[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(loaded[k].astype(np.float32), v.float().numpy())
    # default: cast to the model's declared param dtype (float32)
    jmodel, _ = load_component(tmp_path, build_tiny, convert_tiny)
    assert jmodel.conv.kernel[...].dtype == np.float32
    # explicit dtype
    jmodel, _ = load_component(tmp_path, build_tiny, convert_tiny, dtype="bfloat16")
    assert jmodel.proj.kernel[...].dtype == ml_dtypes.bfloat16


def test_variant_files_are_kept_apart(tmp_path):
    _, sd = write_torch_tiny(tmp_path)
    st_save_torch(sd, str(tmp_path / "model.safetensors"))
    st_save_torch({k: v.half() for k, v in sd.items()}, str(tmp_path / "model.fp16.safetensors"))
    assert load_state_dict(tmp_path)["conv.weight"].dtype == np.float32
    assert load_state_dict(tmp_path, variant="fp16")["conv.weight"].dtype == np.float16
    with pytest.raises(CheckpointError, match="variant 'bf16'"):
        load_state_dict(tmp_path, variant="bf16")


def test_duplicate_tensors_across_files_named(tmp_path):
    _, sd = write_torch_tiny(tmp_path)
    st_save_torch(sd, str(tmp_path / "a.safetensors"))
    st_save_torch({"conv.bias": sd["conv.bias"]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"conv\.bias \(a\.safetensors and b\.safetensors\)"):
        load_state_dict(tmp_path)


def test_only_bin_refused_then_allow_pickle(tmp_path):
    model, sd = write_torch_tiny(tmp_path)
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(tmp_path)
    msg = str(err.value)
    assert "diffusion_pytorch_model.bin" in msg and "allow_pickle=True" in msg
    assert str(tmp_path) in msg
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_component(tmp_path, build_tiny, convert_tiny)
    jmodel, _ = load_component(tmp_path, build_tiny, convert_tiny, allow_pickle=True)
    ref, got = tiny_outputs(model, jmodel)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_pickle_with_bf16_and_nested_state_dict(tmp_path):
    _, sd = write_torch_tiny(tmp_path)
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    torch.save({"state_dict": sd16}, tmp_path / "model.ckpt")
    loaded = load_state_dict(tmp_path, allow_pickle=True)
    for k, v in sd16.items():
        assert loaded[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(loaded[k].astype(np.float32), v.float().numpy())


def test_pickle_with_code_refused_even_with_allow_pickle(tmp_path):
    # weights_only=True must reject arbitrary objects
    torch.save({"w": torch.zeros(2), "obj": TorchTiny(1, 2, 2)}, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_state_dict(tmp_path, allow_pickle=True)


def test_safetensors_preferred_over_bin(tmp_path):
    _, sd = write_torch_tiny(tmp_path)
    st_save_torch(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "model.bin").write_bytes(b"not a pickle")  # never read
    assert sorted(load_state_dict(tmp_path)) == sorted(sd)


def test_missing_unexpected_misshaped_reported_together(tmp_path):
    _, sd = write_torch_tiny(tmp_path)
    del sd["norm.weight"]
    del sd["proj.bias"]
    sd["conv.weight"] = torch.zeros(4, 3, 5, 5)
    sd["extra.weight"] = torch.zeros(2)
    st_save_torch(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_component(tmp_path, build_tiny, convert_tiny)
    msg = str(err.value)
    assert str(tmp_path) in msg
    assert "missing tensors (2): norm.scale, proj.bias" in msg
    assert "unexpected tensors (1): extra.weight" in msg
    assert "conv.kernel (expected (3, 3, 3, 4), got (5, 5, 3, 4))" in msg


def test_assign_params_leaves_model_untouched_on_error():
    lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    before = np.asarray(lin.kernel[...]).copy()
    with pytest.raises(CheckpointError, match=r"(?s)lin: .*missing tensors \(1\): bias"):
        assign_params(lin, {"kernel": np.ones((3, 2))}, component="lin")
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), before)
    with pytest.raises(TypeError, match="model must be an nnx.Module"):
        assign_params({"kernel": 1}, {}, component="x")


def test_uninitialised_rng_state_reported(tmp_path):
    class WithDropout(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    (tmp_path / "config.json").write_text("{}")
    st_save_numpy(
        {"kernel": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)},
        str(tmp_path / "model.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"drop\.rngs"):
        load_component(
            tmp_path,
            lambda c: WithDropout(nnx.Rngs(0)),
            lambda sd, c: {
                f"lin.{k}": (linear_kernel(v) if k == "kernel" else v) for k, v in sd.items()
            },
        )


def test_config_and_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json not found"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_config(tmp_path)
    with pytest.raises(CheckpointError, match="model_index.json not found"):
        read_model_index(tmp_path)
    with pytest.raises(CheckpointError, match="no weight files"):
        load_state_dict(tmp_path)
    with pytest.raises(TypeError, match="folder must be"):
        read_config(3)


def test_truncated_safetensors_named(tmp_path):
    st_save_numpy({"w": np.ones((64,), np.float32)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-16])
    with pytest.raises(CheckpointError, match=r"tensor 'w' byte range"):
        load_state_dict(tmp_path)


def test_layout_helpers_against_torch_ops():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(x @ linear_kernel(w), ref, atol=1e-6)
    np.testing.assert_array_equal(linear_kernel(w[:, :, None, None]), w.T)
    assert conv_kernel(np.zeros((8, 3, 1, 2))).shape == (1, 2, 3, 8)
    with pytest.raises(ValueError, match="4-d"):
        conv_kernel(w)
    with pytest.raises(ValueError, match="2-d"):
        linear_kernel(np.zeros((2, 3, 3, 3)))
