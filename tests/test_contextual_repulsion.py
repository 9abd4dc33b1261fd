"""Contextual-space repulsion (Dahary et al. 2026): ``repel_context`` and the MMDiT hook.

The batch operation is checked against its contract (identity at eta = 0, ascent of the
log Vendi score, permutation equivariance, the B = 1 no-op, one compile per structure, an
identity Jacobian, independent CFG halves); then the hook runs inside a tiny random SD3
MMDiT (``jaxdiv.testing.TINY_MMDIT``), called directly and through ``jaxdiv.sample``;
last, the guidance term ``guidance.contextual`` (``hook="model"``) through the SD3
pipeline's own denoiser, against the hook passed by hand.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, metrics
from jaxdiv.guidance import contextual_hook, repel_context

B, S, D = 4, 5, 8
M = 20  # inner steps: one value, so the tests share compiled programs
_repel = jax.jit(repel_context, static_argnames="inner_steps")


def _streams(seed, b=B, offset=0.0):
    return offset + jax.random.normal(jax.random.key(seed), (b, S, D))


def _near_duplicates(seed, b=B, noise=1e-2):
    k1, k2 = jax.random.split(jax.random.key(seed))
    base = jax.random.normal(k1, (1, S, D))
    return base + noise * jax.random.normal(k2, (b, S, D))


def _lv(f):
    return float(metrics.log_vendi(np.asarray(f, np.float32).reshape(f.shape[0], -1)))


def _bits(x):
    return np.asarray(x).tobytes()


def _equal_to_rounding(got, want):
    """Two *different* compiled programs (with and without a hook whose eta is 0) agree to
    a few float32 ulps of the output's largest magnitude: XLA may fuse and vectorise them
    differently (bitwise equal under XLA's default codegen on the hosts tried, not under the
    test suite's cheaper codegen, conftest.py), so bitwise equality there is a property of
    the compiler, not of the hook."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = 8 * np.finfo(np.float32).eps * np.abs(want).max()
    diff = np.abs(got - want).max()
    assert diff <= bound, (diff, bound)


# --------------------------------------------------------------------------- repel_context


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_eta_zero_is_bitwise_identity(dtype):
    f = _streams(0).at[0, 0, 0].set(-0.0).astype(dtype)  # a negative zero survives too
    out, before, after = _repel(f, 0.0, inner_steps=M)
    assert out.dtype == dtype and out.shape == f.shape
    assert _bits(out) == _bits(f)
    assert float(before) == float(after)
    np.testing.assert_allclose(float(before), _lv(f), rtol=1e-5)


@pytest.mark.parametrize("case, eta", [("random", 5.0), ("near_duplicates", 100.0)])
def test_repulsion_raises_log_vendi(case, eta):
    f = _streams(1) if case == "random" else _near_duplicates(1)
    out, before, after = _repel(f, eta, inner_steps=M)
    # the diagnostics are the metric of the input and of the output, both float32: each
    # eigenvalue of the B x B Gram / B carries ~B ulps (5e-7), and the entropy term of the
    # near-duplicates' small eigenvalues (~1e-4) scales that by |log lambda| + 1 ~ 10
    atol = 10 * B * float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(float(before), _lv(f), rtol=1e-4, atol=atol)
    np.testing.assert_allclose(float(after), _lv(out), rtol=1e-4, atol=atol)
    gain = float(after) - float(before)
    headroom = math.log(B) - float(before)  # random streams are almost orthogonal already
    assert gain > (0.1 * headroom if case == "random" else 0.5), (float(before), float(after))
    assert float(after) <= math.log(B) + 1e-5
    assert bool(jnp.all(jnp.isfinite(out)))


def _literal_repel(f, eta, m):
    """The paper's update written out: ``M`` autodiff steps on the flattened streams."""
    x = f.reshape(f.shape[0], -1).astype(jnp.float32)
    grad = jax.jit(jax.grad(lambda z: metrics.log_vendi(z, kernel="cosine")))
    for _ in range(m):
        x = x + (eta / m) * grad(x)
    return x.reshape(f.shape)


@pytest.mark.parametrize("case, eta", [("random", 2.0), ("near-duplicates", 5.0),
                                       ("offset", 200.0)])  # fmt: skip
def test_gram_space_steps_equal_the_literal_autodiff_loop(case, eta):
    f = {"random": _streams(3), "near-duplicates": _near_duplicates(4),
         "offset": _streams(5, offset=3.0)}[case]  # fmt: skip
    got, before, after = _repel(f, eta, inner_steps=M)
    want = _literal_repel(f, eta, M)
    assert float(jnp.linalg.norm(want - f)) > 1e-3 * float(jnp.linalg.norm(f))  # it moved
    scale = float(jnp.abs(want - f).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-3 * scale)
    np.testing.assert_allclose(float(before), _lv(f), atol=1e-5)
    np.testing.assert_allclose(float(after), _lv(want), atol=1e-4)


def test_exact_duplicates_stay_finite():
    """All samples equal: a stationary point of the entropy; the derivative is finite (no
    NaN from repeated eigenvalues) and the stream is not blown up."""
    f = jnp.broadcast_to(_streams(2, b=1), (B, S, D))
    out, before, after = _repel(f, 5.0, inner_steps=M)
    assert bool(jnp.all(jnp.isfinite(out))) and abs(float(before)) < 1e-5
    np.testing.assert_allclose(out, f, rtol=0, atol=1e-3)


def test_huge_eta_and_tiny_or_huge_streams_stay_finite():
    """The inner matrix grows like ``eta / |f|^2`` and overflowed float32 (NaN) far before
    the repelled stream (~ ``eta / |f|``) does: eta = 1e30 on streams of norm ~1, or the
    paper-scale eta = 5 on streams of entries ~1e-18. The update is homogeneous,
    ``repel(c f, c^2 eta) = c repel(f, eta)``, and tends to ``eta`` times a fixed
    direction as eta grows; both hold where the result is representable."""
    f = _streams(5, offset=3.0)
    huge, before, after = _repel(f, 1e30, inner_steps=M)
    assert bool(jnp.all(jnp.isfinite(huge))), "eta = 1e30 gave a non-finite stream"
    assert math.log(B) + 1e-5 >= float(after) > float(before) + 0.5, (before, after)
    # the eta -> infinity limit: eta times a direction already reached at eta = 1e20
    limit = _repel(f, 1e20, inner_steps=M)[0] / 1e20  # entries relative to the largest:
    np.testing.assert_allclose(huge / 1e30, limit, rtol=0,  # small ones carry cancellation
                               atol=1e-5 * float(jnp.abs(limit).max()))  # fmt: skip
    c = 2.0**-60  # a power of two: the scaling is exact
    tiny, *diag = _repel(f * c, 5.0, inner_steps=M)  # = c * repel(f, 5 * 2^120 ~ 6.6e36)
    want, *diag_want = _repel(f, 5.0 / c**2, inner_steps=M)
    assert bool(jnp.all(jnp.isfinite(tiny))) and bool(jnp.all(jnp.isfinite(want)))
    np.testing.assert_allclose(tiny / c, want, rtol=1e-5)
    np.testing.assert_allclose(diag, diag_want, rtol=1e-5)
    # eta = 0 on streams of entries ~1e20: their plain Gram (~1e41) overflowed the
    # before-diagnostic
    same, before_big, _ = _repel(f * 2.0**66, 0.0, inner_steps=M)
    assert _bits(same) == _bits(f * 2.0**66)
    np.testing.assert_allclose(float(before_big), float(_repel(f, 0.0, inner_steps=M)[1]),
                               rtol=1e-6)  # fmt: skip


def test_permutation_equivariance():
    f = _streams(3)
    perm = jnp.array([2, 0, 3, 1])
    out, before, after = _repel(f, 5.0, inner_steps=M)
    out_p, before_p, after_p = _repel(f[perm], 5.0, inner_steps=M)
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([before_p, after_p], [before, after], rtol=1e-5)


def test_single_sample_is_a_no_op():
    f = _streams(4, b=1)
    out, before, after = _repel(f, 1e3, inner_steps=M)
    assert _bits(out) == _bits(f) and float(before) == 0.0 and float(after) == 0.0
    # a [cond; uncond] batch of two: halves of one sample each
    f2 = _streams(4, b=2)
    assert _bits(contextual_hook(1e3, 10, cfg_halves=True)(0, f2)) == _bits(f2)


def test_new_eta_does_not_recompile():
    f = _streams(5)
    start = _repel._cache_size()  # jit(repel_context) instances share one cache
    for eta in (0.5, 1.0, 2.0):
        _repel(f, eta, inner_steps=7)
    assert _repel._cache_size() - start == 1
    # a hook is a pytree whose only leaf is eta: a jitted caller compiles once
    call = jax.jit(lambda s, hook: hook(0, s))
    for eta in (0.5, 1.0, 2.0):
        call(f, contextual_hook(eta, inner_steps=5, blocks=(0, 1)))
    assert call._cache_size() == 1
    leaves = jax.tree.leaves(contextual_hook(1.0, inner_steps=5))
    assert len(leaves) == 1 and float(leaves[0]) == 1.0
    call(f, contextual_hook(1.0, inner_steps=6))  # inner_steps is structure
    assert call._cache_size() == 2


def test_update_is_a_constant_for_gradients():
    """The stop-gradient contract: d f_new / d f is exactly the identity, so an outer
    parameter W with f = x W gets the gradient of ``loss(x W + delta)`` with the offset
    ``delta`` frozen at its value; eta and the diagnostics get no gradient."""
    k1, k2, k3 = jax.random.split(jax.random.key(6), 3)
    x = jax.random.normal(k1, (B, S, D)) + 1.0
    w0 = jnp.eye(D) + 0.3 * jax.random.normal(k2, (D, D))
    eta = 5.0

    def loss(w, eta):
        return jnp.sum(jnp.sin(repel_context(x @ w, eta, inner_steps=M)[0]))

    g_w, g_eta = jax.jit(jax.grad(loss, argnums=(0, 1)))(w0, eta)
    delta = _repel(x @ w0, eta, inner_steps=M)[0] - x @ w0
    assert float(jnp.abs(delta).max()) > 1e-2  # the update is not trivially small
    expected = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w + delta)))(w0)
    np.testing.assert_allclose(g_w, expected, rtol=1e-4, atol=1e-5)
    plain = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(w0)
    assert not np.allclose(g_w, plain, rtol=1e-3, atol=1e-3)  # the offset is seen
    assert float(g_eta) == 0.0
    # eagerly, with a Python float eta (a weakly typed tracer without .astype: it raised)
    assert float(jax.grad(lambda e: repel_context(x, e, inner_steps=M)[0].sum())(5.0)) == 0.0
    # forward mode: the tangent passes through bitwise
    t = jax.random.normal(k3, x.shape)

    def repelled(f):
        return repel_context(f, eta, inner_steps=M)[0]

    t_out = jax.jit(lambda f, t: jax.jvp(repelled, (f,), (t,))[1])(x, t)
    assert _bits(t_out) == _bits(t)
    g_diag = jax.jit(jax.grad(lambda f: repel_context(f, eta, inner_steps=M)[2]))(x)
    assert float(jnp.abs(g_diag).max()) == 0.0


