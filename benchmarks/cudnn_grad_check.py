"""GPU check: gradients through ``attention_core(implementation="cudnn")`` against XLA's.

    PYTHONPATH=. python3 benchmarks/cudnn_grad_check.py   # on a CUDA machine (gpu_run.sh)

JAX's cuDNN attention refuses odd sequence lengths in its differentiable rule; at odd
lengths :func:`jaxdiv.models.layers.attention_core` keeps the fused forward and takes the
XLA gradient. This prints, for T = 77 (CLIP text, causal), 257 (ViT-L/14) and 64 (even:
JAX's cuDNN rule as is), the largest difference between the bf16 gradients of the two
implementations and the largest gradient. The 2026-12-04 H200 output is in
``benchmarks/runs/h200_2026-12-04/log_c.txt``.
"""

import jax
import jax.numpy as jnp

from jaxdiv.models.layers import attention_core


def main() -> None:
    for t, causal in ((77, True), (257, False), (64, False)):
        q, k, v = (
            jax.random.normal(jax.random.key(i), (2, t, 8, 64), jnp.bfloat16) for i in range(3)
        )

        def grad(impl, k=k, v=v, causal=causal, q=q):
            def loss(q):
                out = attention_core(q, k, v, implementation=impl, is_causal=causal)
                return jnp.sum(out.astype(jnp.float32) ** 2)

            return jax.jit(jax.grad(loss))(q).astype(jnp.float32)

        try:
            a, b = grad("cudnn"), grad("xla")
            print("grad T", t, "cudnn vs xla max abs diff", float(jnp.abs(a - b).max()),
                  "max abs", float(jnp.abs(b).max()))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - report and go on to the next length
            print("grad T", t, "FAILED", type(e).__name__, str(e)[:200])


if __name__ == "__main__":
    main()
