"""TPSO (arXiv 2511.19811): losses, schedule and optimisation against the public code
(``Open-Debin/TPSO``) -- its unit-test values, its formulas transcribed here, and its
optimisation loop transcribed in PyTorch on the same tiny random CLIP -- plus the condition
term on the samplers and on the tiny SD pipeline."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.tree_util import Partial

import jaxdiv
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance.tpso import (
    diversity_loss,
    optimize_offsets,
    semantic_loss,
    tpso_alphas,
    tpso_loss,
    trainable_mask,
)
from jaxdiv.models.clip import CLIPTextModel, load_clip_text
from jaxdiv.models.layers import pure
from jaxdiv.pipelines.tpso import (
    load_text_projection,
    tpso_conditions,
    tpso_guidance,
    tpso_null_pool,
)
from jaxdiv.testing import TINY_TEXT, example_pipeline

# --------------------------------------------------------------------------- unit values


def test_public_unit_values():
    # Open-Debin/TPSO tests/unit/test_losses.py and test_scheduling.py
    assert float(semantic_loss(jnp.array([0.7, 0.8, 0.9]), 0.8, 0.01)) == pytest.approx(0.18)
    assert float(diversity_loss(jnp.eye(2), 2)) == pytest.approx(-1.0)
    np.testing.assert_allclose(tpso_alphas(10, 0.4), [1, 2 / 3, 1 / 3] + [0] * 7, atol=1e-6)


def _public_alphas(num_steps, ratio, exact=None):
    """src/tpso/scheduling.py, coarse_to_fine_alphas (lines 9-40), in NumPy float64;
    ``exact``: the ratio as a Fraction, for ``int(N * ratio)`` without float64's rounding
    (0.58 * 50 = 28.999999999999996 there)."""
    if ratio == 0.0:
        return np.zeros(num_steps)
    reverse, ratio = ratio < 0.0, abs(ratio)
    active = int(num_steps * (ratio if exact is None else abs(exact)))
    if active == 0:
        return np.zeros(num_steps)
    alphas = np.concatenate([np.linspace(1.0, 0.0, active), np.zeros(num_steps - active)])
    return alphas[::-1] if reverse else alphas


@pytest.mark.parametrize("num_steps", [1, 2, 7, 10, 25, 28, 35, 41, 50, 100])
def test_schedule_matches_public_formula(num_steps):
    """Every ratio on a 0.01 grid and 1 / N, with ``n = int(N * ratio)`` in exact
    arithmetic: float32 floored ``0.53 * 100 = 52.99999`` to 52 and ``1 / 41 * 41`` to 0.
    The public code's float64 product differs from the exact one at 0.29, 0.57 and 0.58
    (N = 50, 100: one step fewer), a rounding accident jaxdiv does not copy."""
    from fractions import Fraction

    grid = [(float(r), Fraction(str(r))) for r in np.round(np.arange(-1.0, 1.0001, 0.01), 2)]
    accidents = []
    for ratio, exact in [*grid, (1 / num_steps, Fraction(1, num_steps))]:
        ours = np.asarray(tpso_alphas(num_steps, ratio))
        np.testing.assert_allclose(ours, _public_alphas(num_steps, ratio, exact), atol=1e-6,
                                   err_msg=f"ratio={ratio}")  # fmt: skip
        if int(num_steps * abs(ratio)) != int(num_steps * abs(exact)) and exact == Fraction(
                str(ratio)):  # fmt: skip
            accidents.append(ratio)
    assert sorted(accidents) == {50: [-0.58, 0.58], 100: [-0.58, -0.57, -0.29, 0.29, 0.57,
                                                          0.58]}.get(num_steps, [])  # fmt: skip


def test_ratio_that_schedules_no_step_is_refused():
    """A non-zero ratio with int(|ratio| N) = 0 leaves the public schedule all zeros: TPSO
    would never act on that sampler, so jaxdiv.sample refuses it (exactly where the public
    formula is all zeros); ratio = 0 (TPSO off on purpose, a sweep's control) runs."""
    from jaxdiv.guidance.base import as_terms, check_windows

    for num_steps in (1, 2, 7, 10, 28):
        s = samplers.ddim(schedules.flow(), num_steps)
        for ratio in np.round(np.arange(-1.0, 1.0001, 0.05), 2):
            term = guidance.tpso(jnp.ones((1, 1)), ratio=float(ratio))
            never = ratio != 0 and not _public_alphas(num_steps, float(ratio)).any()
            if never:
                refused = rf"^guidance term 'tpso': ratio={float(ratio):g} schedules int"
                with pytest.raises(ValueError, match=refused):
                    check_windows(as_terms(term), s)
            else:
                check_windows(as_terms(term), s)
    def alphas(ratio):
        out = jaxdiv.sample(samplers.ddim(schedules.flow(), 2), lambda x, t, c: x * 0 + c,
                            jnp.zeros((1, 1)), key=jax.random.key(0), cond=jnp.zeros((1, 1)),
                            guidance=guidance.tpso(jnp.ones((1, 1)), ratio=ratio), trace=True)
        return np.asarray(out.trace.info["tpso"].alpha).tolist()

    with pytest.raises(ValueError, match=r"use \|ratio\| >= 1 / N = 0.5 .*would never act$"):
        alphas(0.4)
    assert alphas(0.5) == [1.0, 0.0] and alphas(0.0) == [0.0, 0.0]


def _unit_rows(key, shape):
    v = np.asarray(jax.random.normal(key, shape), np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_diversity_is_minus_mean_pairwise_cosine_distance():
    n, groups = 4, 3
    v = _unit_rows(jax.random.key(0), (groups * n, 5))
    per_group = []
    for g in range(groups):
        block = v[g * n : (g + 1) * n]
        d = [1 - block[i] @ block[j] for i in range(n) for j in range(n) if i != j]
        per_group.append(np.mean(d))
    with jax.enable_x64(True):
        got = float(diversity_loss(jnp.asarray(v), n))
        assert got == pytest.approx(-np.mean(per_group), abs=1e-12)
        # the public code's compensation: group term x N / #active, groups with none left out
        active = np.array([1, 0, 0, 1] + [0] * 4 + [1, 1, 1, 0], bool)
        want = np.mean([-per_group[0] * n / 2, -per_group[2] * n / 3])
        got = float(diversity_loss(jnp.asarray(v), n, jnp.asarray(active)))
        assert got == pytest.approx(want, abs=1e-12)


def test_semantic_loss_is_zero_exactly_inside_the_band():
    c = jnp.array([0.79, 0.8, 0.81, 0.7899, 0.8101, -1.0])
    per = [float(semantic_loss(c[i : i + 1])) for i in range(6)]
    assert per[:3] == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(per[3:], [1e-4, 1e-4, 1.79], rtol=1e-3)


def test_trainable_mask_marks_content_tokens_only():
    pipe = example_pipeline()
    ids = pipe.tokenize(["a photo of a cat", "a dog", ""])
    eos = pipe.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="at least one trainable token"):
        trainable_mask(ids, eos)  # the blank prompt has none
    m = trainable_mask(ids[:2], eos)
    first_eos = (ids[:2] == eos).argmax(1)
    for row in range(2):
        want = (np.arange(ids.shape[1]) >= 1) & (np.arange(ids.shape[1]) < first_eos[row])
        np.testing.assert_array_equal(m[row], want)
    np.testing.assert_array_equal(trainable_mask(ids[2:], eos, count=3)[0, :5], [0, 1, 1, 1, 0])


# --------------------------------------------------------------------------- gradients


def test_loss_gradient_matches_finite_differences_on_a_tiny_clip():
    with jax.enable_x64(True):
        cfg = dict(TINY_TEXT, vocab_size=20, eos_token_id=19)
        model = CLIPTextModel(cfg, dtype=jnp.float64, rngs=nnx.Rngs(0))
        net = pure(model, "prompt_features")
        ids = jnp.array([[18, 3, 5, 7, 19, 19, 19, 19]] * 4)
        kernel = jax.random.normal(jax.random.key(1), (32, 16), jnp.float64)
        encode = Partial(_encode_with, net.apply, net.params, ids, kernel)
        embeds = jnp.take(net.params["embeddings"]["token_embedding"]["embedding"][...], ids, 0)
        mask = jnp.asarray(trainable_mask(ids, 19))
        target = _unit(encode(embeds)[1])
        theta = jax.random.normal(jax.random.key(2), embeds.shape, jnp.float64) * 0.7
        f = jax.jit(lambda th: tpso_loss(encode, embeds, mask, th, target, 2)[0])
        cos = tpso_loss(encode, embeds, mask, theta, target, 2)[1][3]
        assert float(jnp.min(jnp.abs(jnp.abs(cos - 0.8) - 0.01))) > 1e-3  # away from kinks
        g = jax.grad(f)(theta)
        assert float(jnp.abs(g * (1 - mask[..., None])).max()) == 0.0  # BOS/EOS/padding
        for k in range(3):
            v = jax.random.normal(jax.random.key(10 + k), theta.shape, jnp.float64)
            h = 1e-3
            vals = [float(f(theta + s * h * v)) for s in (-2, -1, 1, 2)]
            fd = (vals[0] - 8 * vals[1] + 8 * vals[2] - vals[3]) / (12 * h)
            assert float(jnp.sum(g * v)) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def _unit(v):
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def _encode_with(apply, params, ids, kernel, token_embeds):
    hidden, pooled = apply(params, ids, token_embeds)
    return hidden, pooled @ kernel


# --------------------------------------------------------------------------- the public loop


def _public_optimize(model, projection, input_ids, init, mask, num_variants, *, kappa, tol,
                     weight, lr, max_steps, active_subset):  # fmt: skip
    """The public optimisation loop, transcribed in PyTorch float64.

    Open-Debin/TPSO src/tpso/text_encoder.py ``CLIPOffsetSession._encode`` (lines 46-92:
    token embeddings + padded offsets x offset_scale, the encoder layers under a causal
    mask, final_layer_norm, EOS pooling, projection) and src/tpso/optimization.py
    ``optimize_prompt_offsets`` (lines 113-290: RMSprop, full-batch loop lines 150-194,
    active-subset loop lines 196-290) with src/tpso/losses.py. Offsets here span all L
    positions (the public code stores L - 2 and pads BOS / the last position with zeros:
    with the mask zero there the two are the same).
    """
    tm = model.text_model
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    with torch.no_grad():
        token_embeddings = tm.embeddings(ids)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)[..., None]
    scale = 1.0 / m.sum(dim=(1, 2), keepdim=True)
    b, length = ids.shape
    causal = torch.triu(torch.full((b, 1, length, length), float("-inf"), dtype=torch.float64),
                        diagonal=1)  # fmt: skip
    eos = (ids == model.config.eos_token_id).int().argmax(dim=-1)

    def encode(offsets):
        h = token_embeddings + offsets * scale
        for layer in tm.encoder.layers:
            h = layer(h, attention_mask=causal, is_causal=True)
            h = h[0] if isinstance(h, tuple) else h
        h = tm.final_layer_norm(h)
        return h, projection(h[torch.arange(b), eos])

    def sem(c):
        zero = torch.zeros_like(c)
        return (torch.maximum(zero, kappa - tol - c) + torch.maximum(zero, c - kappa - tol)).sum()

    def div(p, active=None):
        grouped = p.reshape(-1, num_variants, p.shape[-1])
        summed = grouped.sum(dim=1)
        apd = 1.0 - ((summed * summed).sum(1) - num_variants) / (num_variants * (num_variants - 1))
        if active is None:
            active = torch.ones(p.shape[0], dtype=torch.bool)
        per = active.reshape(-1, num_variants).sum(1)
        valid = per > 0
        return (-apd[valid] * (num_variants / per[valid].double())).mean()

    with torch.no_grad():
        zero = torch.zeros_like(token_embeddings)
        target = torch.nn.functional.normalize(encode(zero)[1], dim=-1)
    offsets = torch.nn.Parameter(torch.as_tensor(np.asarray(init), dtype=torch.float64) * m)
    opt = torch.optim.RMSprop([offsets], lr=lr)
    inband = lambda c: (c >= kappa - tol) & (c <= kappa + tol)  # noqa: E731
    if not active_subset:
        for _ in range(max_steps):
            opt.zero_grad()
            hidden, proj = encode(offsets)
            nrm = torch.nn.functional.normalize(proj, dim=-1)
            cos = (nrm * target).sum(-1)
            cached = (hidden.detach(), proj.detach(), cos.detach())
            if inband(cos.detach()).all():
                break
            loss = sem(cos) + weight * div(nrm)
            loss.backward()
            offsets.grad.mul_(m)
            opt.step()
        return cached
    cache = None
    for _ in range(max_steps):
        opt.zero_grad()
        if cache is None:
            hidden, proj = encode(offsets)
            nrm = torch.nn.functional.normalize(proj, dim=-1)
            cos = (nrm * target).sum(-1)
            active = ~inband(cos.detach())
            if not active.any():
                cache = [hidden.detach(), proj.detach(), nrm.detach(), cos.detach()]
                break
        else:
            active = ~inband(cache[3])
            if not active.any():
                break
            hidden, proj = encode(offsets)
            nrm = torch.nn.functional.normalize(proj, dim=-1)
            cos = (nrm * target).sum(-1)
        mixed = (nrm.detach() if cache is None else cache[2]).clone()
        mixed[active] = nrm[active]
        loss = sem(cos[active]) + weight * div(mixed, active)
        loss.backward()
        offsets.grad[~active] = 0
        offsets.grad.mul_(m)
        opt.step()
        new = [hidden.detach(), proj.detach(), nrm.detach(), cos.detach()]
        if cache is None:
            cache = new
        else:
            for c, v in zip(cache, new):
                c[active] = v[active]
    return cache[0], cache[1], cache[3]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**dict(TINY_TEXT, vocab_size=20, eos_token_id=19,
                                             bos_token_id=18, pad_token_id=19))  # fmt: skip
    model = transformers.CLIPTextModelWithProjection(cfg).double().eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("active_subset", [True, False])
