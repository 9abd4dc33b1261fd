"""TPSO on SD3 / SD3.5 (jaxdiv.pipelines.tpso_sd3) on the tiny random SD3 pipeline, against
the public code's SD3.5 adapter (``Open-Debin/TPSO``, ``src/tpso/pipelines/
stable_diffusion3.py``): one optimisation per CLIP encoder with its own band, T5 unchanged,
the optimised CLIP states and pooled vectors assembled as ``_compose_at_step`` does and
scheduled on both CFG branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxdiv
from jaxdiv.guidance.tpso import tpso_alphas, trainable_mask
from jaxdiv.pipelines import stable_diffusion_3, tpso
from jaxdiv.pipelines.tpso_sd3 import SD3TPSOResult
from jaxdiv.testing import example_sd3_pipeline

PROMPTS = ["a photo of a cat", "a red house"]
N = 3
LAMBDA = 0.3


@pytest.fixture(scope="module")
def pipe():
    return example_sd3_pipeline()


@pytest.fixture(scope="module")
def pooled(pipe):
    # the public SD3.5 protocol for the pool (lambda 0, frozen rows), smaller (its shapes
    # are the prompts': one compiled loop per encoder serves both); a small lambda for the
    # prompts: on these tiny random towers lambda >= 1 drives variants out of the band
    pool = tpso.tpso_null_pool(pipe, jax.random.key(1), size=2 * N, group_size=N)
    c = tpso.tpso_conditions(pipe, PROMPTS, N, jax.random.key(1), null_pool=pool,
                             diversity_weight=LAMBDA)  # fmt: skip
    start = tpso.tpso_conditions(pipe, PROMPTS, N, jax.random.key(1), diversity_weight=LAMBDA,
                                 max_steps=1)  # the encodings at the initial offsets
    return pool, c, start


def _unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _spread(u):  # mean pairwise cosine distance within each prompt's group of N
    g = u.reshape(-1, N, u.shape[-1])
    return np.array([np.mean([1 - x[i] @ x[j] for i in range(N) for j in range(N) if i != j])
                     for x in g])  # fmt: skip


def _content(ids, eos):  # positions strictly between BOS and the first EOS
    ids = np.asarray(ids)
    first = (ids == eos).argmax(1)
    pos = np.arange(ids.shape[1])[None]
    return (pos >= 1) & (pos < first[:, None])


@pytest.mark.exact_codegen
def test_each_clip_in_its_band_t5_untouched(pipe, pooled):
    _, c, start = pooled
    assert isinstance(c.result, SD3TPSOResult)
    rows = [p for p in PROMPTS for _ in range(N)]
    tokens = pipe.tokenize(rows)
    length = tokens.clip_l.shape[1]
    widths = [t.shape[1] for t in pipe.text_projections]
    # the band, as the public code measures it: per encoder, cos of its own projected
    # text_embeds to the original's (read back from the pooled condition: [L; G])
    pools = np.split(np.asarray(c.optimized.pooled), [widths[0]], axis=-1)
    pools0 = np.split(np.asarray(c.cond.pooled), [widths[0]], axis=-1)
    inits = np.split(np.asarray(start.optimized.pooled), [widths[0]], axis=-1)
    for name, p, p0, p1 in zip(("clip_l", "clip_g"), pools, pools0, inits, strict=True):
        cos = np.sum(_unit(p) * _unit(p0), -1)
        assert np.all((cos >= 0.79 - 1e-6) & (cos <= 0.81 + 1e-6)), (name, cos)
        # variants further apart than at the initial offsets N(0, 1e-8)
        s, s1 = _spread(_unit(p)), _spread(_unit(p1))
        assert np.all(s1 < 1e-6) and np.all(s > 100 * s1) and s.max() > 0.3, (name, s, s1)
    assert bool(c.result.converged.all())
    # T5 part identical to the prompt's own, in the variants and the original
    t5 = np.asarray(pipe.encode_prompt(tokens).prompt_embeds[:, length:])
    np.testing.assert_array_equal(np.asarray(c.optimized.prompt_embeds[:, length:]), t5)
    np.testing.assert_array_equal(np.asarray(c.cond.prompt_embeds[:, length:]), t5)
    # the original is diffusers' encode_prompt; the CLIP padding columns stay zero
    np.testing.assert_allclose(c.cond.prompt_embeds, pipe.encode_prompt(tokens).prompt_embeds,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(c.cond.pooled, pipe.encode_prompt(tokens).pooled, atol=1e-6)
    assert np.all(np.asarray(c.optimized.prompt_embeds)[:, :length, sum(
        e.shape[1] for e in pipe.token_embeddings):] == 0)  # fmt: skip
    # offsets on each encoder's content tokens only: BOS / EOS / padding untouched
    for i, (name, r) in enumerate(zip(("clip_l", "clip_g"), c.result, strict=True)):
        content = _content(getattr(tokens, name), pipe.tokenizers[i].eos_token_id)
        off = np.asarray(r.offsets)
        assert np.all(off[~content] == 0) and np.all(np.abs(off[content]).sum(-1) > 0), name
        hidden, original = np.asarray(r.hidden), np.asarray(r.original_hidden)
        np.testing.assert_array_equal(hidden[:, 0], original[:, 0])


def test_encoders_are_optimised_independently(pipe, pooled):
    """Public adapter: a session and an optimisation per encoder, nothing shared (lines
    161-199): another CLIP-G projection leaves CLIP-L's result bit for bit."""
    _, c, _ = pooled
    other = (None, np.asarray(pipe.text_projections[1])[:, ::-1])
    c2 = tpso.tpso_conditions(pipe, PROMPTS, N, jax.random.key(1), projection=other,
                              diversity_weight=LAMBDA)  # fmt: skip
    for a, b in zip(c.result.clip_l, c2.result.clip_l, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g1, g2 = np.asarray(c.result.clip_g.hidden), np.asarray(c2.result.clip_g.hidden)
    assert np.abs(g1 - g2).max() > 1e-4
    with pytest.raises(ValueError, match="pair"):
        tpso.tpso_conditions(pipe, PROMPTS, N, jax.random.key(0), projection=np.eye(3))


def test_null_pool_follows_the_public_sd35_protocol(pipe, pooled):
    pool, c, _ = pooled
    assert isinstance(pool, SD3TPSOResult) and bool(pool.converged.all())
    length = pipe.tokenize([""]).clip_l.shape[1]
    null = pipe.null_cond
    # the blank prompt " " is the empty prompt for CLIP: the pool's original is the null
    orig = stable_diffusion_3.assemble_cond(pool.clip_l.original_hidden[:1],
                                            pool.clip_g.original_hidden[:1],
                                            null.prompt_embeds[:, length:],
                                            pool.clip_l.original_projected[:1],
                                            pool.clip_g.original_projected[:1])  # fmt: skip
    np.testing.assert_allclose(orig.prompt_embeds, null.prompt_embeds, atol=1e-6)
    np.testing.assert_allclose(orig.pooled, null.pooled, atol=1e-6)
    # 20 trainable positions (the whole tiny sequence but BOS and the last position)
    for r in pool:
        off = np.asarray(r.offsets)
        assert np.all(off[:, 0] == 0) and np.all(off[:, -1] == 0)
        assert np.all(np.abs(off[:, 1:-1]).sum(-1) > 0)
    # each image: a distinct pool row, the same row for both encoders, T5 of ""
    picked = [int(np.argmin(np.abs(np.asarray(pool.clip_l.hidden) - h).sum((1, 2))))
              for h in np.asarray(c.null_result.clip_l.hidden)]  # fmt: skip
    assert len(set(picked)) == 6
    np.testing.assert_array_equal(np.asarray(c.null_result.clip_g.hidden),
                                  np.asarray(pool.clip_g.hidden)[picked])  # fmt: skip
    null_t5 = np.asarray(null.prompt_embeds[:, length:])
    np.testing.assert_array_equal(np.asarray(c.null_optimized.prompt_embeds[:, length:]),
                                  np.broadcast_to(null_t5, (6, *null_t5.shape[1:])))  # fmt: skip
    with pytest.raises(TypeError, match="SD3TPSOResult"):
        tpso.tpso_conditions(pipe, PROMPTS, N, jax.random.key(0), null_pool=pool.clip_l)


def _public_compose(hl, hg, pl, pg, t5):
    """src/tpso/pipelines/stable_diffusion3.py ``_compose_at_step`` (lines 207-237) after
    the alpha mix, in NumPy float64: cat([hidden_l, hidden_g], -1), pad to T5's width,
    cat with T5 on the sequence; pooled = cat([pooled_l, pooled_g], -1)."""
    clip = np.concatenate([hl, hg], -1)
    clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
    return np.concatenate([clip, t5], -2), np.concatenate([pl, pg], -1)


def _public_branch(r, t5, alpha):
    mix = lambda o, c: alpha * np.asarray(o, np.float64) + (1 - alpha) * np.asarray(c, np.float64)  # noqa: E731
    l, g = r
    return _public_compose(mix(l.hidden, l.original_hidden), mix(g.hidden, g.original_hidden),
                           mix(l.projected, l.original_projected),
                           mix(g.projected, g.original_projected),
                           np.asarray(t5, np.float64))  # fmt: skip


_SEEN = []


def _spy(denoiser, x, t, cond):
    jax.debug.callback(lambda c: _SEEN.append(jax.tree.map(np.asarray, c)), cond, ordered=True)
    return denoiser(x, t, cond)


def test_mmdit_sees_the_public_schedule_on_both_branches(pipe, pooled):
    """Through ``pipe.generate``: in the first int(0.4 N) steps the MMDiT receives the
    public ``_compose_at_step`` of the alpha-mixed CLIP parts with T5 unchanged (bit for
    bit), on the conditional and the negative branch; afterwards the prompt's own
    condition and the plain null. A new ratio and scale do not recompile."""
    _, c, _ = pooled
    length = pipe.tokenize([""]).clip_l.shape[1]
    b, steps = len(PROMPTS) * N, 10
    spy = pipe._replace(denoiser=jax.tree_util.Partial(_spy, pipe.denoiser))
    noise = jnp.repeat(jax.random.normal(jax.random.key(1), pipe.noise_shape(2)), N, axis=0)
    before = jaxdiv.compile_count()
    _SEEN.clear()
    out = spy.generate(PROMPTS, N, key=jax.random.key(2), sampler=pipe.flow_euler(steps),
                       method=tpso.tpso_guidance(c, scale=5.0, ratio=0.4), noise=noise,
                       trace=True)  # fmt: skip
    alphas = [1, 2 / 3, 1 / 3] + [0] * 7  # public coarse_to_fine_alphas(10, 0.4)
    np.testing.assert_allclose(out.output.trace.info["tpso"].alpha, alphas, atol=1e-6)
    np.testing.assert_allclose(tpso_alphas(steps, 0.4), alphas, atol=1e-6)
    seen = _SEEN[-steps:]
    t5_c = np.asarray(c.cond.prompt_embeds[:, length:])
    t5_u = np.asarray(c.null_optimized.prompt_embeds[:, length:])
    for i, a in enumerate(alphas):
        emb, pooled_ = seen[i].prompt_embeds, seen[i].pooled
        assert emb.shape[0] == 2 * b
        for rows, r, t5 in ((slice(0, b), c.result, t5_c), (slice(b, 2 * b), c.null_result, t5_u)):
            want_e, want_p = _public_branch(r, t5, a)
            np.testing.assert_array_equal(emb[rows, length:], t5)  # T5 never mixed
            np.testing.assert_allclose(emb[rows], want_e, atol=2e-6)
            np.testing.assert_allclose(pooled_[rows], want_p, atol=2e-6)
    np.testing.assert_allclose(seen[3].prompt_embeds[:b], c.cond.prompt_embeds, atol=1e-6)
    for i in range(3, steps):  # after the schedule: exactly the plain null
        np.testing.assert_array_equal(seen[i].prompt_embeds[b:],
                                      np.broadcast_to(pipe.null_cond.prompt_embeds,
                                                      seen[i].prompt_embeds[b:].shape))  # fmt: skip
    assert np.abs(seen[0].pooled[0] - seen[0].pooled[1]).max() > 1e-3  # variants differ
    assert out.images.shape[0] == b and np.all(np.isfinite(out.images))
    spy.generate(PROMPTS, N, key=jax.random.key(2), sampler=pipe.flow_euler(steps),
                 method=tpso.tpso_guidance(c, scale=3.0, ratio=0.3), noise=noise, trace=True)
    _SEEN.clear()
    assert jaxdiv.compile_count() - before == 1


# --------------------------------------------------------------------------- float64 reference


def _public_sd3_session(model, ids, init, mask, n, *, kappa, tol, weight, lr, max_steps):
    """The public SD3 encoder session and active-subset loop, in PyTorch float64:
    src/tpso/text_encoder.py ``CLIPOffsetSession._encode`` (lines 46-92) with
    ``hidden_state_index=-2`` (the SD3 adapter, line 169): hidden = the states list
    [inputs, layer 1, ..., layer L][-2], no final LayerNorm; pooled at the EOS (the
    largest id when ``eos_token_id == 2``) after it, then projected; and
    src/tpso/optimization.py ``optimize_prompt_offsets`` active-subset loop (lines
    196-290) with src/tpso/losses.py."""
    tm = model.text_model
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    with torch.no_grad():
        token_embeddings = tm.embeddings(ids)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)[..., None]
    scale = 1.0 / m.sum(dim=(1, 2), keepdim=True)
    b, length = ids.shape
    causal = torch.triu(torch.full((b, 1, length, length), float("-inf"), dtype=torch.float64),
                        diagonal=1)  # fmt: skip
    if model.config.eos_token_id == 2:
        eos = ids.argmax(dim=-1)
    else:
        eos = (ids == model.config.eos_token_id).int().argmax(dim=-1)

    def encode(offsets):
        h = token_embeddings + offsets * scale
        states = [h]
        for layer in tm.encoder.layers:
            h = layer(h, attention_mask=causal, is_causal=True)
            h = h[0] if isinstance(h, tuple) else h
            states.append(h)
        last = tm.final_layer_norm(h)
        return states[-2], model.text_projection(last[torch.arange(b), eos])

    def sem(c):
        zero = torch.zeros_like(c)
        return (torch.maximum(zero, kappa - tol - c) + torch.maximum(zero, c - kappa - tol)).sum()

    def div(p, active):
        summed = p.reshape(-1, n, p.shape[-1]).sum(dim=1)
        apd = 1.0 - ((summed * summed).sum(1) - n) / (n * (n - 1))
        per = active.reshape(-1, n).sum(1)
        valid = per > 0
        return (-apd[valid] * (n / per[valid].double())).mean()

    with torch.no_grad():
        pooled = encode(torch.zeros_like(token_embeddings))[1]
        target = torch.nn.functional.normalize(pooled, dim=-1)
    offsets = torch.nn.Parameter(torch.as_tensor(np.asarray(init), dtype=torch.float64) * m)
    opt = torch.optim.RMSprop([offsets], lr=lr)
    inband = lambda c: (c >= kappa - tol) & (c <= kappa + tol)  # noqa: E731
    cache = None
    for _ in range(max_steps):
        opt.zero_grad()
        if cache is not None:
            active = ~inband(cache[3])
            if not active.any():
                break
        hidden, proj = encode(offsets)
        nrm = torch.nn.functional.normalize(proj, dim=-1)
        cos = (nrm * target).sum(-1)
        if cache is None:
            active = ~inband(cos.detach())
            if not active.any():
                cache = [hidden.detach(), proj.detach(), nrm.detach(), cos.detach()]
                break
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
            for a, v in zip(cache, new, strict=True):
                a[active] = v[active]
    return cache[0], cache[1], cache[3]