def test_cfg_halves_repel_each_half_independently():
    hook = jax.jit(lambda s, h: h(0, s))
    f = jnp.concatenate([_near_duplicates(7), _near_duplicates(8)])  # [cond; uncond]
    g = f.at[B:].set(_streams(9))  # another unconditional half
    halves = contextual_hook(5.0, inner_steps=M, cfg_halves=True)
    out_f, out_g = hook(f, halves), hook(g, halves)
    assert _bits(out_f[:B]) == _bits(out_g[:B])  # the cond half ignores the uncond half
    for lo in (0, B):  # each half is repel_context of that half alone
        np.testing.assert_allclose(out_f[lo:lo + B], _repel(f[lo:lo + B], 5.0, inner_steps=M)[0],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    joint = hook(f, contextual_hook(5.0, inner_steps=M))  # one group of 2B
    assert not np.allclose(joint, out_f, rtol=1e-3, atol=1e-3)
    assert not np.allclose(hook(g, contextual_hook(5.0, inner_steps=M))[:B], joint[:B],
                           rtol=1e-3, atol=1e-3)  # fmt: skip


def test_blocks_and_argument_checks():
    f = _streams(10)
    hook = contextual_hook(5.0, inner_steps=M, blocks=[2, 0])
    assert hook.func.blocks == (0, 2)
    at = jax.jit(lambda s, h, i: h(i, s), static_argnums=2)
    assert _bits(at(f, hook, 1)) == _bits(f) and _bits(at(f, hook, 2)) != _bits(f)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        repel_context(f, -1.0)
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1"):
        contextual_hook(1.0, inner_steps=0)
    with pytest.raises(ValueError, match="blocks must name at least one block"):
        contextual_hook(1.0, blocks=())
    with pytest.raises(ValueError, match="even batch"):
        contextual_hook(1.0, 5, cfg_halves=True)(0, _streams(10, b=3))
    with pytest.raises(ValueError, match="at least 2-D"):
        repel_context(jnp.ones(3), 1.0)


# --------------------------------------------------------------------------- tiny SD3 MMDiT

M_SD3 = 20
ETA_SD3 = 50.0


@pytest.fixture(scope="module")
def sd3():
    """A tiny SD3-Medium-layout MMDiT (``jaxdiv.testing.TINY_MMDIT``, 16 latent channels,
    3 joint blocks) with random weights (:func:`jaxdiv.testing.random_mmdit`: about 1 s,
    where ``example_sd3_pipeline()`` with torch, two CLIPs, T5 and a VAE takes ~15 s; the
    hook only needs the transformer)."""
    from jaxdiv.models.layers import pure
    from jaxdiv.testing import TINY_MMDIT, random_mmdit

    config = dict(TINY_MMDIT, in_channels=16, out_channels=16)  # SD3's latent channels
    module = random_mmdit(config, seed=0)
    net = pure(module)
    k1, k2, k3 = jax.random.split(jax.random.key(11), 3)
    # one prompt for the whole batch, as the paper's setting: the text streams differ only
    # through the image tokens they attend to
    prompt = jax.random.normal(k1, (1, 6, config["joint_attention_dim"]))
    pooled = jax.random.normal(k2, (1, config["pooled_projection_dim"]))
    noise = jax.random.normal(k3, (B, 16, 8, 8))
    return config, net, prompt, pooled, noise, module


def _recording_velocity(net):
    def run(params, x, timestep, ctx, pooled, hook):
        lv = []

        def recording(i, s):
            out = hook(i, s)
            flat = (s.reshape(s.shape[0], -1), out.reshape(s.shape[0], -1))
            lv.append(jnp.stack([metrics.log_vendi(flat[0]), metrics.log_vendi(flat[1])]))
            return out

        v = net.apply(params, x, timestep, ctx, pooled,
                      context_hook=None if hook is None else recording)  # fmt: skip
        return v, lv

    return jax.jit(run)


def test_mmdit_hook_eta_zero_is_the_plain_run_and_eta_repels(sd3):
    config, net, prompt, pooled, noise, _ = sd3
    run = _recording_velocity(net)
    ctx, pool = jnp.broadcast_to(prompt, (B, *prompt.shape[1:])), jnp.repeat(pooled, B, 0)
    t = jnp.float32(800.0)
    v_plain, _ = run(net.params, noise, t, ctx, pool, None)
    v_zero, lv_zero = run(net.params, noise, t, ctx, pool, contextual_hook(0.0, M_SD3))
    _equal_to_rounding(v_zero, v_plain)
    v_rep, lv_rep = run(net.params, noise, t, ctx, pool, contextual_hook(ETA_SD3, M_SD3))
    assert run._cache_size() == 2  # no hook, and one program for every eta
    num_layers = config["num_layers"]
    lv_zero, lv_rep = np.asarray(lv_zero), np.asarray(lv_rep)
    assert lv_rep.shape == (num_layers - 1, 2)  # every block but the context_pre_only one
    np.testing.assert_array_equal(lv_zero[:, 0], lv_zero[:, 1])
    assert np.all(lv_rep[:, 1] > lv_rep[:, 0] + 0.05), lv_rep
    # repelled streams entering later blocks are more diverse than the unrepelled ones
    assert np.all(lv_rep[:, 1] > lv_zero[:, 0] + 0.05), (lv_rep, lv_zero)
    rel = float(jnp.linalg.norm(v_rep - v_plain) / jnp.linalg.norm(v_plain))
    assert rel > 1e-3, rel


def test_sample_with_hook_under_cfg(sd3):
    """Through ``jaxdiv.sample`` with CFG (batch [cond; uncond], ``cfg_halves=True``) and
    the SD3 denoiser path (velocity -> x0 via ``as_denoiser(..., "flow")``, timestep
    ``1000 t``, shift 3, as ``pipelines.stable_diffusion_3``): one compile for every eta and
    a positive eta changes the final latents (eta = 0 equals no hook to float rounding: the
    velocity test above). Whether it spreads them further apart is a property of trained
    weights: with random tiny MMDiTs the mean pairwise distance of the final latents
    changes by < 1.5%, up or down depending on the seed and eta, so it is not asserted."""
    from jaxdiv import samplers, schedules
    from jaxdiv.pipelines.stable_diffusion import Bound
    from jaxdiv.pipelines.stable_diffusion_3 import SD3Cond
    from jaxdiv.predictions import as_denoiser

    config, net, prompt, pooled, noise, _ = sd3
    schedule = schedules.flow(shift=3.0)

    def apply(params, x, t, cond):
        weights, hook = params  # the hook rides in the params pytree: eta is traced
        timestep = jnp.broadcast_to(jnp.asarray(t, jnp.float32) * 1000.0, (x.shape[0],))
        return net.apply(weights, x, timestep, cond.prompt_embeds, cond.pooled,
                         context_hook=hook)  # fmt: skip

    def denoiser(hook):
        return as_denoiser(Bound(apply, (net.params, hook)), schedule, "flow")

    cond = SD3Cond(jnp.broadcast_to(prompt, (B, *prompt.shape[1:])), jnp.repeat(pooled, B, 0))
    g = guidance.cfg(4.0)  # zero null condition, shaped like cond

    def run(den):
        return jaxdiv.sample(samplers.flow_euler(schedule, 3), den, noise, key=jax.random.key(0),
                             cond=cond, guidance=g).x0  # fmt: skip

    before = jaxdiv.compile_count()
    x_zero = run(denoiser(contextual_hook(0.0, M_SD3, cfg_halves=True)))
    x_rep = run(denoiser(contextual_hook(ETA_SD3, M_SD3, cfg_halves=True)))
    assert jaxdiv.compile_count() - before == 1
    rel = float(jnp.linalg.norm(x_rep - x_zero) / jnp.linalg.norm(x_zero))
    assert rel > 1e-3, rel


# --------------------------------------------------------------------------- the guidance term

ETA_TERM = 50.0


@pytest.fixture(scope="module")
def sd3_den(sd3):
    """The SD3 pipeline's denoiser (``stable_diffusion_3._mmdit_fn``: timestep ``1000 t``,
    ``model_hooks`` to the MMDiT's ``context_hook``; velocity -> x0) on the tiny MMDiT."""
    from jaxdiv import schedules
    from jaxdiv.pipelines.stable_diffusion_3 import SD3Cond, _mmdit_fn
    from jaxdiv.predictions import as_denoiser

    config, net, prompt, pooled, noise, module = sd3
    schedule = schedules.flow(shift=3.0)
    den = as_denoiser(_mmdit_fn(module, 1000), schedule, "flow")
    cond = SD3Cond(jnp.broadcast_to(prompt, (B, *prompt.shape[1:])), jnp.repeat(pooled, B, 0))
    return den, schedule, cond, noise


def _sample_sd3(sd3_den, g, steps=3, trace=False, noise=None, cond=None):
    from jaxdiv import samplers

    den, schedule, cond0, noise0 = sd3_den
    return jaxdiv.sample(samplers.flow_euler(schedule, steps), den,
                         noise0 if noise is None else noise, key=jax.random.key(0),
                         cond=cond0 if cond is None else cond, guidance=g,
                         trace=trace)  # fmt: skip


def test_term_eta_zero_is_the_unguided_run_and_one_program_serves_every_eta_and_tau(sd3_den):
    cfg = guidance.cfg(4.0)
    plain = _sample_sd3(sd3_den, cfg).x0
    before = jaxdiv.compile_count()
    zero = _sample_sd3(sd3_den, guidance.chain(guidance.contextual(0.0, M_SD3, tau=3), cfg)).x0
    _equal_to_rounding(zero, plain)
    rep = _sample_sd3(sd3_den, guidance.chain(guidance.contextual(ETA_TERM, M_SD3, tau=2),
                                              cfg)).x0  # fmt: skip
    assert jaxdiv.compile_count() - before == 1
    rel = float(jnp.linalg.norm(rep - plain) / jnp.linalg.norm(plain))
    assert rel > 1e-3, rel


def test_term_equals_the_hook_passed_by_hand_with_cfg_halves(sd3, sd3_den):
    """Independent plumbing: the term (group = the sampler's batch B, on CFG's 2B model
    batch) gives bitwise the run where ``contextual_hook(eta, cfg_halves=True)`` is handed
    to the MMDiT directly through the model's parameters (no ``model_hooks``)."""
    from jaxdiv.pipelines.stable_diffusion import Bound
    from jaxdiv.predictions import as_denoiser

    config, net, *_ = sd3
    den, schedule, cond, noise = sd3_den

    def apply(params, x, t, c):
        weights, hook = params
        timestep = jnp.broadcast_to(jnp.asarray(t, jnp.float32) * 1000.0, (x.shape[0],))
        return net.apply(weights, x, timestep, c.prompt_embeds, c.pooled, context_hook=hook)

    by_hand = as_denoiser(Bound(apply, (net.params, contextual_hook(ETA_TERM, M_SD3,
                                                                    cfg_halves=True))),
                          schedule, "flow")  # fmt: skip
    cfg = guidance.cfg(4.0)
    want = jaxdiv.sample(_flow(schedule, 3), by_hand, noise, key=jax.random.key(0), cond=cond,
                         guidance=cfg).x0  # fmt: skip
    got = _sample_sd3(sd3_den, guidance.chain(guidance.contextual(ETA_TERM, M_SD3, tau=None),
                                              cfg)).x0  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def _flow(schedule, n):
    from jaxdiv import samplers

    return samplers.flow_euler(schedule, n)


def _numpy_log_vendi(streams):
    """von Neumann entropy of K / B, K the cosine kernel of the flattened rows (NumPy)."""
    f = np.asarray(streams, np.float64).reshape(len(streams), -1)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    w = np.clip(np.linalg.eigvalsh(f @ f.T / len(f)), 0, None)
    return float(-np.sum(w[w > 0] * np.log(w[w > 0])))


def _first_call_log_vendi(sd3, x, t, cond):
    """Log Vendi of the conditional half's text streams before/after each hooked block, for
    the first model call of a CFG step (batch ``[x; x]``, conditions ``[cond; 0]``), from
    streams recorded by an eager hook of our own around ``contextual_hook``."""
    config, net, *_ = sd3
    hook = contextual_hook(ETA_TERM, M_SD3, cfg_halves=True)
    seen = []

    def recording(i, s):
        out = hook(i, s)
        seen.append((_numpy_log_vendi(s[:B]), _numpy_log_vendi(out[:B])))
        return out

    both = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros_like(a)]), cond)
    timestep = jnp.full((2 * B,), 1000.0 * t, jnp.float32)
    net.apply(net.params, jnp.concatenate([x, x]), timestep, both.prompt_embeds, both.pooled,
              context_hook=recording)  # fmt: skip
    return np.asarray(seen)


