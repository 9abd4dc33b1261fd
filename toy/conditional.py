"""A conditional Gaussian mixture with a continuous condition embedding and exact scores.

Components ``k = 1..K`` with means ``mu_k``, isotropic or diagonal covariances ``C_k``,
class labels ``l(k)`` and base weights ``pi_k``. A condition is an embedding
``y in R^m``; classes have embeddings ``u_c`` (rows of ``class_embeddings``) and

    w_k(y) = softmax_k( log pi_k + <y, u_{l(k)}> / tau ),
    p(x | y) = sum_k w_k(y) N(x; mu_k, C_k).

``y = 0`` gives the base weights: the *null* (unconditional) condition of classifier-free
guidance. Because ``w(y)`` is defined for every ``y``, the exact conditional and
unconditional denoisers exist for any embedding -- including the noisy, rescaled
embeddings that CADS feeds the model. For ``x_t = alpha x0 + sigma eps``:

* ``x_t | k ~ N(alpha mu_k, alpha^2 C_k + sigma^2 I)``;
* ``E[x0 | x_t, y] = sum_k p(k | x_t, y) m_k(x_t)``,
  ``m_k = mu_k + alpha C_k (alpha^2 C_k + sigma^2 I)^-1 (x_t - alpha mu_k)``, with
  ``p(k | x_t, y) ∝ w_k(y) N(x_t; alpha mu_k, alpha^2 C_k + sigma^2 I)``.

The class posterior under the null prior, ``p(c | x) = sum_{l(k)=c} p(k | x, y=0)``, is
the toy's "CLIP score": how recognisable ``x`` is as class ``c``. Exact samples of
``p(x | y)`` give the reference sets of precision/recall.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.dtypes import as_float
from toy.gmm import GaussianMixture

__all__ = ["ConditionalGaussianMixture", "ConditionalGMMDenoiser", "ring_of_classes"]


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


@jax.tree_util.register_pytree_node_class
class ConditionalGaussianMixture:
    """``p(x | y) = sum_k softmax(log pi + <y, u_l(k)> / tau)_k N(mu_k, C_k)``.

    Args:
        means: ``(K, d)`` component means.
        covs: ``(K,)`` isotropic or ``(K, d)`` diagonal variances.
        labels: ``(K,)`` integer class of each component, in ``[0, C)``; every class
            needs at least one component.
        class_embeddings: ``(C, m)`` class embeddings ``u_c``.
        weights: ``(K,)`` base (null-condition) weights ``pi``, non-negative, summing to 1.
            Default: uniform.
        temperature: ``tau > 0``; smaller means a condition selects its class more sharply.

    A pytree (arrays traced, ``temperature`` static), so ``jax.grad`` reaches the means.

    >>> import jax.numpy as jnp
    >>> cm = ConditionalGaussianMixture(jnp.array([[-2.0], [2.0]]), jnp.array([0.1, 0.1]),
    ...                                 jnp.array([0, 1]), jnp.eye(2), temperature=0.5)
    >>> cm.weights_given(jnp.zeros(2)).tolist()                 # null condition: base weights
    [0.5, 0.5]
    >>> [round(w, 4) for w in cm.weights_given(cm.condition(1)).tolist()]   # e^2 : 1
    [0.1192, 0.8808]
    """

    def __init__(self, means, covs, labels, class_embeddings, weights=None, temperature=1.0):
        means = as_float(means)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}")
        k, d = means.shape
        covs = as_float(covs)
        if covs.shape == (k,):
            covs_diag = jnp.broadcast_to(covs[:, None], (k, d))
        elif covs.shape == (k, d):
            covs_diag = covs
        else:
            raise ValueError(
                f"covs must have shape (K,)=({k},) isotropic or (K, d)=({k}, {d}) diagonal, "
                f"got {covs.shape}"
            )
        labels = jnp.asarray(labels)
        if labels.shape != (k,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"labels must be an integer array of shape (K,)=({k},), got "
                f"{labels.dtype} {labels.shape}"
            )
        class_embeddings = as_float(class_embeddings)
        if class_embeddings.ndim != 2:
            raise ValueError(
                f"class_embeddings must have shape (C, m), got {class_embeddings.shape}"
            )
        weights = jnp.full((k,), 1.0 / k) if weights is None else as_float(weights)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape (K,)=({k},), got {weights.shape}")
        if isinstance(temperature, jax.core.Tracer) or not float(temperature) > 0:
            raise ValueError(f"temperature must be a Python float > 0, got {temperature!r}")
        if _concrete(means, covs, labels, class_embeddings, weights):
            _validate(np.asarray(means), np.asarray(covs), np.asarray(labels),
                      np.asarray(class_embeddings), np.asarray(weights))  # fmt: skip
        self.means, self.covs, self.labels = means, covs_diag, labels.astype(jnp.int32)
        self.class_embeddings, self.weights = class_embeddings, weights
        self.temperature = float(temperature)

    # -- pytree ---------------------------------------------------------------------------
    def tree_flatten(self):
        children = (self.means, self.covs, self.labels, self.class_embeddings, self.weights)
        return children, self.temperature

    @classmethod
    def tree_unflatten(cls, temperature, children):
        obj = object.__new__(cls)
        obj.means, obj.covs, obj.labels, obj.class_embeddings, obj.weights = children
        obj.temperature = temperature
        return obj

    def __repr__(self):
        k, d = self.means.shape
        return (f"ConditionalGaussianMixture(K={k}, d={d}, classes={self.num_classes}, "
                f"m={self.cond_dim}, tau={self.temperature})")  # fmt: skip

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def cond_dim(self) -> int:
        """Dimension ``m`` of the condition embedding."""
        return self.class_embeddings.shape[1]

    # -- conditions -----------------------------------------------------------------------
    def condition(self, classes, scale=1.0):
        """Embedding ``scale * u_c`` of class ``c``: an int gives ``(m,)``, ints ``(n, m)``.

        >>> import jax.numpy as jnp
        >>> ring_of_classes().condition(jnp.array([0, 2])).shape
        (2, 4)
        """
        return scale * self.class_embeddings[self._classes(classes)]

    def _classes(self, classes):
        """``classes`` as an int array, refused when a concrete id is not a class (JAX's
        indexing would clip it to the last class, or read out of range as NaN)."""
        classes = jnp.asarray(classes)
        if not jnp.issubdtype(classes.dtype, jnp.integer):
            raise TypeError(f"classes must be integers, got dtype {classes.dtype}")
        if _concrete(classes):
            bad = np.asarray(classes)[(np.asarray(classes) < 0)
                                      | (np.asarray(classes) >= self.num_classes)]  # fmt: skip
            if bad.size:
                raise ValueError(f"classes must lie in [0, {self.num_classes - 1}] (the "
                                 f"mixture's {self.num_classes} classes), got "
                                 f"{sorted(set(bad.tolist()))}")  # fmt: skip
        return classes

    def null_condition(self, n: int):
        """The null (unconditional) embedding ``y = 0`` for a batch of ``n``.

        >>> ring_of_classes().null_condition(3).shape
        (3, 4)
        """
        return jnp.zeros((n, self.cond_dim), self.class_embeddings.dtype)

    def _check_y(self, y):
        y = as_float(y)
        if y.ndim < 1 or y.shape[-1] != self.cond_dim:
            raise ValueError(
                f"condition y must have last dimension m={self.cond_dim}, got shape {y.shape}"
            )
        return y

    def log_weights_given(self, y):
        """``log w(y)``: ``log_softmax(log pi + <y, u_l(k)> / tau)``, shape ``(..., K)``.

        >>> import jax.numpy as jnp
        >>> ring_of_classes().log_weights_given(jnp.zeros((5, 4))).shape
        (5, 12)
        """
        y = self._check_y(y)
        comp_emb = self.class_embeddings[self.labels]  # (K, m)
        logits = jnp.log(self.weights) + (y @ comp_emb.T) / self.temperature
        return jax.nn.log_softmax(logits, -1)

    def weights_given(self, y):
        """Component weights ``w(y)`` of ``p(x | y)``, shape ``(..., K)``.

        >>> cm = ring_of_classes()
        >>> round(float(cm.weights_given(cm.condition(0))[cm.labels == 0].sum()), 3)
        0.948
        """
        return jnp.exp(self.log_weights_given(y))

    def mixture(self, y=None) -> GaussianMixture:
        """``p(x | y)`` for a single embedding ``y`` (``(m,)``; None: null) as a
        :class:`toy.GaussianMixture`.

        >>> ring_of_classes().mixture().num_components
        12
        """
        y = jnp.zeros(self.cond_dim) if y is None else self._check_y(y)
        if y.ndim != 1:
            raise ValueError(f"mixture needs a single embedding of shape (m,), got {y.shape}")
        return GaussianMixture(self.means, self.covs, self.weights_given(y))

    # -- sampling -------------------------------------------------------------------------
    def sample(self, key, n: int, y=None, return_labels: bool = False):
        """``n`` exact samples of ``p(x | y)``; ``y`` is ``(m,)`` (shared), ``(n, m)``
        (one per sample) or None (null). Returns ``(n, d)`` (and component indices).

        >>> import jax
        >>> cm = ring_of_classes()
        >>> cm.sample(jax.random.key(0), 5, cm.condition(1)).shape
        (5, 2)
        """
        n = validation.integer("n", n, minimum=0)
        y = jnp.zeros(self.cond_dim) if y is None else self._check_y(y)
        if y.ndim == 2 and y.shape[0] != n:
            raise ValueError(f"y must have shape (m,) or (n, m)=({n}, {self.cond_dim}), "
                             f"got {y.shape}")  # fmt: skip
        if y.ndim > 2:
            raise ValueError(f"y must have shape (m,) or (n, m), got {y.shape}")
        k_lab, k_eps = jax.random.split(validation.prng_key("key", key))
        logw = jnp.broadcast_to(self.log_weights_given(y), (n, self.num_components))
        comp = jax.random.categorical(k_lab, logw, axis=-1)
        eps = jax.random.normal(k_eps, (n, self.dim))
        x = self.means[comp] + jnp.sqrt(self.covs[comp]) * eps
        return (x, comp) if return_labels else x

    # -- exact quantities of x_t ----------------------------------------------------------
    def _flat(self, x, y):
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension d={self.dim}, got shape {x.shape}")
        xf = x.reshape(-1, self.dim)
        if y is None:
            logw = jnp.log(self.weights)[None]
        else:
            y = self._check_y(y)
            if y.ndim > 1 and y.shape[:-1] != x.shape[:-1]:
                raise ValueError(
                    f"y must have shape (m,) or x's leading shape + (m,)={x.shape[:-1]} + "
                    f"({self.cond_dim},), got {y.shape}"
                )
            logw = self.log_weights_given(y).reshape(-1, self.num_components)
        return xf, logw, x.shape

    def _component_terms(self, xf, alpha, sigma):
        alpha = jnp.asarray(alpha, xf.dtype)
        sigma = jnp.asarray(sigma, xf.dtype)
        var = alpha**2 * self.covs + sigma**2  # (K, d)
        z = xf[:, None, :] - alpha * self.means  # (B, K, d)
        loglik = -0.5 * jnp.sum(jnp.log(2 * math.pi * var), -1) - 0.5 * jnp.sum(z * z / var, -1)
        return loglik, z, var, alpha

    def responsibilities(self, x, y=None, alpha=1.0, sigma=0.0):
        """``p(k | x_t, y)``, shape ``(..., K)`` (``y`` None: null condition).

        >>> cm = ring_of_classes()
        >>> int(cm.responsibilities(cm.means[3:4]).argmax())       # a mode is its own
        3
        """
        xf, logw, shape = self._flat(x, y)
        loglik, _, _, _ = self._component_terms(xf, alpha, sigma)
        return jax.nn.softmax(loglik + logw, -1).reshape(shape[:-1] + (self.num_components,))

    def log_prob(self, x, y=None, alpha=1.0, sigma=0.0):
        """Exact ``log p_t(x | y)`` of ``x_t = alpha x0 + sigma eps``, shape ``x.shape[:-1]``.

        >>> import jax.numpy as jnp
        >>> cm = ConditionalGaussianMixture(jnp.zeros((1, 1)), jnp.ones(1), jnp.array([0]),
        ...                                 jnp.ones((1, 1)))
        >>> round(float(cm.log_prob(jnp.zeros((1, 1)))[0]), 4)      # -log(sqrt(2 pi))
        -0.9189
        """
        xf, logw, shape = self._flat(x, y)
        loglik, _, _, _ = self._component_terms(xf, alpha, sigma)
        return jax.nn.logsumexp(loglik + logw, -1).reshape(shape[:-1])

    def posterior_mean(self, x, y=None, alpha=1.0, sigma=0.0):
        """Exact ``E[x0 | x_t = x, y]`` (module docstring), shape of ``x``.

        >>> import jax.numpy as jnp
        >>> cm = ConditionalGaussianMixture(jnp.zeros((1, 2)), jnp.ones(1), jnp.array([0]),
        ...                                 jnp.ones((1, 1)))
        >>> cm.posterior_mean(jnp.ones((1, 2)), None, 1.0, 1.0).tolist()     # N(0, I): x / 2
        [[0.5, 0.5]]
        """
        xf, logw, shape = self._flat(x, y)
        loglik, z, var, alpha = self._component_terms(xf, alpha, sigma)
        r = jax.nn.softmax(loglik + logw, -1)  # (B, K)
        gain = alpha * self.covs / var  # (K, d)
        out = r @ self.means + jnp.sum(r[..., None] * gain * z, 1)
        return out.reshape(shape)

    def class_posterior(self, x, alpha=1.0, sigma=0.0, y=None):
        """``p(class | x_t)`` under the prior ``w(y)`` (default: null, the base weights),
        shape ``(..., C)``.

        >>> import jax.numpy as jnp
        >>> cm = ring_of_classes()
        >>> p = cm.class_posterior(cm.means[:1])                   # at a mode of class 0
        >>> int(p.argmax()), bool(p[0, 0] > 0.9)
        (0, True)
        """
        r = self.responsibilities(x, y, alpha, sigma)
        onehot = jax.nn.one_hot(self.labels, self.num_classes, dtype=r.dtype)  # (K, C)
        return r @ onehot

    def clip_score(self, x, classes, blur=0.0):
        """The toy "CLIP score" ``p(c | x)`` of each clean sample for its class ``c``.

        ``classes`` is an int (all samples) or ``(n,)``; returns ``(n,)`` in ``[0, 1]``.
        ``blur > 0`` scores with the class posterior of ``x`` read as a noisy point at
        noise level ``blur`` (``p(c | x_t = x)``, alpha = 1): a softer classifier, like
        CLIP, that also rewards being typical of the class rather than merely on its side
        of the decision boundary (the exact posterior ``blur = 0`` saturates at 1 away
        from the boundaries).

        >>> import jax.numpy as jnp
        >>> cm = ring_of_classes()
        >>> bool(cm.clip_score(cm.means[:1], 0)[0] > 0.9)
        True
        >>> bool(cm.clip_score(cm.means[:1], 0, blur=0.5)[0] < cm.clip_score(cm.means[:1], 0)[0])
        True
        """
        post = self.class_posterior(x, 1.0, blur)
        classes = jnp.broadcast_to(self._classes(classes), post.shape[:-1])
        return jnp.take_along_axis(post, classes[..., None], -1)[..., 0]

    def denoiser(self, schedule) -> ConditionalGMMDenoiser:
        """Exact ``D(x, t, cond) = E[x0 | x_t = x, y = cond]`` for ``schedule``
        (``cond`` ``(B, m)``; None is the null condition).

        >>> import jax.numpy as jnp
        >>> from jaxdiv import schedules
        >>> cm = ring_of_classes()
        >>> den = cm.denoiser(schedules.edm())
        >>> den(jnp.zeros((3, 2)), 1.0, cm.condition(jnp.array([0, 1, 2]))).shape
        (3, 2)
        """
        return ConditionalGMMDenoiser(self, schedule)


class ConditionalGMMDenoiser(NamedTuple):
    """The exact posterior-mean denoiser of a :class:`ConditionalGaussianMixture` (a pytree).

    >>> import jax.numpy as jnp
    >>> from jaxdiv import schedules
    >>> cm = ring_of_classes()
    >>> den = ConditionalGMMDenoiser(cm, schedules.flow())
    >>> den(jnp.zeros((2, 2)), 0.5).shape                      # cond=None: null condition
    (2, 2)
    """

    mixture: ConditionalGaussianMixture
    schedule: object

    def __call__(self, x, t, cond=None):
        return self.mixture.posterior_mean(
            x, cond, self.schedule.alpha(t), self.schedule.sigma(t)
        )


def ring_of_classes(
    num_classes: int = 4,
    modes_per_class: int = 3,
    radius: float = 3.0,
    variance: float = 0.09,
    temperature: float = 0.25,
) -> ConditionalGaussianMixture:
    """The trade-off study's toy: ``C * M`` modes on a circle, classes interleaved.

    Mode ``k`` sits at angle ``2 pi k / (C M)`` and belongs to class ``k mod C``, so each
    class has ``M`` modes spread around the ring and every mode's neighbours belong to
    other classes; base weights fall off within a class (``1, 1/2, 1/3, ...``,
    normalised) so the modes of a class are not symmetric. Class embeddings are one-hot
    (``m = C``); with ``tau = 0.25`` the condition ``u_c`` multiplies class ``c``'s
    weights by ``e^4`` (about 95% of ``p(x | u_c)`` is class ``c``).

    >>> ring_of_classes().num_components
    12
    """
    c, m = int(num_classes), int(modes_per_class)
    if c < 1 or m < 1:
        raise ValueError(f"num_classes and modes_per_class must be >= 1, got {c}, {m}")
    k = c * m
    angles = 2 * np.pi * np.arange(k) / k
    means = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
    labels = np.arange(k) % c
    weights = 1.0 / (1.0 + np.arange(k) // c)
    weights = weights / weights.sum()
    return ConditionalGaussianMixture(
        means, np.full(k, variance), labels, np.eye(c), weights, temperature
    )


def _validate(means, covs, labels, class_embeddings, weights):
    for name, arr in (("means", means), ("covs", covs), ("class_embeddings", class_embeddings),
                      ("weights", weights)):  # fmt: skip
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or inf values")
    if np.any(covs < 0):
        raise ValueError(f"covs must be non-negative variances, got min {covs.min():.4g}")
    if np.any(weights < 0):
        raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
    if abs(float(weights.sum()) - 1.0) > 1e-5:
        raise ValueError(f"weights must sum to 1, got sum {float(weights.sum()):.6g}")
    c = class_embeddings.shape[0]
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, C={c}), got range [{labels.min()}, "
                         f"{labels.max()}]")  # fmt: skip
    missing = sorted(set(range(c)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"every class needs a component; classes {missing} have none")