def test_optimisation_equals_the_public_loop(tiny_clip, active_subset):
    model, folder = tiny_clip
    ids = np.array([[18, 3, 5, 7, 19, 19, 19, 19]] * 3 + [[18, 9, 19, 19, 19, 19, 19, 19]] * 3)
    mask = trainable_mask(ids, 19)
    init = np.asarray(jax.random.normal(jax.random.key(3), (6, 8, 32))) * 1e-4
    kw = dict(kappa=0.8, tol=0.01, weight=0.3, lr=0.02, max_steps=40)
    hidden_t, proj_t, cos_t = _public_optimize(
        model, model.text_projection, ids, init, mask, 3, active_subset=active_subset, **kw
    )
    with jax.enable_x64(True):
        ours_model = load_clip_text(folder, dtype=jnp.float64)
        net = pure(ours_model.text_model, "prompt_features")
        kernel = ours_model.text_projection.kernel[...]
        encode = Partial(_encode_with, net.apply, net.params, jnp.asarray(ids), kernel)
        embeds = jnp.take(net.params["embeddings"]["token_embedding"]["embedding"][...],
                          jnp.asarray(ids), 0)  # fmt: skip
        r = optimize_offsets(encode, embeds, mask, 3, init_offsets=jnp.asarray(init, jnp.float64),
                             kappa=0.8, tolerance=0.01, diversity_weight=0.3, learning_rate=0.02,
                             max_steps=40, freeze_converged=active_subset)  # fmt: skip
        # a genuine optimisation: the cosines left 1 and several reached the band
        assert float(jnp.max(r.cosine)) < 0.95 and int(r.converged.sum()) >= 2
        np.testing.assert_allclose(r.cosine, cos_t.numpy(), atol=1e-9)
        np.testing.assert_allclose(r.projected, proj_t.numpy(), atol=1e-8)
        np.testing.assert_allclose(r.hidden, hidden_t.numpy(), atol=1e-8)


