"""SPELL: sparse repellency (Kirchhof et al., ICML 2025), an ``x0``-hook guidance term.

At every denoiser evaluation, each sample's prediction ``x0_hat_i`` is pushed out of every
*shield* — a ball of radius ``r`` around a centre ``z_k`` — it has entered:

    ``x0_hat_i <- x0_hat_i + lambda * Delta_i``,
    ``Delta_i = sum_k relu(r / |x0_hat_i - z_k| - 1) (x0_hat_i - z_k)``   (Eq. 5 / Eq. 7)

with overcompensation ``lambda`` (1 exact, 1.6 the paper's choice for SD3/LDM). The
shields are the union of

* a static **reference** set (protected images; up to millions, searched exactly in
  memory-bounded blocks by :mod:`jaxdiv.guidance.spell.radius_search`),
* the other batch members' current ``x0_hat`` (**intra-batch**, Eq. 7, self excluded),
* a **memory** of earlier batches' outputs, carried in the term's state across
  :func:`jaxdiv.sample` calls (see :func:`jaxdiv.recipes.spell_batched`).

The correction is zero outside all shields, so trajectories that never enter one are
bitwise identical to unguided ones (Sec. 5.4's sparsity).

**The guarantee, exactly (App. B).** Every sampler in jaxdiv ends its grid at the clean
endpoint, where its output *is* the last guided ``x0_hat``. If at that last evaluation
**all shields are pairwise disjoint** (centres ``>= 2r`` apart), then with ``lambda = 1``
a corrected ``x0_hat_i`` lies on the sphere of radius ``r`` around the one shield it was
in, and so outside every other shield: the final sample is at distance ``>= r`` from every
centre (up to float32 rounding, ~1e-6 relative). It is *not* enough that the shields
containing ``x0_hat_i`` are disjoint: the push can land in a shield it was not in (``r =
1``, centres ``(0, 0)`` and ``(1.6, 0)``, ``x0_hat = (0.5, 0)`` is only in the first and
is moved to ``(1, 0)``, 0.6 from the second centre). With ``lambda > 1`` the corrected
point is at distance ``r + (lambda - 1)(r - |x0_hat_i - z|) in [r, lambda r]`` from its
centre: the guarantee needs centres ``>= (1 + lambda) r`` apart. No guarantee holds when
shields overlap: two shields can cancel (a point midway between two centres ``r`` apart
is not moved). Intra-batch shields move with the batch, so for ``B > 2`` pairwise
distances ``>= r`` are *not* guaranteed; for ``B = 2`` (no other shields) both move apart
symmetrically, to distance ``d + 2 lambda (r - d) >= r`` for ``lambda >= 1/2``. The tests
in ``tests/test_spell.py`` show each of these cases.

**Feature-space shields** (the paper's "semantic shields", future work in Sec. 5.6):
given a differentiable ``feature_map`` ``phi``, the shields live in feature space and
Eq. 5 gives a *target* ``phi_i* = phi(x0_hat_i) + lambda Delta_i`` outside them. It is
pulled back to ``x0`` by ``pullback_steps`` minimum-norm Gauss-Newton steps
``x <- x + pinv(J_phi(x)) (phi_i* - phi(x))``. What this guarantees: if ``phi`` is affine
with full row rank, one step reaches the target exactly, so the feature-space guarantee
above holds for the final samples. For a nonlinear ``phi`` the info field
``pullback_residual`` ``rho_i = |phi(x0_new_i) - phi_i*|`` bounds the violation: the
final features are at distance ``>= r - rho_i`` from every (disjoint) shield centre,
by the triangle inequality — nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.dtypes import working_dtype
from jaxdiv.grouping import branch
from jaxdiv.guidance.base import GuidanceTerm
from jaxdiv.guidance.spell.radius_search import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_EXACT_BYTES,
    IVFIndex,
    ShieldIndex,
    build_index,
    ivf_repulsion,
    repulsion,
)
from jaxdiv.guidance.spell.sharded import ShardedShieldIndex
from jaxdiv.guidance.spell.sharded import repulsion as sharded_repulsion

__all__ = [
    "spell",
    "SpellInfo",
    "SpellState",
    "spell_delta",
    "repulsion_field",
    "repulsion_potential",
    "median_pairwise_distance",
    "reference_index",
]


_MAX_RADIUS = 1e18


class SpellState(NamedTuple):
    """State of a SPELL term: the shield memory of earlier batches.

    Attributes:
        memory: ``(capacity, f)`` shield vectors (flattened ``x0`` or features) of the
            final samples of earlier :func:`jaxdiv.sample` calls; a ring buffer.
        count: int32 scalar, the number of vectors written so far (the first
            ``min(count, capacity)`` rows are valid).
    """

    memory: jax.Array
    count: jax.Array


class SpellInfo(NamedTuple):
    """Per-evaluation SPELL diagnostics, each ``(B,)``.

    Attributes:
        active: some shield centre is strictly within ``r`` of ``x0_hat_i`` (the term
            changed sample ``i``).
        num_active_shields: how many (reference + batch + memory).
        delta_norm: ``|lambda Delta_i|``, the size of the ``x0`` correction.
        score_ratio: ``|s(x0_new) - s(x0_hat)| / |s(x0_hat)|`` with Tweedie's score
            ``s(x0) = (alpha x0 - x_t) / sigma^2``: the norm of the gradient SPELL adds to
            the score over the score's norm (Sec. 5.4, Fig. 5a); ``= alpha |lambda Delta|
            / |alpha x0_hat - x_t|``.
        pullback_residual: feature mode only, ``|phi(x0_new_i) - phi_i*|`` (0 otherwise).
    """

    active: jax.Array
    num_active_shields: jax.Array
    delta_norm: jax.Array
    score_ratio: jax.Array
    pullback_residual: jax.Array


def repulsion_field(x, radius):
    """``h(x) = relu(r / |x| - 1) x``, one shield's correction at offset ``x = x0_hat - z``.

    Eq. 5's summand; App. C shows it is the gradient of :func:`repulsion_potential`.
    Defined as 0 at ``x = 0`` (no direction). Acts on the last axis.

    >>> repulsion_field(jnp.array([0.5, 0.0]), 2.0).tolist()    # moved onto |x| = 2
    [1.5, 0.0]
    """
    x = jnp.asarray(x)
    n2 = jnp.sum(x * x, axis=-1, keepdims=True)
    pos = n2 > 0
    n = jnp.sqrt(jnp.where(pos, n2, 1.0))
    return jnp.where(pos, jax.nn.relu(radius / n - 1.0), 0.0) * x


def repulsion_potential(x, radius):
    """``H(x) = r|x| - |x|^2/2`` for ``|x| < r``, ``r^2/2`` otherwise (App. C, Eq. 8).

    Its gradient is :func:`repulsion_field` (so ``h`` is conservative), continuous at
    ``|x| = r``. Acts on the last axis.

    >>> float(repulsion_potential(jnp.array([3.0, 4.0]), 10.0))   # 10*5 - 25/2
    37.5
    """
    x = jnp.asarray(x)
    n2 = jnp.sum(x * x, axis=-1)
    pos = n2 > 0
    n = jnp.where(pos, jnp.sqrt(jnp.where(pos, n2, 1.0)), 0.0)
    return jnp.where(n < radius, radius * n - 0.5 * n2, 0.5 * radius**2)


def spell_delta(x0_hat, radius, reference=None, intra_batch=True):
    """Eq. 5 + Eq. 7 directly (dense, no blocks): ``Delta (B, d)`` before overcompensation.

    A small reference implementation of the paper's Algorithm 2 for checks and notebooks;
    :func:`spell` computes the same sum blockwise (and handles ``x0_hat == z`` exactly).

    >>> x = jnp.array([[0.0, 0.0], [0.5, 0.0]])
    >>> spell_delta(x, 1.0).tolist()     # each pushed 0.5 away from the other
    [[-0.5, 0.0], [0.5, 0.0]]
    """
    x = jnp.asarray(x0_hat).reshape(jnp.shape(x0_hat)[0], -1)
    out = jnp.zeros_like(x)
    if reference is not None:
        z = jnp.asarray(reference).reshape(jnp.shape(reference)[0], -1)
        out = out + jnp.sum(repulsion_field(x[:, None, :] - z[None], radius), axis=1)
    if intra_batch:
        h = repulsion_field(x[:, None, :] - x[None, :, :], radius)  # diagonal: h(0) = 0
        out = out + jnp.sum(h, axis=1)
    return out


class _SpellShape(NamedTuple):
    """What ``init`` needs: the memory layout and the shield space's size."""

    memory_size: int
    memory_block: int
    feature_map: Any
    reference_dim: int  # 0 without a reference set


