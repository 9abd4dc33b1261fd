import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("jaxdiv", deadline=None, max_examples=20, derandomize=True)
settings.load_profile("jaxdiv")


def random_gmm(key, k=4, d=2, spread=1.5, kind="full"):
    """A K-component mixture with random means and well-conditioned random covariances."""
    import toy

    k1, k2, k3 = jax.random.split(key, 3)
    means = spread * jax.random.normal(k1, (k, d))
    if kind == "full":
        a = 0.4 * jax.random.normal(k2, (k, d, d))
        covs = a @ jnp.swapaxes(a, 1, 2) / max(d / 2, 1) + 0.05 * jnp.eye(d)
    elif kind == "diag":
        covs = 0.05 + 0.3 * jax.random.uniform(k2, (k, d))
    else:
        covs = 0.05 + 0.3 * jax.random.uniform(k2, (k,))
    w = jax.random.uniform(k3, (k,), minval=0.5, maxval=1.5)
    return toy.GaussianMixture(means, covs, w / w.sum())


@pytest.fixture(scope="session")
def gmm2():
    return random_gmm(jax.random.key(0), k=4, d=2)


@pytest.fixture(scope="session")
def gmm16():
    return random_gmm(jax.random.key(1), k=4, d=16)


def central_difference(f, x, h):
    """Five-point central differences of a scalar ``f`` at every entry of ``x`` (error
    O(h^4) plus rounding ~ eps |f| / h), in ``x``'s dtype: an independent check of
    ``jax.grad(f)(x)``. ``f`` should be jitted: it runs 4 times per entry."""
    import numpy as np

    x = jnp.asarray(x)
    out = np.zeros(x.shape, np.float64)
    for idx in np.ndindex(*x.shape):
        e = jnp.zeros_like(x).at[idx].set(h)
        vals = [float(f(x + s * e)) for s in (-2.0, -1.0, 1.0, 2.0)]
        out[idx] = (vals[0] - 8.0 * vals[1] + 8.0 * vals[2] - vals[3]) / (12.0 * h)
    return out


def min_dist(x, z):
    """Distance from each row of ``x`` to its nearest row of ``z`` (rows flattened, float64)."""
    import numpy as np

    x = np.asarray(x, np.float64).reshape(len(x), -1)
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    return np.linalg.norm(x[:, None] - z[None], axis=-1).min(axis=1)


def disjoint_shields_near(points, num, sep, r, key):
    """``num`` shield centres ``sep`` apart, each within ``0.3 r`` of one of ``points``."""
    import numpy as np

    pts = np.asarray(points, np.float64)
    u = np.asarray(jax.random.normal(key, pts.shape), np.float64)
    cand = pts + 0.3 * r * u / np.linalg.norm(u, axis=1, keepdims=True)
    keep = []
    for c in cand:
        if all(np.linalg.norm(c - k) >= sep for k in keep):
            keep.append(c)
        if len(keep) == num:
            break
    assert len(keep) == num, "test setup: not enough separated shield centres"
    return jnp.asarray(np.stack(keep), jnp.float32)


def reuse_loaded(monkeypatch, pipe):
    """Let ``experiments.generate`` reuse ``pipe`` (a folder's pipeline loaded as generate
    loads it: float32, no pickle, no clip_skip, the folder's image encoder) instead of
    loading and compiling the same folder again."""
    from pathlib import Path

    from experiments import generate

    key = (str(Path(pipe.path).resolve()), "float32", False, None, None)
    monkeypatch.setattr(generate, "_LOADED", {key: pipe})