# --------------------------------------------------------------------------- on the tiny pipeline


@pytest.fixture(scope="module")
def pipe():
    return example_pipeline()


KERNEL = np.asarray(jax.random.normal(jax.random.key(5), (32, 16))) / 32**0.5


def test_variants_reach_the_band_and_spread_apart(pipe):
    prompts = ["a photo of a cat", "a dog"]
    c = tpso_conditions(pipe, prompts, 4, jax.random.key(0), projection=KERNEL,
                        diversity_weight=0.1)  # fmt: skip
    r = c.result
    assert bool(r.converged.all()), np.asarray(r.cosine)
    c_band = np.asarray(r.cosine)
    assert np.all((c_band >= 0.79) & (c_band <= 0.81))
    u = np.asarray(_unit(r.projected)).reshape(2, 4, -1)
    u0 = np.asarray(_unit(r.original_projected)).reshape(2, 4, -1)
    spread = lambda g: np.mean([1 - g[i] @ g[j] for i in range(4) for j in range(4) if i != j])  # noqa: E731
    for k in range(2):
        assert spread(u[k]) > 0.05 > spread(u0[k])  # originals coincide: spread 0
    # offsets only on content tokens; BOS / EOS / padding embeddings untouched
    ids = pipe.tokenize([p for p in prompts for _ in range(4)])
    mask = trainable_mask(ids, pipe.tokenizer.eos_token_id)
    off = np.asarray(r.offsets)
    assert np.all(off[mask == 0] == 0) and np.all(np.abs(off[mask == 1]).sum(-1) > 0)
    # causal attention: the BOS state cannot see the offsets; the original is the prompt's
    np.testing.assert_array_equal(np.asarray(r.hidden)[:, 0], np.asarray(r.original_hidden)[:, 0])
    np.testing.assert_allclose(c.cond, pipe.encode_prompt(ids), atol=1e-6)