def _spell_init(p: _SpellShape, x, cond, key):
    b = x.shape[0]
    if p.memory_size and b > p.memory_size:
        raise ValueError(
            f"memory_size ({p.memory_size}) must be >= the batch size ({b}) so one "
            "batch's outputs fit in the shield memory"
        )
    if p.feature_map is None:
        f = int(np.prod(x.shape[1:]))
    else:
        f = int(np.prod(jax.eval_shape(p.feature_map, x).shape[1:]))
    if p.reference_dim and p.reference_dim != f:
        space = "sample" if p.feature_map is None else "feature"
        raise ValueError(
            f"reference has {p.reference_dim} values per shield but the {space} space "
            f"has {f} (per-sample shape {tuple(x.shape[1:])}); pass reference rows of "
            "that size"
        )
    cap = 0
    if p.memory_size:
        bs = p.memory_block
        cap = -(-p.memory_size // bs) * bs
    return SpellState(jnp.zeros((cap, f), jnp.float32), jnp.zeros((), jnp.int32))


class _SpellParams(NamedTuple):
    """SPELL's hyperparameters: arrays (radius, lambda, the reference index) are traced
    leaves, the ints and the feature map shape the program."""

    radius: jax.Array
    overcompensation: jax.Array
    reference: Any
    intra_batch: bool
    memory_size: int
    memory_block: int
    feature_map: Callable | None
    pullback_steps: int
    nprobe: int
    exact_bytes: int


def _batch_index(q):
    centre = jnp.mean(q, axis=0)
    qc = q - centre
    sq = jnp.sum(qc * qc, axis=-1)
    return ShieldIndex(qc[None], sq[None], jnp.ones((1, q.shape[0]), bool), centre)


def _memory_index(p, state, centre):
    cap, f = state.memory.shape
    bs = p.memory_block
    pts = state.memory.reshape(cap // bs, bs, f) - centre
    filled = jnp.minimum(state.count, cap)
    valid = (jnp.arange(cap) < filled).reshape(cap // bs, bs)
    sq = jnp.sum(pts * pts, axis=-1)
    return ShieldIndex(pts, sq, valid, centre)


def _pullback(phi, x0_hat, target, active, steps):
    """Minimum-norm Gauss-Newton steps ``x <- x + pinv(J) (target - phi(x))`` per sample."""

    def phi1(xi):
        return phi(xi[None])[0].reshape(-1).astype(jnp.float32)

    def one(xi, ti):
        def body(x, _):
            res = ti - phi1(x)
            jac = jax.jacrev(phi1)(x).reshape(ti.shape[0], -1)
            dx = jnp.linalg.pinv(jac) @ res
            return x + dx.reshape(x.shape).astype(x.dtype), None

        return lax.scan(body, xi, None, length=steps)[0]

    def run(_):
        moved = jax.vmap(one)(x0_hat, target)
        mask = active.reshape((-1,) + (1,) * (x0_hat.ndim - 1))
        return jnp.where(mask, moved, x0_hat)

    return branch(jnp.any(active), run, lambda _: x0_hat, None)


def _norm(v):
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1).astype(jnp.float32) ** 2, axis=-1))