def test_tau_is_a_step_window_and_the_trace_reports_the_scale_and_log_vendi(sd3, sd3_den):
    cfg = guidance.cfg(4.0)
    by_tau = _sample_sd3(sd3_den, guidance.chain(guidance.contextual(ETA_TERM, M_SD3, tau=2),
                                                 cfg), trace=True)  # fmt: skip
    by_window = _sample_sd3(sd3_den, guidance.chain(
        guidance.window(guidance.contextual(ETA_TERM, M_SD3, tau=None), steps=[0, 1]), cfg),
        trace=True)
    assert _bits(by_tau.x0) == _bits(by_window.x0)
    info = by_tau.trace.info["contextual"]
    np.testing.assert_array_equal(info.eta, [ETA_TERM, ETA_TERM, 0])
    np.testing.assert_array_equal(by_window.trace.active["contextual"], [True, True, False])
    np.testing.assert_array_equal(by_window.trace.info["contextual"].eta, [ETA_TERM, ETA_TERM, 0])
    # per step and hooked block (TINY_MMDIT: after blocks 0 and 1), the conditional branch
    np.testing.assert_array_equal(info.blocks, [[0, 1]] * 3)
    before, after = np.asarray(info.log_vendi_before), np.asarray(info.log_vendi_after)
    assert before.shape == after.shape == (3, 2)
    assert np.all(after[:2] > before[:2] + 0.05), (before, after)
    np.testing.assert_array_equal(after[2], before[2])  # eta = 0 from step tau on
    assert np.all(before <= math.log(B) + 1e-5)
    # step 0 against the streams recorded by hand on the same model call
    _, _, cond, _ = sd3_den
    want = _first_call_log_vendi(sd3, by_tau.trace.x[0], float(by_tau.trace.t[0]), cond)
    np.testing.assert_allclose(np.stack([before[0], after[0]], 1), want, rtol=2e-4)
    for name in ("log_vendi_before", "log_vendi_after"):
        np.testing.assert_array_equal(getattr(by_window.trace.info["contextual"], name),
                                      getattr(info, name))  # fmt: skip