def test_variants_outside_the_band_are_named_in_a_warning(pipe):
    """At lambda = 1 the lone variant escapes (the test below): tpso_conditions says so,
    at the caller's line, with the count and the lowest cosine; at lambda 0.1 every
    variant is in the band and nothing is said. A blank prompt has no word to optimise
    under count='words' (the public code refuses it too)."""
    import warnings

    with pytest.warns(RuntimeWarning, match=r"^tpso_conditions: variants outside the cosine "
                                            r"band after \d+ steps: 1 of 4 \(cosines "
                                            r"0\.[0-4]\d to 0\.8\d\)") as rec:  # fmt: skip
        c = tpso_conditions(pipe, ["a dog"], 4, jax.random.key(0), projection=KERNEL)
    assert rec[0].filename == __file__ and int(c.result.converged.sum()) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tpso_conditions(pipe, ["a dog"], 4, jax.random.key(0), projection=KERNEL,
                        diversity_weight=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=r"^count='words': prompt ' ' has no words"):
        tpso_conditions(pipe, ["a dog", " "], 2, jax.random.key(0), projection=KERNEL,
                        count="words")  # fmt: skip


def test_public_freezing_lets_a_lone_variant_escape_at_lambda_1(pipe):
    """Where the method's promise fails on this tiny CLIP: with the public code's freezing,
    once three of four variants are in the band the last one's diversity gradient is
    scaled by N / #active = 4 and outweighs the hinge (slope 1); at lambda = 1 it leaves
    the band for good (cosine below 0.5 after 50 and after 200 steps). Optimising all
    variants together (its blank-prompt mode), or lambda = 0.1, reaches the band."""
    tokens = pipe.tokenize(["a dog"] * 4)
    from jaxdiv.pipelines.tpso import _encoder

    encode, embeds = _encoder(pipe, tokens, KERNEL)
    mask = trainable_mask(tokens, pipe.tokenizer.eos_token_id)
    for steps in (50, 200):  # and it stays out
        frozen = optimize_offsets(encode, embeds, mask, 4, jax.random.key(0), max_steps=steps)
        assert int(frozen.converged.sum()) == 3 and float(frozen.cosine.min()) < 0.5
    small = optimize_offsets(encode, embeds, mask, 4, jax.random.key(0), max_steps=50,
                             diversity_weight=0.1)  # fmt: skip
    assert bool(small.converged.all())
    together = optimize_offsets(encode, embeds, mask, 4, jax.random.key(0), max_steps=200,
                                freeze_converged=False)  # fmt: skip
    assert bool(together.converged.all())