def _spell_apply(p: _SpellParams, state: SpellState, x0_hat, ctx):
    b = x0_hat.shape[0]
    x0f = x0_hat.reshape(b, -1).astype(jnp.float32)
    feature_mode = p.feature_map is not None
    if feature_mode:
        qs = p.feature_map(x0_hat).reshape(b, -1).astype(jnp.float32)
        qa = None  # no anchors in feature space: exact ties take the fixed pair direction
    else:
        qs = x0f
        qa = ctx.x.reshape(b, -1).astype(jnp.float32)
    alpha = jnp.asarray(ctx.alpha, jnp.float32)
    r = p.radius
    delta = jnp.zeros_like(qs)
    count = jnp.zeros((b,), jnp.int32)

    if p.reference is not None:
        if isinstance(p.reference, IVFIndex):
            rep = ivf_repulsion(qs, p.reference, r, p.nprobe, query_anchors=qa,
                                anchor_scale=None if qa is None else alpha)  # fmt: skip
        elif isinstance(p.reference, ShardedShieldIndex):
            rep = sharded_repulsion(qs, p.reference, r, query_anchors=qa,
                                    shield_anchors=None if qa is None else alpha,
                                    exact_bytes=p.exact_bytes)  # fmt: skip
        else:
            rep = repulsion(qs, p.reference, r, query_anchors=qa,
                            shield_anchors=None if qa is None else alpha,
                            exact_bytes=p.exact_bytes)  # fmt: skip
        delta, count = delta + rep.delta, count + rep.count
    if p.intra_batch and b > 1:
        idx = _batch_index(qs)
        rep = repulsion(qs, idx, r, query_anchors=qa,
                        shield_anchors=None if qa is None else qa[None],
                        query_ids=jnp.arange(b, dtype=jnp.int32),
                        exact_bytes=p.exact_bytes)  # fmt: skip
        delta, count = delta + rep.delta, count + rep.count
    if p.memory_size:
        idx = _memory_index(p, state, jnp.mean(qs, axis=0))
        rep = repulsion(qs, idx, r, query_anchors=qa,
                        shield_anchors=None if qa is None else alpha,
                        exact_bytes=p.exact_bytes)  # fmt: skip
        delta, count = delta + rep.delta, count + rep.count

    active = count > 0
    lam = p.overcompensation
    residual = jnp.zeros((b,), jnp.float32)
    if feature_mode:
        target = qs + lam * delta
        x_new = _pullback(p.feature_map, x0_hat, target, active, p.pullback_steps)
        feats_new = p.feature_map(x_new).reshape(b, -1).astype(jnp.float32)
        residual = jnp.where(active, _norm(feats_new - target), 0.0)
    else:
        # where(): rows outside every shield keep x0_hat bit for bit (sparsity); the shift
        # is added at float32 or x0_hat's precision, whichever is wider (float64 under x64)
        wide = working_dtype(x0_hat)
        x_flat = x0_hat.reshape(b, -1)
        moved_rows = (x_flat.astype(wide) + lam * delta.astype(wide)).astype(x0_hat.dtype)
        x_new = jnp.where(active[:, None], moved_rows, x_flat).reshape(x0_hat.shape)
        feats_new = None

    if p.memory_size:
        # the last evaluation's corrected x0_hat is the sampler's output: record it
        def write(s):
            vecs = x_new.reshape(b, -1).astype(jnp.float32) if feats_new is None else feats_new
            pos = (s.count + jnp.arange(b, dtype=jnp.int32)) % s.memory.shape[0]
            return SpellState(s.memory.at[pos].set(vecs), s.count + b)

        state = lax.cond(ctx.step == ctx.num_steps - 1, write, lambda s: s, state)

    moved = (x_new - x0_hat).reshape(b, -1).astype(jnp.float32)
    delta_norm = _norm(moved)
    s_old = ctx.score(x0_hat)
    num = alpha * delta_norm / jnp.asarray(ctx.sigma, jnp.float32) ** 2
    den = _norm(s_old)
    ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.where(num > 0, jnp.inf, 0.0))
    info = SpellInfo(active, count, delta_norm, ratio.astype(jnp.float32), residual)
    return x_new, state, info


