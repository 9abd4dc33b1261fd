"""Every factory's defaults are its paper's settings, as PAPERS.md lists them; where a
default is not the paper's (a knob the paper does not have), the docstring says so."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiv import guidance
from jaxdiv.guidance.tpso.optimize import optimize_offsets

# PAPERS.md, section by section
PAPER_DEFAULTS = [
    # GASS: N = 10 directions, r_dep = r_ind = 0.02, Adam lr 1e-4, <= 60 iterations,
    # patience 4, tolerance 5e-4, active on 20 uniformly spread steps, u_ind the
    # direction of largest batch-mean |e_i . u| ("principal"); num_active None is the
    # paper's 20, capped at the sampler's steps (test_paper_num_active_is_20 below)
    (guidance.gass, dict(r_dep=0.02, r_ind=0.02, num_directions=10, lr=1e-4, max_iters=60,
                         patience=4, tol=5e-4, steps="uniform", num_active=None,
                         axes="principal")),
    # CADS: tau1 0.6, tau2 0.9, s 0.25, psi 1
    (guidance.cads, dict(tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0)),
    # contextual repulsion on SD3.5-Large: M = 100, tau = 4
    (guidance.contextual, dict(inner_steps=100, tau=4)),
    # SPELL: overcompensation 1.0 is exact (1.6 recommended for SD3 / LDM)
    (guidance.spell, dict(overcompensation=1.0, intra_batch=True)),
    # PG: one median bandwidth, the potential on the noisy particles, always on
    (guidance.particle, dict(bandwidth="median", space="x_t", time_scaling="score",
                             min_noise_level=None)),
    # TPSO: ratio 0.4; kappa 0.80, tol 0.01, lambda 1 (SD 1.5 / 2.1), RMSprop lr 0.01,
    # <= 50 steps
    (guidance.tpso, dict(ratio=0.4)),
    (optimize_offsets, dict(kappa=0.8, tolerance=0.01, diversity_weight=1.0,
                            learning_rate=0.01, max_steps=50, optimizer="rmsprop")),
]  # fmt: skip


@pytest.mark.parametrize("factory, paper", PAPER_DEFAULTS, ids=lambda v: getattr(v, "__name__", ""))
def test_defaults_are_the_papers(factory, paper):
    params = inspect.signature(factory).parameters
    got = {name: params[name].default for name in paper}
    assert got == paper


def test_gass_paper_setup_is_gass_with_the_papers_settings():
    """``gass_setup(pipe, e, "paper")``'s term is ``gass`` at its defaults, leaf for leaf."""
    from jaxdiv.pipelines.generation import gass_encoder, gass_setup
    from jaxdiv.testing import example_pipeline

    pipe = example_pipeline(image_encoder=True)
    text = jnp.ones(16) / 4.0
    setup = gass_setup(pipe, text, "paper")
    want = guidance.gass(gass_encoder(pipe), text)
    assert jax.tree.structure(setup.method) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(setup.method), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and it differs from a term with another setting (the comparison can fail)
    other = jax.tree.leaves(guidance.gass(gass_encoder(pipe), text, lr=2e-4))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(setup.method), other))  # fmt: skip


def test_paper_num_active_is_20():
    # GASS's default num_active (None) acts on the paper's 20 evenly spread steps, and on
    # every step of a sampler of fewer (where an explicit 20 could never take effect)
    from jaxdiv.guidance.gass import active_steps

    assert active_steps(50) == active_steps(50, "uniform", 20)
    assert len(active_steps(50)) == 20 and active_steps(12) == tuple(range(12))