def test_projection_is_required_and_checked(pipe, tmp_path):
    with pytest.raises(ValueError, match="no text_projection"):
        tpso_conditions(pipe, ["a cat"], 2, jax.random.key(0))
    with pytest.raises(ValueError, match="hidden size 32"):
        tpso_conditions(pipe, ["a cat"], 2, jax.random.key(0), projection=np.ones((8, 4)))
    with pytest.raises(ValueError, match="contains NaN"):
        tpso_conditions(pipe, ["a cat"], 2, jax.random.key(0), projection=KERNEL * np.nan)
    cfg = transformers.CLIPTextConfig(**dict(TINY_TEXT, vocab_size=83))
    torch_model = transformers.CLIPTextModelWithProjection(cfg)
    torch_model.save_pretrained(tmp_path)
    np.testing.assert_allclose(load_text_projection(tmp_path),
                               torch_model.text_projection.weight.detach().numpy().T,
                               atol=1e-7)  # fmt: skip
    with pytest.raises(ValueError, match="empty list"):
        tpso_conditions(pipe, [], 2, jax.random.key(0), projection=False)


@pytest.fixture(scope="module")
def pooled_conditions(pipe):
    pool = tpso_null_pool(pipe, jax.random.key(1), size=12, group_size=4, projection=KERNEL,
                          diversity_weight=0.1)  # fmt: skip
    c = tpso_conditions(pipe, ["a photo of a cat", "a dog"], 3, jax.random.key(0),
                        projection=KERNEL, null_pool=pool, diversity_weight=0.1)  # fmt: skip
    return pool, c