def spell(
    radius,
    reference=None,
    intra_batch: bool = True,
    overcompensation=1.0,
    *,
    memory_size: int = 0,
    feature_map: Callable | None = None,
    pullback_steps: int = 3,
    nprobe: int = 1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    exact_bytes: int = DEFAULT_EXACT_BYTES,
) -> GuidanceTerm:
    """SPELL guidance term: ``x0_hat + lambda * sum_k relu(r/|x0_hat - z_k| - 1)(x0_hat - z_k)``.

    Kirchhof et al. (2025), Eq. 5 (static shields) and Eq. 7 (intra-batch), scaled by the
    overcompensation factor ``lambda`` (Sec. 3); hook ``"x0"``, so it applies unchanged to
    DDIM, EDM and flow samplers. See the module docstring for what is guaranteed.

    Args:
        radius: shield radius ``0 < r <= 1e18`` in the space the shields live in (App. D
            sets it from :func:`jaxdiv.recipes.radius_from_unguided`). A traced leaf:
            changing it does not recompile.
        reference: static shield centres: an array ``(K, ...)`` (rows are flattened; same
            per-sample size as the samples, or as ``feature_map``'s output), a prebuilt
            :class:`~jaxdiv.guidance.radius_search.ShieldIndex`, or an
            :class:`~jaxdiv.guidance.radius_search.IVFIndex` (approximate search probing
            ``nprobe`` cells, the paper's App. I), or a
            :class:`~jaxdiv.guidance.spell.sharded.ShardedShieldIndex` (split across
            devices, searched exactly on each; built by
            :func:`~jaxdiv.guidance.spell.sharded.build_sharded_index`). Arrays are
            searched exactly.
        intra_batch: repel from the other batch members' current ``x0_hat`` (Eq. 7).
        overcompensation: finite ``lambda > 0`` (1 exact; the paper uses 1.6 for SD3/LDM).
        memory_size: capacity of the shield memory of earlier batches; 0 disables it.
            The last step's corrected ``x0_hat`` (= the output) of each call is written
            into it; pass ``out.state`` as ``guidance_state=`` to the next call. A ring
            buffer of ``memory_size`` rounded up to a multiple of ``min(block_size,
            memory_size)`` rows: once full, the oldest entries are overwritten.
        feature_map: optional differentiable ``phi(x0_batch) -> (B, f)``; shields then
            live in feature space (``reference`` and the memory hold features) and the
            correction is pulled back by ``pullback_steps`` Gauss-Newton steps.
        pullback_steps: Gauss-Newton steps of the feature-space pull-back.
        nprobe: cells probed when ``reference`` is an ``IVFIndex``.
        block_size: rows per block when ``reference`` is an array (matmul tile size) and
            for the memory.
        exact_bytes: memory bound of one exact-distance tile (see ``radius_search``).

    Returns:
        A :class:`~jaxdiv.guidance.GuidanceTerm` with :class:`SpellState` state and
        :class:`SpellInfo` info.

    >>> import jax, jax.numpy as jnp, jaxdiv, toy
    >>> from jaxdiv import samplers, schedules
    >>> gm = toy.GaussianMixture(jnp.zeros((1, 2)), jnp.array([0.01]))   # tight blob
    >>> sch = schedules.edm()
    >>> noise = jax.random.normal(jax.random.key(0), (2, 2))
    >>> out = jaxdiv.sample(samplers.edm(sch, 10), gm.denoiser(sch), noise,
    ...                     key=jax.random.key(1), guidance=spell(radius=0.5))
    >>> bool(jnp.linalg.norm(out.x0[0] - out.x0[1]) >= 0.5 * (1 - 1e-5))
    True
    """
    radius = validation.real("radius", radius, lo=0, lo_open=True)
    if validation.is_concrete(radius) and float(radius) > _MAX_RADIUS:
        # every distance would compare as inside
        raise ValueError(f"radius must be <= {_MAX_RADIUS:g} (r^2 overflows float32 beyond "
                         f"it), got {float(radius):g}")  # fmt: skip
    overcompensation = validation.real("overcompensation", overcompensation, lo=0, lo_open=True)
    intra_batch = validation.boolean("intra_batch", intra_batch)
    memory_size = validation.integer("memory_size", memory_size, 0)
    pullback_steps = validation.integer("pullback_steps", pullback_steps, 1)
    nprobe = validation.integer("nprobe", nprobe, 1)
    block_size = validation.integer("block_size", block_size, 1)
    exact_bytes = validation.integer("exact_bytes", exact_bytes, 1)
    if feature_map is not None:
        validation.function("feature_map", feature_map, "(x0 batch) -> (B, f)")
    if reference is None and not intra_batch and memory_size == 0:
        raise ValueError("spell with intra_batch=False, no reference and memory_size=0 has no "
                         "shields and would never act: pass reference=, memory_size= or "
                         "intra_batch=True")  # fmt: skip
    reference = reference_index(reference, block_size)
    if isinstance(reference, IVFIndex) and nprobe > reference.centroids.shape[0]:
        raise ValueError(
            f"nprobe must be <= the IVF index's {reference.centroids.shape[0]} cells, got {nprobe}"
        )
    memory_block = int(min(block_size, memory_size)) if memory_size else 1
    params = _SpellParams(
        radius, overcompensation, reference, intra_batch, memory_size, memory_block,
        feature_map, pullback_steps, nprobe, exact_bytes,
    )  # fmt: skip
    ref_dim = 0
    if reference is not None:
        ref_dim = reference.centroids.shape[1] if isinstance(reference, IVFIndex) else reference.dim
    init = Partial(_spell_init, _SpellShape(memory_size, memory_block, feature_map, int(ref_dim)))
    return GuidanceTerm(init, Partial(_spell_apply, params), "x0", "spell")


