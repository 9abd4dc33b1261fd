"""The one entry point: :func:`sample`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.guidance.base import as_terms, guided_denoise, init_terms
from jaxdiv.samplers.base import Sampler

__all__ = ["sample", "SampleOutput", "Trace"]


class Trace(NamedTuple):
    """Per-step record, each field stacked over the ``N`` steps.

    Attributes:
        t: ``(N,)`` process time at the start of each step.
        x: ``(N, B, ...)`` the noisy batch ``x_t`` entering each step.
        x0_hat: ``(N, B, ...)`` the guided ``x0_hat`` of each step's first evaluation.
        info: one entry per guidance term (in chain order), its ``Info`` stacked over steps.
    """

    t: Any
    x: Any
    x0_hat: Any
    info: tuple


class SampleOutput(NamedTuple):
    """Result of :func:`sample`: final samples, optional trace, final guidance state."""

    x0: Any
    trace: Trace | None
    state: tuple


class _Static:
    """Hashable wrapper for a non-array leaf (functions, strings, Python numbers)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def _key(self):
        try:
            hash(self.value)
            return (0, self.value)
        except TypeError:
            return (1, id(self.value))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return (
            isinstance(other, _Static)
            and type(self.value) is type(other.value)
            and self._key() == other._key()
        )


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def _partition(tree):
    """Split a pytree into array leaves (traced) and everything else (static, hashed).

    Samplers, denoisers and guidance terms are pytrees whose arrays (time grids, GMM
    parameters) must be traced -- so ``jax.grad`` reaches them -- while their functions
    and hyperparameters key the compilation cache: the same objects never recompile.
    """
    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [leaf if _is_dynamic(leaf) else None for leaf in leaves]
    static = tuple(None if _is_dynamic(leaf) else _Static(leaf) for leaf in leaves)
    return dynamic, (treedef, static)


def _combine(dynamic, spec):
    treedef, static = spec
    leaves = [d if s is None else s.value for d, s in zip(dynamic, static)]
    return jax.tree.unflatten(treedef, leaves)


def _run_impl(spec, trace, dynamic, noise, key, cond, gstate):
    sampler, denoiser, terms = _combine(dynamic, spec)
    n = sampler.num_steps
    key_noise, key_guide = jax.random.split(key)
    keys = jax.random.split(key_noise, noise.shape[0])
    x = sampler.schedule.init_noise_scale(sampler.times[0]).astype(noise.dtype) * noise

    def body(carry, i):
        x, gstate = carry
        step_key = jax.random.fold_in(key_guide, i)

        def denoise(xx, t, c):
            gs, n_eval = c
            x0, gs, info = guided_denoise(
                terms, denoiser, xx, t, cond, gs,
                schedule=sampler.schedule, step=i, num_steps=n,
                key=jax.random.fold_in(step_key, n_eval),
            )  # fmt: skip
            return x0, (gs, n_eval + 1), info

        x_next, (gstate, _), (x0_hat, info) = sampler.step(
            sampler, i, x, denoise, (gstate, jnp.int32(0)), keys
        )
        out = Trace(sampler.times[i], x, x0_hat, info) if trace else None
        return (x_next.astype(x.dtype), gstate), out

    (x, gstate), tr = jax.lax.scan(body, (x, gstate), jnp.arange(n))
    return x, tr, gstate


_run = jax.jit(_run_impl, static_argnums=(0, 1))


def _check_inputs(sampler, denoiser, noise, key, cond):
    if not isinstance(sampler, Sampler):
        raise TypeError(
            "sampler must be made by jaxdiv.samplers (ddim, edm, flow_euler), "
            f"got {type(sampler).__name__}"
        )
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable (x, t, cond) -> x0_hat, got {type(denoiser)}")
    if not hasattr(noise, "shape") or not hasattr(noise, "dtype"):
        raise TypeError(f"noise must be an array, got {type(noise).__name__}")
    noise = jnp.asarray(noise)
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a leading batch dimension >= 1, got shape {noise.shape}")
    if not jnp.issubdtype(noise.dtype, jnp.floating):
        raise TypeError(f"noise must be a floating array, got dtype {noise.dtype}")
    # NumPy, not jnp: under an outer jit a captured concrete array must not be staged
    if not isinstance(noise, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(noise))):
        raise ValueError("noise contains NaN or inf values")
    if key is None:
        raise TypeError("key is required: pass key=jax.random.key(seed)")
    b = noise.shape[0]
    for path, leaf in jax.tree_util.tree_leaves_with_path(cond):
        shape = np.shape(leaf)
        name = "cond" + jax.tree_util.keystr(path)
        if len(shape) < 1 or shape[0] != b:
            raise ValueError(
                f"{name} must have the batch size of noise ({b}) as its leading dimension, "
                f"got shape {shape}"
            )
        if not isinstance(leaf, jax.core.Tracer) and jnp.issubdtype(
            jnp.result_type(leaf), jnp.floating
        ):
            if not np.all(np.isfinite(np.asarray(leaf))):
                raise ValueError(f"{name} contains NaN or inf values")
    return noise