def test_log_vendi_reaches_the_trace_through_a_windowed_denoiser_term(sd3_den):
    """CFG in a step window (interval-style): at step 0 the model sees [cond; uncond], at
    steps 1, 2 only the conditional batch; the reports leave ``window``'s ``lax.cond``."""
    g = guidance.chain(guidance.contextual(ETA_TERM, M_SD3),
                       guidance.window(guidance.cfg(4.0), steps=[0]))  # fmt: skip
    out = _sample_sd3(sd3_den, g, trace=True)
    np.testing.assert_array_equal(out.trace.active["cfg"], [True, False, False])
    info = out.trace.info["contextual"]
    before, after = np.asarray(info.log_vendi_before), np.asarray(info.log_vendi_after)
    assert before.shape == (3, 2) and np.all(np.isfinite(before))
    assert np.all(after > before + 0.05), (before, after)


def test_a_denoiser_term_hiding_its_model_call_is_refused(sd3_den):
    from jaxdiv.guidance.base import GuidanceTerm, no_state

    def apply(state, denoise, ctx):  # the model call inside a lax.cond of its own
        x0 = jax.lax.cond(ctx.step < 1, lambda: denoise(ctx.x, ctx.cond),
                          lambda: denoise(ctx.x, ctx.cond))  # fmt: skip
        return x0, state, ()

    g = guidance.chain(guidance.contextual(ETA_TERM, M_SD3),
                       GuidanceTerm(no_state, apply, "denoiser", "own"))  # fmt: skip
    with pytest.raises(ValueError, match="'own' called denoise inside a transformation"):
        _sample_sd3(sd3_den, g)