def test_optimisation_equals_the_public_sd3_session_in_float64(pipe):
    kw = dict(kappa=0.8, tol=0.01, weight=0.3, lr=0.02, max_steps=30)
    rows = [p for p in PROMPTS for _ in range(N)]
    with jax.enable_x64(True):
        p64 = stable_diffusion_3.load(pipe.path, dtype=jnp.float64, max_sequence_length=8)
        c = tpso.tpso_conditions(p64, PROMPTS, N, jax.random.key(4), kappa=0.8,
                                 tolerance=0.01, diversity_weight=0.3, learning_rate=0.02,
                                 max_steps=30)  # fmt: skip
        tokens = p64.tokenize(rows)
        for i, (name, r) in enumerate(zip(("clip_l", "clip_g"), c.result, strict=True)):
            folder = f"{pipe.path}/text_encoder{'' if i == 0 else '_2'}"
            model = transformers.CLIPTextModelWithProjection.from_pretrained(folder).double().eval()
            ids = getattr(tokens, name)
            mask = trainable_mask(ids, p64.tokenizers[i].eos_token_id)
            # tpso_conditions' initial offsets: key -> (optimisation, null) -> one per encoder
            k = jax.random.split(jax.random.split(jax.random.key(4))[0], 2)[i]
            init = np.asarray(jax.random.normal(k, (*ids.shape, model.config.hidden_size),
                                                jnp.float64)) * 1e-4  # fmt: skip
            hidden, proj, cos = _public_sd3_session(model, ids, init, mask, N,
                                                    **kw)  # fmt: skip
            assert float(jnp.max(r.cosine)) < 0.95 and int(r.converged.sum()) >= 2, name
            np.testing.assert_allclose(r.cosine, cos.numpy(), atol=1e-9, err_msg=name)
            np.testing.assert_allclose(r.projected, proj.numpy(), atol=1e-8, err_msg=name)
            np.testing.assert_allclose(r.hidden, hidden.numpy(), atol=1e-8, err_msg=name)