def test_null_pool_follows_the_public_protocol(pipe, pooled_conditions):
    pool, c = pooled_conditions
    assert pool.hidden.shape[0] == 12 and bool(pool.converged.all())
    blank = pipe.tokenize([" "])
    np.testing.assert_allclose(pool.original_hidden[0], pipe.encode_prompt(blank)[0], atol=1e-6)
    # positions 1..20 trainable (here the whole tiny sequence but the last): EOS and padding
    off = np.asarray(pool.offsets)
    assert np.all(off[:, 0] == 0) and np.all(off[:, -1] == 0)
    assert np.all(np.abs(off[:, 1:-1]).sum(-1) > 0)
    # each image's negative branch: a distinct pool row (drawn without replacement)
    rows = [int(np.argmin(np.abs(np.asarray(pool.hidden) - h).sum((1, 2))))
            for h in np.asarray(c.null_optimized)]  # fmt: skip
    assert len(set(rows)) == 6
    with pytest.raises(ValueError, match="fewer than the 6 images"):
        tpso_conditions(pipe, ["a cat", "a dog"], 3, jax.random.key(0), projection=KERNEL,
                        null_pool=jax.tree.map(lambda a: a[:4] if a.ndim else a, pool))  # fmt: skip


def test_schedule_on_the_pipeline_both_branches(pipe, pooled_conditions):
    """Variants give distinct conditions in the first steps and the prompt's own condition
    (and the plain null) after ``ratio * N``: checked on what the UNet receives."""
    _, c = pooled_conditions
    noise = jnp.repeat(jax.random.normal(jax.random.key(1), pipe.noise_shape(2)), 3, axis=0)
    n = 10
    g = tpso_guidance(c, scale=5.0, ratio=0.4)
    before = jaxdiv.compile_count()
    out = jaxdiv.sample(pipe.ddim(n), jax.tree_util.Partial(_spy, pipe.denoiser), noise,
                        key=jax.random.key(2), cond=c.cond, guidance=g, trace=True)  # fmt: skip
    np.testing.assert_allclose(out.trace.info["tpso"].alpha, [1, 2 / 3, 1 / 3] + [0] * 7,
                               atol=1e-6)  # fmt: skip
    conds = np.stack(_SEEN[-n:])  # what the UNet saw at each step: (N, 2B, L, D)
    b = 6
    for i, a in enumerate([1, 2 / 3, 1 / 3, 0]):
        want_c = a * np.asarray(c.optimized) + (1 - a) * np.asarray(c.cond)
        want_u = a * np.asarray(c.null_optimized) + (1 - a) * np.asarray(c.null_cond)
        np.testing.assert_allclose(conds[i, :b], want_c, atol=1e-5)
        np.testing.assert_allclose(conds[i, b:], want_u, atol=1e-5)
    assert np.abs(conds[0, 0] - conds[0, 1]).max() > 1e-3  # variants differ at first
    np.testing.assert_allclose(conds[5:, :b], np.broadcast_to(c.cond, (5, b, 16, 32)), atol=1e-6)
    np.testing.assert_allclose(conds[5:, b:], np.broadcast_to(c.null_cond, (5, b, 16, 32)),
                               atol=1e-6)  # fmt: skip
    assert np.all(np.isfinite(out.x0))
    # a new ratio and scale reuse the compiled program
    jaxdiv.sample(pipe.ddim(n), jax.tree_util.Partial(_spy, pipe.denoiser), noise,
                  key=jax.random.key(2), cond=c.cond, guidance=tpso_guidance(c, 3.0, 0.3),
                  trace=True)
    _SEEN.clear()
    assert jaxdiv.compile_count() - before == 1