def reference_index(reference, block_size: int = DEFAULT_BLOCK_SIZE):
    """:func:`spell`'s ``reference`` as a search index: an array ``(K, ...)`` is checked
    and stored as a :class:`~jaxdiv.guidance.radius_search.ShieldIndex` of ``block_size``
    rows per block; an index (or ``None``) is returned as it is. Terms given one index
    share it (``guidance.per_group`` then passes it to the program once).

    >>> reference_index(jnp.zeros((5, 2)), block_size=2).points.shape
    (3, 2, 2)
    """
    indexes = (ShieldIndex, IVFIndex, ShardedShieldIndex)
    if reference is None or isinstance(reference, indexes):
        return reference
    if not hasattr(reference, "shape"):
        raise TypeError(
            "reference must be an array (K, ...), a ShieldIndex, a ShardedShieldIndex or "
            f"an IVFIndex, got {type(reference).__name__}"
        )
    if np.ndim(reference) < 2 or np.shape(reference)[0] < 1:
        raise ValueError(
            f"reference must have shape (K, ...) with K >= 1, got {np.shape(reference)}"
        )
    if not isinstance(reference, jax.core.Tracer):
        validation.finite_array("reference", reference)
    return build_index(reference, block_size)


def median_pairwise_distance(x) -> jax.Array:
    """Median of ``|x_i - x_j|`` over pairs ``i < j`` (rows flattened).

    The scale the paper uses to set SPELL's radius (App. D). Memory grows as ``n^2 + n d``
    (one row of distances at a time), so a few thousand SD latents fit.

    >>> float(median_pairwise_distance(jnp.array([[0.0], [1.0], [3.0]])))
    2.0
    """
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"x must have shape (n, ...) with n >= 2, got {x.shape}")
    x = x.reshape(x.shape[0], -1).astype(jnp.float32)
    # one row of distances at a time: O(n^2 + n d) memory, not the O(n^2 d) of every pair's
    # difference at once (gigabytes for a few thousand SD latents)
    rows = jax.lax.map(lambda xi: jnp.sqrt(jnp.sum((xi - x) ** 2, axis=-1)), x)
    iu, ju = np.triu_indices(x.shape[0], k=1)
    return jnp.median(rows[iu, ju])


# guidance.couples_batch: only the intra-batch shields make samples act on each other;
# guidance.needs_batch: with nothing else to repel from (no reference, no memory) a lone
# sample is left as it is
_spell_apply.couples_batch = lambda p: p.intra_batch
_spell_apply.needs_batch = lambda p: p.intra_batch and p.reference is None and not p.memory_size