def sample(
    sampler: Sampler,
    denoiser,
    noise,
    *,
    key,
    cond=None,
    guidance=None,
    trace: bool = False,
    guidance_state=None,
) -> SampleOutput:
    """Run ``sampler`` from ``noise`` to clean samples with optional guidance.

    The whole trajectory is one ``lax.scan`` inside one jitted computation; calling again
    with the same sampler, denoiser and guidance objects and the same shapes reuses the
    compiled program. Everything is differentiable: ``jax.grad`` of a function of
    ``out.x0`` reaches the noise, the condition, array fields of the denoiser (e.g. a GMM's
    means), of the schedule and of guidance terms. Works under an outer ``jit``/``vmap``.

    Args:
        sampler: from :mod:`jaxdiv.samplers`.
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` on the whole batch; ``t`` is a scalar
            process time. A callable pytree (like ``toy.GaussianMixture.denoiser``) has
            its arrays traced; a closure's arrays are compiled-in arguments.
        noise: standard normal ``(B, ...)``; the sampler scales it (by ``sigma_max`` on EDM),
            so the same noise gives comparable runs across samplers.
        key: PRNG key for the samplers' and guidance terms' randomness. Sample ``b`` uses
            ``split(key, B)[b]``-derived streams, so without coupling terms a sample does
            not depend on the batch size.
        cond: optional condition pytree, leading dimension ``B``.
        guidance: a :class:`~jaxdiv.guidance.GuidanceTerm` or a ``guidance.chain(...)``.
        trace: also return a :class:`Trace` of per-step ``x``, ``x0_hat`` and guidance info.
        guidance_state: continue from a previous call's ``out.state`` (e.g. SPELL's memory
            of earlier batches) instead of ``init``-ing the terms.

    Returns:
        :class:`SampleOutput` with ``x0`` (shape of ``noise``), ``trace`` and ``state``.
        ``x0`` equals the last step's guided ``x0_hat`` (the grid ends at sigma = 0).

    >>> import jax, jax.numpy as jnp, jaxdiv, toy
    >>> from jaxdiv import samplers, schedules
    >>> gm = toy.GaussianMixture(jnp.array([[-2.0], [2.0]]), jnp.array([0.1, 0.1]),
    ...                          jnp.array([0.5, 0.5]))
    >>> sch = schedules.edm()
    >>> noise = jax.random.normal(jax.random.key(0), (512, 1))
    >>> out = jaxdiv.sample(samplers.edm(sch, 32), gm.denoiser(sch), noise,
    ...                     key=jax.random.key(1))
    >>> bool(abs(jnp.abs(out.x0).mean() - 2.0) < 0.1)
    True
    """
    noise = _check_inputs(sampler, denoiser, noise, key, cond)
    terms = as_terms(guidance)
    if guidance_state is None:
        x_init = sampler.schedule.init_noise_scale(sampler.times[0]) * noise
        guidance_state = init_terms(terms, x_init, cond, jax.random.fold_in(key, 0x5EED))
    else:
        guidance_state = tuple(guidance_state)
        if len(guidance_state) != len(terms):
            raise ValueError(
                f"guidance_state has {len(guidance_state)} entries but guidance has "
                f"{len(terms)} terms; pass the .state of a call with the same guidance"
            )
    dynamic, spec = _partition((sampler, denoiser, terms))
    x0, tr, state = _run(spec, bool(trace), dynamic, noise, key, cond, guidance_state)
    return SampleOutput(x0, tr, state)