def test_composes_with_cfg_and_spell_in_one_chain(sd3_den):
    """SPELL's intra-batch guarantee (final latents at least r apart: flow Euler's last
    step lands on the corrected x0_hat) holds with contextual repulsion inside the model."""
    cfg = guidance.cfg(4.0)
    base = _sample_sd3(sd3_den, guidance.chain(guidance.contextual(ETA_TERM, M_SD3), cfg)).x0
    flat = np.asarray(base, np.float64).reshape(B, -1)
    d = np.linalg.norm(flat[:, None] - flat[None], axis=-1)[np.triu_indices(B, 1)]
    r = 1.05 * float(d.max())  # every pair must move
    g = guidance.chain(guidance.contextual(ETA_TERM, M_SD3), cfg,
                       guidance.spell(r, intra_batch=True, overcompensation=1.6))
    out = _sample_sd3(sd3_den, g, trace=True)
    flat = np.asarray(out.x0, np.float64).reshape(B, -1)
    d = np.linalg.norm(flat[:, None] - flat[None], axis=-1)[np.triu_indices(B, 1)]
    assert d.min() >= r * (1 - 1e-5), (d.min(), r)
    assert set(out.trace.info) == {"contextual", "cfg", "spell"}


@pytest.mark.exact_codegen
def test_one_sample_is_a_no_op(sd3_den):
    den, schedule, cond, noise = sd3_den
    one = jax.tree.map(lambda a: a[:1], cond)
    cfg = guidance.cfg(4.0)
    plain = _sample_sd3(sd3_den, cfg, noise=noise[:1], cond=one).x0
    rep = _sample_sd3(sd3_den, guidance.chain(guidance.contextual(ETA_TERM, M_SD3), cfg),
                      noise=noise[:1], cond=one, trace=True)  # fmt: skip
    assert _bits(rep.x0) == _bits(plain)
    info = rep.trace.info["contextual"]  # one stream: log Vendi 0 before and after
    np.testing.assert_array_equal(info.log_vendi_before, np.zeros((3, 2)))
    np.testing.assert_array_equal(info.log_vendi_after, np.zeros((3, 2)))


