"""Meshes, batch sharding and FSDP parameter sharding on JAX's own SPMD runtime.

A run over several devices is the single-device program with its inputs placed on a
:class:`jax.sharding.Mesh`: the batch split along the ``data`` axis
(:func:`shard_batch`, or ``jaxdiv.sample(..., mesh=mesh)``), and, for models too large to
copy onto every device, the weights split along the ``fsdp`` axis (:func:`shard_params`).
XLA's partitioner (GSPMD) inserts the collectives: a per-sample denoiser runs on each
device's rows alone; a term that couples the batch (SPELL intra-batch, particle
guidance, GASS) gathers what it reads -- ``x0_hat`` or its features -- not the model's
activations. Outputs equal the single-device run with the same keys and noise (per-sample
noise streams do not depend on the layout; ``tests/test_distributed.py``).

Memory per device, for ``P`` parameters of ``s`` bytes and a batch ``B`` over ``n_data``
devices: weights ``P s / n_fsdp`` (plus one layer gathered at a time), activations of
``B / n_data`` samples.

>>> import jax
>>> mesh = make_mesh()                      # every device on the data axis
>>> dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
True
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiv import validation

__all__ = ["DATA", "FSDP", "FSDP_RULES", "make_mesh", "shard_batch", "shard_params",
           "param_spec"]  # fmt: skip

DATA = "data"
FSDP = "fsdp"

#: ``(regex on the parameter's path, preferred axis)``: the first match decides which
#: axis of a weight is split over the ``fsdp`` devices (if its size divides); unmatched
#: weights split their last divisible axis (a linear kernel's output features, a conv
#: kernel's output channels -- HWIO). Token-embedding tables split the vocabulary.
FSDP_RULES: tuple[tuple[str, int], ...] = (
    (r"(token_embedding|shared|embed_tokens|word_embeddings).*(embedding|weight)", 0),
    (r"relative_attention_bias", -1),
)


def make_mesh(data: int | None = None, fsdp: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:  # fmt: skip
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all of them).

    Args:
        data: devices along the batch axis (default: ``len(devices) // fsdp``).
        fsdp: devices the weights are split over.
        devices: the devices to use; the first ``data * fsdp`` are taken.

    >>> mesh = make_mesh(1, 1)
    >>> mesh.axis_names, mesh.devices.shape
    (('data', 'fsdp'), (1, 1))
    """
    devices = list(jax.devices() if devices is None else devices)
    fsdp = validation.integer("fsdp", fsdp, 1)
    if data is None:
        data = max(len(devices) // fsdp, 1)
    data = validation.integer("data", data, 1)
    if data * fsdp > len(devices):
        raise ValueError(
            f"a mesh of data={data} x fsdp={fsdp} needs {data * fsdp} devices, "
            f"{len(devices)} are available"
        )
    grid = np.array(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP))


def _path(path) -> str:
    return jax.tree_util.keystr(path)


def shard_batch(tree, mesh: Mesh, axis: str = DATA, *, name: str = ""):
    """Place every array leaf of ``tree`` with its leading (batch) axis split along ``axis``.

    Scalars are replicated. A batch size the axis does not divide is refused, naming the
    leaf (``name`` and its path in ``tree``): padding would change coupled terms' results.

    >>> import jax.numpy as jnp
    >>> x = shard_batch(jnp.ones((4, 2)), make_mesh(1, 1))
    >>> x.sharding.spec
    P('data',)
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    n = mesh.shape[axis]

    def place(path, leaf):
        if not hasattr(leaf, "shape"):
            return leaf
        if np.ndim(leaf) == 0:
            return jax.device_put(leaf, NamedSharding(mesh, P()))
        if leaf.shape[0] % n:
            raise ValueError(
                f"{name + _path(path) or 'the batch'} has leading size {leaf.shape[0]}, not "
                f"divisible by the {n} devices of mesh axis {axis!r}"
            )
        return jax.device_put(leaf, NamedSharding(mesh, P(axis)))

    return jax.tree_util.tree_map_with_path(place, tree)


def param_spec(path: str, shape: Sequence[int], n: int,
               rules: Sequence[tuple[str, int]] = FSDP_RULES) -> P:  # fmt: skip
    """The :class:`PartitionSpec` :func:`shard_params` gives a weight of ``shape``.

    The axis a matching rule prefers if ``n`` divides it, else the last axis ``n``
    divides; ``P()`` (replicated) when none does.

    >>> param_spec("['unet']['conv_in']['kernel']", (3, 3, 4, 32), 8)
    P(None, None, None, 'fsdp')
    >>> param_spec("['text']['token_embedding']['embedding']", (49408, 768), 8)
    P('fsdp', None)
    >>> param_spec("['bias']", (5,), 8)
    P()
    """
    order = list(range(len(shape)))[::-1]
    for pattern, preferred in rules:
        if re.search(pattern, path):
            order.insert(0, preferred % len(shape) if shape else 0)
            break
    for ax in order:
        if shape[ax] % n == 0 and shape[ax] >= n:
            return P(*[FSDP if i == ax else None for i in range(len(shape))])
    return P()


def shard_params(
    tree,
    mesh: Mesh,
    axis: str = FSDP,
    *,
    rules: Sequence[tuple[str, int]] = FSDP_RULES,
    min_size: int = 1 << 14,
):
    """Split the weights in ``tree`` (a model's params, a pipeline, a denoiser) over ``axis``.

    Every floating array leaf of at least ``min_size`` elements is placed with
    :func:`param_spec` (replicated over the other mesh axes); smaller ones (biases, norm
    scales) are replicated. Inside a jitted program XLA gathers each weight where it is
    used, so the result equals the replicated model's.

    >>> import jax.numpy as jnp
    >>> p = shard_params({"w": jnp.ones((128, 256))}, make_mesh(1, 1), min_size=1)
    >>> p["w"].sharding.spec
    P(None, 'fsdp')
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    n = mesh.shape[axis]
    min_size = validation.integer("min_size", min_size, 0)

    def place(path, leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            return leaf
        if leaf.size < min_size or not jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
            return jax.device_put(leaf, NamedSharding(mesh, P()))
        spec = param_spec(_path(path), leaf.shape, n, rules)
        spec = P(*[axis if s == FSDP else s for s in spec])
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, tree)
