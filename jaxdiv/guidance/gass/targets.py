"""GASS targets (Zhu et al., ICML 2026, Sec. 4.2 / Algorithm 1): spherical spread of a
batch of embeddings along ``e_t`` and the principal residual direction ``u_ind``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.dtypes import working_dtype
from jaxdiv.sphere import principal_direction, unit

__all__ = ["AXES", "gass_targets", "spherical_targets", "spp_loss"]

#: Target axes: the paper's (e_t, principal u_ind), the RD ablation (e_t, random u
#: orthogonal to e_t), the IP ablation (two random orthonormal axes, not anchored at e_t).
AXES = ("principal", "random", "isotropic")


def check_radius(value, name):
    """A perturbation radius: a finite number >= 0 (a traced leaf)."""
    return validation.real(name, value, lo=0)


def _check_emb(emb, text_emb):
    emb = jnp.asarray(emb)
    text_emb = jnp.asarray(text_emb)
    if emb.ndim != 2:
        raise ValueError(f"emb must have shape (B, m), got shape {tuple(emb.shape)}")
    if text_emb.ndim != 1 or text_emb.shape[0] != emb.shape[1]:
        raise ValueError(
            f"text_emb must have shape (m,)=({emb.shape[1]},) matching emb, got shape "
            f"{tuple(text_emb.shape)}"
        )
    for name, arr in (("emb", emb), ("text_emb", text_emb)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {arr.dtype}")
    if validation.is_concrete(emb, text_emb):
        # NumPy, not jnp: under an outer trace jnp would stage even concrete constants
        e_np, t_np = np.asarray(emb), np.asarray(text_emb)
        if not (np.all(np.isfinite(e_np)) and np.all(np.isfinite(t_np))):
            raise ValueError("emb and text_emb must be finite (got NaN or inf)")
        if not np.any(t_np != 0):
            raise ValueError("text_emb has zero norm; it must define a direction")
    dtype = working_dtype(jnp.promote_types(emb.dtype, text_emb.dtype))
    return emb.astype(dtype), text_emb.astype(dtype)


def spherical_targets(emb, axis_dep, axis_ind, delta_dep, delta_ind, renormalize=True):
    """GASS targets ``e~_i = (e_i.a + d_i) a + (e_i.u + g_i) u + r_i``, optionally renormalised.

    ``r_i`` is ``e_i``'s residual without its components along the orthonormal axes
    ``a`` (``axis_dep``) and ``u`` (``axis_ind``), so ``e~_i = e_i + d_i a + g_i u``.
    Rows of ``emb`` are L2-normalised first. This is the deterministic half of
    :func:`gass_targets` (which draws the axes and the ``d_i``, ``g_i``).

    Implements GASS (ICML 2026) Sec. 4.2, "latent dynamic spherical guidance".

    Args:
        emb: ``(B, m)`` embeddings.
        axis_dep, axis_ind: ``(m,)`` orthonormal axes (``e_t`` and ``u_ind`` in GASS).
        delta_dep, delta_ind: ``(B,)`` shifts along each axis.
        renormalize: project the targets back onto the unit sphere (the paper's default).

    Returns:
        ``(B, m)`` targets.

    >>> e = jnp.array([[1.0, 0.0, 0.0]])
    >>> a, u = jnp.array([0.0, 1.0, 0.0]), jnp.array([0.0, 0.0, 1.0])
    >>> spherical_targets(e, a, u, jnp.array([0.5]), jnp.array([0.0]), False).tolist()
    [[1.0, 0.5, 0.0]]
    """
    e = unit(jnp.asarray(emb))
    dep = e @ axis_dep + delta_dep
    ind = e @ axis_ind + delta_ind
    residual = e - jnp.outer(e @ axis_dep, axis_dep) - jnp.outer(e @ axis_ind, axis_ind)
    out = dep[:, None] * axis_dep + ind[:, None] * axis_ind + residual
    return unit(out) if renormalize else out


def _random_axes(key, text_emb, emb, num_directions, axes):
    """The two target axes for ``axes`` in :data:`AXES` (see :func:`gass_targets`)."""
    e_t, e = unit(text_emb), unit(emb)
    if axes == "principal":
        return e_t, principal_direction(key, e, e_t, num_directions)
    if axes == "random":
        # one candidate: the shared search returns a uniformly random unit vector of e_t's
        # orthogonal complement (QR of a Gaussian), i.e. exactly the RD ablation
        return e_t, principal_direction(key, e, e_t, 1)
    g = jax.random.normal(key, (e_t.shape[0], 2), e_t.dtype)
    q, _ = jnp.linalg.qr(g, mode="reduced")
    return q[:, 0], q[:, 1]


def draw_targets(key, emb, text_emb, r_dep, r_ind, num_directions, renormalize, axes):
    """One draw of targets: ``(targets, axis_dep, axis_ind, (B, 2) shifts)``."""
    k_dir, k_pert = jax.random.split(key)
    b = emb.shape[0]
    a_dep, a_ind = _random_axes(k_dir, text_emb, emb, num_directions, axes)
    # one draw for both axes (fewer RNG kernels to compile); d and g stay independent
    unif = jax.random.uniform(k_pert, (b, 2), emb.dtype, -1.0, 1.0)
    d, g = unif[:, 0] * r_dep, unif[:, 1] * r_ind
    targets = spherical_targets(emb, a_dep, a_ind, d, g, renormalize)
    return targets, a_dep, a_ind, jnp.stack([d, g], axis=-1)


def check_axes(axes):
    """``axes`` if it is one of :data:`AXES`."""
    return validation.choice("axes", axes, AXES)


def check_num_directions(num_directions, m):
    """Candidate directions of the ``u_ind`` search: an int in ``[1, m - 1]``."""
    num_directions = validation.integer("num_directions", num_directions, 1)
    if num_directions > m - 1:
        raise ValueError(
            f"num_directions must be <= m - 1 = {m - 1} (orthonormal directions in the "
            f"complement of text_emb), got {num_directions}"
        )
    return num_directions


def gass_targets(
    key,
    emb,
    text_emb,
    r_dep=0.02,
    r_ind=0.02,
    num_directions: int = 10,
    renormalize: bool = True,
    *,
    axes: str = "principal",
):
    """Spherical spread targets of GASS and the principal residual direction ``u_ind``.

    Basis identification (the search shared with the SPP metric,
    :func:`jaxdiv.sphere.principal_direction`), then
    ``e~_i = e_i + d_i e_t + g_i u_ind`` with ``d_i ~ U[-r_dep, r_dep]``,
    ``g_i ~ U[-r_ind, r_ind]`` i.i.d., renormalised onto the sphere. All randomness comes
    from ``key``: different keys give fresh directions and perturbations (the public
    code re-seeded here, so every step drew the same ones), the same key reproduces.
    The direction search uses ``jax.random.split(key)[0]`` and the shifts the other half,
    so ``metrics.spp(emb, text_emb, jax.random.split(key)[0])`` finds the same ``u_ind``.

    Implements GASS (ICML 2026) Algorithm 1 and Sec. 4.2.

    Args:
        key: PRNG key.
        emb: ``(B, m)`` image embeddings (rows are L2-normalised).
        text_emb: ``(m,)`` text embedding ``e_t`` (normalised).
        r_dep: radius along ``e_t`` (0 disables the axis: the single-axis ablation).
        r_ind: radius along ``u_ind``.
        num_directions: candidate directions ``N`` of the search (paper: 10).
        renormalize: project targets onto the sphere (False: the "w/o renorm." ablation).
        axes: ``"principal"`` (paper), ``"random"`` (RD ablation: ``u`` a random unit
            vector orthogonal to ``e_t``), ``"isotropic"`` (IP ablation: two random
            orthonormal axes, neither anchored at ``e_t``; the second is returned).

    Returns:
        ``(targets (B, m), u_ind (m,))``.

    >>> import jax, jax.numpy as jnp
    >>> emb = jax.random.normal(jax.random.key(0), (4, 16))
    >>> t, u = gass_targets(jax.random.key(1), emb, jnp.eye(16)[0])
    >>> t.shape, round(float(u[0]), 6), bool(jnp.allclose(jnp.linalg.norm(t, axis=1), 1))
    ((4, 16), 0.0, True)
    """
    emb, text_emb = _check_emb(emb, text_emb)
    r_dep = check_radius(r_dep, "r_dep")
    r_ind = check_radius(r_ind, "r_ind")
    check_axes(axes)
    num_directions = check_num_directions(num_directions, emb.shape[1])
    targets, _, a_ind, _ = draw_targets(
        key, emb, text_emb, r_dep, r_ind, num_directions, bool(renormalize), axes
    )
    return targets, a_ind


def spp_loss(emb, targets):
    """``L_SPP = sum_i (1 - e_i . e~_i)`` with ``e_i`` L2-normalised (GASS Sec. 4.3).

    >>> spp_loss(jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([[1.0, 0.0], [1.0, 0.0]]))
    Array(1., dtype=float32)
    """
    return jnp.sum(1.0 - jnp.sum(unit(emb) * targets, axis=-1))