def test_blocks_the_model_never_hooks_are_refused(sd3_den):
    # TINY_MMDIT has 3 joint blocks; the last is context_pre_only: hooks after 0 and 1 only
    cfg = guidance.cfg(4.0)
    with pytest.raises(ValueError, match=r"runs hooks after blocks 0\.\.1 only"):
        _sample_sd3(sd3_den, guidance.chain(guidance.contextual(1.0, 2, blocks=[1, 2]), cfg))


def test_a_denoiser_without_model_hooks_is_refused():
    from jaxdiv import samplers, schedules

    den = lambda x, t, c: x / (1 + t**2)  # noqa: E731
    with pytest.raises(TypeError, match=r"\['contextual'\] act inside the model.*model_hooks"):
        jaxdiv.sample(samplers.ddim(schedules.edm(), 2), den, jnp.ones((2, 3)),
                      key=jax.random.key(0), guidance=guidance.contextual(1.0))  # fmt: skip
    # a network wrapped as a denoiser: the message names the network, not only the wrapper
    from jaxdiv.predictions import as_denoiser

    def my_unet(x, t, c):
        return x

    wrapped = as_denoiser(my_unet, schedules.vp_scaled_linear())
    with pytest.raises(TypeError, match=r"\(PredictionDenoiser wrapping my_unet\) does not take"):
        jaxdiv.sample(samplers.ddim(schedules.vp_scaled_linear(), 2), wrapped, jnp.ones((2, 3)),
                      key=jax.random.key(0), guidance=guidance.contextual(1.0))  # fmt: skip