def test_guidance_takes_the_cfg_rescale(pipe, pooled_conditions):
    """``tpso_guidance(rescale=phi, prediction_type=...)`` gives TPSO's CFG the rescale of
    Lin et al. (2024) (its formula is checked against diffusers' in
    ``test_baselines_cfg_interval.py``): the factor shows at every step and moves the
    latents; without it the factor is 1."""
    from jaxdiv.pipelines.generation import rescale_options

    _, c = pooled_conditions
    noise = jax.random.normal(jax.random.key(1), pipe.noise_shape(6))
    run = lambda g: jaxdiv.sample(pipe.ddim(2), pipe.denoiser, noise, key=jax.random.key(2),  # noqa: E731
                                  cond=c.cond, guidance=g, trace=True)  # fmt: skip
    # a large scale: this tiny random UNet's CFG barely changes its predictions' spread
    plain = run(tpso_guidance(c, 30.0, 0.5))
    scaled = run(tpso_guidance(c, 30.0, 0.5, **rescale_options(pipe, 0.7)))
    factor = np.asarray(scaled.trace.info["cfg"].rescale_factor)
    assert np.all((factor > 0) & (factor < 0.9)), factor  # measured 0.59, 0.84
    np.testing.assert_array_equal(plain.trace.info["cfg"].rescale_factor, 1.0)
    assert np.abs(np.asarray(scaled.x0) - np.asarray(plain.x0)).max() > 0.1  # measured 4.5
    before = jaxdiv.compile_count()  # phi is a traced leaf: another value, the same program
    other = run(tpso_guidance(c, 20.0, 0.5, **rescale_options(pipe, 0.3)))
    assert jaxdiv.compile_count() == before
    assert np.abs(np.asarray(other.x0) - np.asarray(scaled.x0)).max() > 0.1


