"""GASS's write-back (Zhu et al., ICML 2026, Algorithm 2): Adam on ``x0_hat`` with early
stopping, inside ``lax.while_loop``. The only code of jaxdiv's guidance that needs optax,
imported when a GASS term is traced so that ``import jaxdiv`` does not load it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["adam_write_back"]


class _AdamCarry(NamedTuple):
    it: jax.Array
    x: jax.Array
    opt_state: object
    loss: jax.Array
    grad: jax.Array
    ref_loss: jax.Array  # best loss by more than tol: the patience reference
    wait: jax.Array
    best_x: jax.Array
    best_loss: jax.Array


def adam_write_back(loss_fn, x0, lr, max_iters, patience, tol):
    """Adam on ``x0`` inside ``lax.while_loop``; stops after ``max_iters`` iterations or when
    the loss has not improved on its reference by more than ``tol`` for ``patience``
    iterations in a row. Returns ``(x, loss0, loss, iterations)``: the lowest-loss iterate,
    the loss at ``x0``, the lowest loss and the iteration count.

    >>> import jax.numpy as jnp
    >>> x, loss0, loss, iters = adam_write_back(lambda x: jnp.sum((x - 3.0) ** 2),
    ...     jnp.zeros(2), lr=0.05, max_iters=1000, patience=20, tol=1e-6)
    >>> [round(v, 2) for v in x.tolist()], float(loss0), float(loss) < 1e-5, int(iters) < 1000
    ([3.0, 3.0], 18.0, True, True)
    """
    import optax  # here, not at module level: `import jaxdiv` must not load optax

    opt = optax.adam(lr)
    value_and_grad = jax.value_and_grad(loss_fn)
    loss0, grad0 = value_and_grad(x0)
    init = _AdamCarry(jnp.int32(0), x0, opt.init(x0), loss0, grad0, loss0, jnp.int32(0), x0, loss0)

    def cond(c):
        return (c.it < max_iters) & (c.wait < patience)

    def body(c):
        updates, opt_state = opt.update(c.grad, c.opt_state, c.x)
        x = optax.apply_updates(c.x, updates)
        loss, grad = value_and_grad(x)
        improved = loss < c.ref_loss - tol
        better = loss < c.best_loss
        return _AdamCarry(
            c.it + 1,
            x,
            opt_state,
            loss,
            grad,
            jnp.where(improved, loss, c.ref_loss),
            jnp.where(improved, 0, c.wait + 1),
            jnp.where(better, x, c.best_x),
            jnp.where(better, loss, c.best_loss),
        )

    out = jax.lax.while_loop(cond, body, init)
    return out.best_x, loss0, out.best_loss, out.it