def test_term_argument_checks():
    with pytest.raises(ValueError, match="tau must be an integer >= 1"):
        guidance.contextual(1.0, tau=0)
    with pytest.raises(TypeError, match="tau must be an integer"):
        guidance.contextual(1.0, tau=2.5)
    with pytest.raises(ValueError, match="eta"):
        guidance.contextual(-1.0)
    with pytest.raises(ValueError, match="eta"):
        guidance.contextual(float("nan"))
    with pytest.raises(ValueError, match="blocks must name at least one block"):
        guidance.contextual(1.0, blocks=[])
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1"):
        guidance.contextual(1.0, inner_steps=0)


def test_groups_repel_within_themselves_inside_the_model(sd3_den):
    """``jaxdiv.sample(groups=2)``: the repulsion inside the MMDiT acts within each half of
    the batch, each half as its own call (the hook runs under the groups' vmap)."""
    from jaxdiv import samplers

    den, schedule, cond, noise = sd3_den
    g = guidance.chain(guidance.contextual(ETA_TERM, M_SD3), guidance.cfg(4.0))
    half = B // 2
    grouped = jaxdiv.sample(samplers.flow_euler(schedule, 3), den, noise, key=jax.random.key(0),
                            cond=cond, guidance=g, groups=2, trace=True)  # fmt: skip
    for j in range(2):
        rows = slice(j * half, (j + 1) * half)
        part = jax.tree.map(lambda a, rows=rows: a[rows], cond)
        own = _sample_sd3(sd3_den, g, noise=noise[rows], cond=part)
        scale = float(jnp.abs(own.x0).max())
        np.testing.assert_allclose(grouped.x0[rows], own.x0, rtol=0, atol=1e-5 * scale)
    whole = _sample_sd3(sd3_den, g).x0  # one batch: the halves repel each other
    assert float(jnp.abs(whole - grouped.x0).max()) > 1e-3 * float(jnp.abs(whole).max())
    assert grouped.trace.info["contextual"].log_vendi_before.shape[:2] == (2, 3)