def test_guidance_refuses_another_prompts_condition(pipe, pooled_conditions):
    """tpso_guidance knows the condition its variants came from: pipe.generate with the
    same prompts and n runs (its own encoding of them, equal up to float rounding); other
    prompts would mix the variants of one prompt into another's embedding and are refused."""
    _, c = pooled_conditions
    g = tpso_guidance(c, scale=3.0, ratio=0.5)  # acts on 1 of 2 steps (0.4: none, refused)
    key, sampler = jax.random.key(4), pipe.ddim(2)
    out = pipe.generate(["a photo of a cat", "a dog"], 3, key=key, sampler=sampler, method=g)
    assert np.all(np.isfinite(out.latents))
    with pytest.raises(ValueError, match=r"^tpso: cond is not the condition its variants were "
                                         r"optimised from \(its largest difference is "):
        pipe.generate(["a dog", "a photo of a cat"], 3, key=key, sampler=sampler, method=g)
    # a bare term without original= cannot tell (the toys' use)
    bare = guidance.chain(tpso=guidance.tpso(c.optimized, 0.5),
                          cfg=guidance.cfg(3.0, pipe.null_cond))  # fmt: skip
    pipe.generate(["a dog", "a photo of a cat"], 3, key=key, sampler=sampler, method=bare)


_SEEN = []


def _spy(denoiser, x, t, cond):
    jax.debug.callback(lambda c: _SEEN.append(np.asarray(c)), cond, ordered=True)
    return denoiser(x, t, cond)


@pytest.mark.parametrize("make", ["ddim", "edm", "flow_euler"])
def test_term_composes_with_cfg_and_every_sampler_on_a_toy(make):
    """On a toy whose x0_hat is the condition's mean, TPSO's schedule is exact: the output
    is the original condition's value when the schedule has ended before the last step,
    and the trace shows alpha."""
    n = 10
    s = {"ddim": lambda: samplers.ddim(schedules.vp_linear(), n),
         "edm": lambda: samplers.edm(schedules.edm(), n),
         "flow_euler": lambda: samplers.flow_euler(schedules.flow(), n)}[make]()  # fmt: skip
    den = lambda x, t, c: x * 0 + c.mean(-1, keepdims=True)  # noqa: E731
    cond = jnp.ones((3, 4))
    opt = jnp.arange(12.0).reshape(3, 4)
    g = guidance.chain(guidance.tpso(opt, 0.4), guidance.cfg(2.0))
    out = jaxdiv.sample(s, den, jnp.zeros((3, 1)), key=jax.random.key(0), cond=cond,
                        guidance=g, trace=True)  # fmt: skip
    np.testing.assert_allclose(out.trace.info["tpso"].alpha, [1, 2 / 3, 1 / 3] + [0] * 7,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(out.trace.x0_hat[0], 2.0 * opt.mean(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(out.x0, 2.0 * jnp.ones((3, 1)), rtol=1e-5)
    with pytest.raises(ValueError, match="shape of cond"):
        jaxdiv.sample(s, den, jnp.zeros((3, 1)), key=jax.random.key(0), cond=jnp.ones((3, 5)),
                      guidance=guidance.tpso(opt))  # fmt: skip
    with pytest.raises(ValueError, match="ratio must be a finite number"):
        guidance.tpso(opt, math.nan)
