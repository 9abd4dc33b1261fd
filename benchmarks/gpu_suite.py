"""GPU suite: jaxdiv vs diffusers PyTorch on one large GPU, all in one run, one JSON.

    PYTHONPATH=. python3 -m benchmarks.gpu_suite --out $OUT/gpu_suite.json   # H200: ~6 min
    python -m benchmarks.gpu_suite --smoke --out /tmp/gpu_suite_smoke.json   # CPU, tiny

Sections (each a function of this module, run in this order; ``--sections`` picks some):

1. ``sd21_generate``: SD2.1-shaped random pipeline (UNet ``block_out_channels`` (320, 640,
   1280, 1280) as ``benchmarks.sd_step``'s ``sd21``, the 23-layer 1024-wide OpenCLIP-H
   text encoder, the (128, 256, 512, 512) VAE), 512x512 px (latent 64), 2 prompts, CFG
   7.5, 50 DDIM steps (eta 0), VAE decode: jaxdiv as one jitted program in bfloat16 vs
   diffusers ``StableDiffusionPipeline`` in float16, the same initial latents, alternating
   A B A B. The max abs difference of the two image batches is a sanity figure only
   (different dtypes, random weights).
2. ``methods_overhead``: per-step cost of each diversity method over CFG only (SPELL, PG,
   CADS, interval guidance, TPSO sampling and its once-per-prompt optimisation, GASS with
   the paper's pixel write-back and a ViT-L/14-sized CLIP vision tower), the same
   pipeline at 512x512, ``--methods-steps`` DDIM steps on a batch of 4, each method one
   compiled program (:func:`benchmarks.sd_methods.build_methods`). Methods whose compile
   would not fit the section's share of the budget are recorded as skipped.
3. ``sd3_step``: one SD3-Medium-shaped MMDiT forward (24 blocks, 1536 wide, 2.03B
   parameters without the position table; ``benchmarks.sd3_step.SD3_MEDIUM``) at
   1024x1024 px (latent 128, 4096 image tokens + 77 CLIP + 256 T5 tokens), CFG batch 2:
   jaxdiv bf16 vs diffusers bf16 and fp16; and jaxdiv with contextual-space repulsion
   (``guidance.contextual_hook``, M = 100 inner steps after every joint block, each CFG
   branch within itself) on two CFG pairs (the hook needs two samples per branch to act)
   against the plain forward of that batch, ``contextual_over_plain`` (the issue's goal:
   <= 1.10; the paper: +20-30% on Flux-dev), with ``max_abs_change`` showing it acted.
   The random torch model is built on the device and its state dict converted in
   memory (:func:`jaxdiv.models.conversion.convert_mmdit_state_dict`), skipping a 4 GB
   save / load; the SD sections go through the folder loader.
4. ``spell_million``: exact SPELL search over 10^6 reference latents of 4x32x32 (d =
   4096, float32, 16.4 GB; :func:`jaxdiv.guidance.spell.radius_search.build_index`, blocks
   of 4096) per DDIM step, with vs without the term on the UNet-sized dense dummy
   denoiser of ``benchmarks.spell``, and the term alone; batches 8 and 64.

Timings are median [min-max] over rounds with the implementations alternating
(:func:`benchmarks.timing.interleaved`, one warm-up call each); every timed call blocks
(``block_until_ready`` / ``torch.cuda.synchronize``). Compile and build times are
reported apart. The JSON (``--out``) is rewritten atomically after every section, so a
killed run keeps what finished; a section that fails records its error (type, message,
traceback tail) and the suite goes on. Each section gets a share of ``--budget-s``
(default 450 s; unused time passes on) and skips work that would not fit. The JSON
records the device kind, versions, dtypes, sizes and peak device memory (JAX
``memory_stats``, ``torch.cuda.max_memory_allocated``; JAX's peak is the process's so far).

``--smoke`` runs the same code at tiny sizes (the test suite's tiny pipeline, a 3-layer
MMDiT, 10^3 shields of 4x8x8, 2-3 steps, one round; XLA's slow optimisation passes off)
on CPU: the test
``tests/test_benchmark_gpu_suite.py`` runs it, so a typo fails here, not on the GPU.

Before importing JAX this sets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (unless set), so
JAX and PyTorch share the device's memory; a run on a CPU-only machine also works (slowly)
with the full sizes, but it is meant for the GPU.

**diffusers on the GPU machine.** The GPU image has torch, transformers and safetensors
but no diffusers, and no network. Download the wheel here (pure Python; its other
requirements are in the image), in the repository root::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        -d .whl diffusers==0.42.1

and on the GPU machine (``carry`` ``.whl``) start the command with::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site:$PYTHONPATH
    PYTHONPATH=.:$PYTHONPATH python3 -m benchmarks.gpu_suite --out $OUT/gpu_suite.json

``benchmarks/gpu_run.sh`` wraps this for one device call (the wheel, versions, a time
limit); on 2026-12-04 the four sections took 343 s on one H200 over three device calls
(82.5 + 179.3 + 35.2 + 45.6 s, the methods section rebuilding the pipeline;
``benchmarks/runs/h200_2026-12-04/``).

Without diffusers the suite still runs: the diffusers peer is recorded as skipped with the
reason; ``sd3_step`` and ``spell_million`` time jaxdiv alone (random NumPy weights), and
the two SD sections are skipped (their random weights are built with diffusers).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import math
import os
import platform
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import version
from experiments.common import write_json

SECTIONS = ("sd21_generate", "methods_overhead", "sd3_step", "spell_million")
# share of the remaining budget each section may use (unused time passes on)
WEIGHTS = {"sd21_generate": 0.30, "methods_overhead": 0.30, "sd3_step": 0.25,
           "spell_million": 0.15}  # fmt: skip
CFG = 7.5
PROMPTS = ["a photo of a cat", "a red dog"]

# GASS's CLIP vision tower: ViT-L/14 at 224 px
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
               num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
               hidden_act="quick_gelu")  # fmt: skip


def sizes(smoke: bool) -> dict[str, Any]:
    """Every size of the run: full (GPU) or tiny (``--smoke``, CPU)."""
    from benchmarks import sd3_step
    from benchmarks.sd_generate import CONFIGS as SD_CONFIGS

    if smoke:
        return dict(
            sd_config={}, sd_vision=True, sd_px=None, sd_steps=3, prompts=PROMPTS,
            methods_steps=2, methods_batch=3, gass_iters=2,
            sd3_config=dict(sd3_step.CONFIGS["tiny"]), sd3_latent=16, sd3_t5_tokens=8,
            spell_shape=(4, 8, 8), spell_refs=1000, spell_batches=(3,), spell_steps=2,
            spell_block=256, spell_radius=5.0, spell_depth=2, rounds=1,
        )  # fmt: skip
    return dict(
        sd_config=dict(SD_CONFIGS["sd21"]),
        sd_vision=VIT_L14, sd_px=512, sd_steps=50, prompts=PROMPTS,
        methods_steps=10, methods_batch=4, gass_iters=10,
        sd3_config=dict(sd3_step.SD3_MEDIUM), sd3_latent=128, sd3_t5_tokens=256,
        spell_shape=(4, 32, 32), spell_refs=1_000_000, spell_batches=(8, 64), spell_steps=20,
        spell_block=4096, spell_radius=20.0, spell_depth=4, rounds=3,
    )  # fmt: skip


class Skipped(Exception):
    """A section (or a peer) that cannot run here; the message says why."""


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    return str(o)


def _diffusers():
    """``(diffusers module or None, reason)``."""
    try:
        import diffusers
    except Exception as err:  # noqa: BLE001 - any import failure means "no peer"
        return (
            None,
            f"diffusers is not importable ({type(err).__name__}: {err}); carry the "
            "wheel, see the benchmarks.gpu_suite docstring",
        )
    return diffusers, ""


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _stats(t: dict) -> dict:
    """One implementation's entry of :func:`benchmarks.timing.interleaved`."""
    return {k: t[k] for k in ("median_s", "min_s", "max_s", "runs_s")}


def _fmt(t: dict, scale=1.0, unit="s") -> str:
    return (f"{t['median_s'] * scale:.4g} [{t['min_s'] * scale:.4g}-{t['max_s'] * scale:.4g}]"
            f" {unit}")  # fmt: skip


def _finite_fraction(a) -> float:
    a = np.asarray(a, np.float32)
    return float(np.isfinite(a).mean()) if a.size else 1.0


class Suite:
    """State shared by the sections: sizes, devices, budget, cached models, the JSON."""

    def __init__(self, args, sections):
        import jax
        import jax.numpy as jnp

        self.args = args
        self.smoke = args.smoke
        self.sz = sizes(args.smoke)
        if args.rounds is not None:
            self.sz["rounds"] = args.rounds
        self.budget_s = args.budget_s
        self.t0 = time.perf_counter()
        self.sections = sections
        self.cache: dict[str, Any] = {}
        self.tmp = tempfile.TemporaryDirectory(prefix="gpu_suite_")
        self.jdtype = jnp.bfloat16
        self.jax_platform = jax.devices()[0].platform
        self.on_gpu = self.jax_platform == "gpu"
        if args.attention == "auto":
            self.attention = "cudnn" if self.on_gpu else None
        else:
            self.attention = None if args.attention == "none" else args.attention
        self.diffusers, self.diffusers_reason = _diffusers()
        self.torch_device = "cpu"
        with contextlib.suppress(ImportError):
            import torch

            self.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        self.out = Path(args.out)
        self.result: dict[str, Any] = {
            "suite": "benchmarks.gpu_suite",
            "command": " ".join(["python -m benchmarks.gpu_suite"] + list(args.argv)),
            "smoke": self.smoke,
            "started_utc": _utc(),
            "budget_s": self.budget_s,
            "environment": self.environment(),
            "dtypes": {"jaxdiv": "bfloat16", "diffusers_sd21": "float16",
                       "diffusers_sd3": ["bfloat16", "float16"], "spell": "float32"},
            "attention_implementation": self.attention,
            "sizes": self.sz,
            "timing": "interleaved A B A B after one warm-up call each; median [min-max] "
                      "seconds; every timed call blocks until the device is done",
            "sections": {name: {"status": "pending"} for name in sections},
        }  # fmt: skip

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def share(self, name: str) -> float:
        """Seconds ``name`` may use: its weight's share of what is left for it and the
        sections after it."""
        rest = self.sections[self.sections.index(name) :]
        total = sum(WEIGHTS[s] for s in rest)
        return max(0.0, self.remaining()) * WEIGHTS[name] / total

    def environment(self) -> dict:
        import jax

        dev = jax.devices()[0]
        env = {
            "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "jax_device_kind": getattr(dev, "device_kind", None),
            "torch_device": self.torch_device,
            "torch_device_name": None,
            "diffusers_available": self.diffusers is not None,
            "diffusers_reason": self.diffusers_reason or None,
            "versions": {
                "python": platform.python_version(),
                "jax": jax.__version__,
                "jaxlib": version("jaxlib"),
                "flax": version("flax"),
                "numpy": np.__version__,
                "torch": version("torch"),
                "diffusers": getattr(self.diffusers, "__version__", None),
                "transformers": version("transformers"),
            },
            "env": {k: os.environ.get(k) for k in (
                "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "JAX_PLATFORMS", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")},
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "jax_platform_version": _platform_version(),
        }  # fmt: skip
        if self.torch_device == "cuda":
            import torch

            env["torch_device_name"] = torch.cuda.get_device_name(0)
            env["torch_cuda"] = torch.version.cuda
            env["torch_cudnn"] = torch.backends.cudnn.version()
        with contextlib.suppress(Exception):  # torch may be absent
            import torch

            env["torch_threads"] = torch.get_num_threads()
        return env

    def memory(self) -> dict:
        """Peak device memory so far: JAX's (process) and torch's (since the section began)."""
        import jax

        out = {}
        try:
            stats = jax.devices()[0].memory_stats() or {}
        except Exception:  # noqa: BLE001 - not every backend has stats
            stats = {}
        for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
            if k in stats:
                out[f"jax_{k}_gb"] = stats[k] / 1e9
        if self.torch_device == "cuda":
            import torch

            out["torch_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            out["torch_max_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        return out

    def write(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        # Linux reports ru_maxrss in KiB
        self.result["host_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.result["updated_utc"] = _utc()
        write_json(self.out, self.result, _json_default)  # whole or absent

    def run_section(self, name: str, fn) -> None:
        entry = self.result["sections"][name] = {"status": "running"}
        entry["budget_share_s"] = self.share(name)
        if self.torch_device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        print(f"[{self.elapsed():6.1f} s] {name}: start (share {entry['budget_share_s']:.0f} s)",
              flush=True)  # fmt: skip
        try:
            if self.remaining() <= 0:
                raise Skipped(f"budget of {self.budget_s} s spent before the section began")
            entry["result"] = fn(self, deadline=t0 + entry["budget_share_s"])
            entry["status"] = "ok"
        except Skipped as err:
            entry["status"] = "skipped"
            entry["reason"] = str(err)
        except Exception as err:  # noqa: BLE001 - record it, run the other sections
            entry["status"] = "error"
            entry["error"] = {
                "type": type(err).__name__,
                "message": str(err)[:2000],
                "traceback_tail": "".join(traceback.format_exception(err))[-4000:],
            }
        entry["elapsed_s"] = time.perf_counter() - t0
        entry["memory"] = self.memory()
        print(f"[{self.elapsed():6.1f} s] {name}: {entry['status']} "
              f"({entry['elapsed_s']:.1f} s)", flush=True)  # fmt: skip
        if entry["status"] == "error":
            print(entry["error"]["traceback_tail"], file=sys.stderr, flush=True)
        self.write()

    def free_torch(self) -> None:
        import gc

        gc.collect()
        if self.torch_device == "cuda":
            import torch

            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ shared models
    def sd_bundle(self) -> dict:
        """The SD2.1-shaped random pipeline: saved by diffusers, loaded by jaxdiv (cached)."""
        if "sd" in self.cache:
            return self.cache["sd"]
        if "sd_error" in self.cache:
            raise Skipped(f"the SD pipeline failed to build earlier: {self.cache['sd_error']}")
        try:
            return self._build_sd_bundle()
        except Skipped:
            raise
        except Exception as err:
            self.cache["sd_error"] = _fallback_reason(err)
            raise

    def _build_sd_bundle(self) -> dict:
        if self.diffusers is None:
            raise Skipped(self.diffusers_reason + " (the random SD weights are built with it)")
        from jaxdiv.pipelines import stable_diffusion as sd
        from jaxdiv.testing import save_random_pipeline

        for lib in ("diffusers", "transformers"):
            mod = sys.modules.get(lib)
            with contextlib.suppress(Exception):
                mod.utils.logging.disable_progress_bar()
                mod.utils.logging.set_verbosity_error()
        folder = Path(self.tmp.name) / "sd21"
        t0 = time.perf_counter()
        torch_pipe = save_random_pipeline(folder, seed=0, image_encoder=self.sz["sd_vision"],
                                          **self.sz["sd_config"])  # fmt: skip
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        attention, fallback = self.attention, None
        try:
            pipe = sd.load(folder, dtype=self.jdtype, attention_implementation=attention)
        except Exception as err:  # noqa: BLE001 - the fused attention failed: use XLA's
            if attention is None:
                raise
            attention, fallback = None, _fallback_reason(err)
            pipe = sd.load(folder, dtype=self.jdtype)
        load_s = time.perf_counter() - t0
        torch_pipe.set_progress_bar_config(disable=True)
        self.cache["sd"] = {
            "folder": folder, "pipe": pipe, "torch_pipe": torch_pipe,
            "attention": attention,
            "attention_fallback": fallback,
            "unet_params": int(sum(p.numel() for p in torch_pipe.unet.parameters())),
            "text_params": int(sum(p.numel() for p in torch_pipe.text_encoder.parameters())),
            "vae_params": int(sum(p.numel() for p in torch_pipe.vae.parameters())),
            "build_save_s": build_s, "jax_load_s": load_s,
        }  # fmt: skip
        return self.cache["sd"]

    def sd_reload_without_fused_attention(self, why: str) -> dict:
        """Reload the jaxdiv pipeline with the default attention after a failure of the
        fused one; recorded in the result."""
        from jaxdiv.pipelines import stable_diffusion as sd

        b = self.cache["sd"]
        b["pipe"] = sd.load(b["folder"], dtype=self.jdtype)
        b["attention"] = None
        b["attention_fallback"] = why
        return b


def _utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _fallback_reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:300]}"


def _drop_failing_peers(fns: dict, peers: dict, ours: tuple[str, ...]) -> None:
    """Call each peer (not in ``ours``) once; one that raises (out of memory, a version
    mismatch) is recorded in ``peers`` and left out of the timing, so jaxdiv's numbers
    survive it."""
    for name in [n for n in fns if n not in ours]:
        try:
            fns[name]()
        except Exception as err:  # noqa: BLE001 - record it, time the rest
            del fns[name]
            peers[name] = {**peers.get(name, {}), "status": "error",
                           "reason": _fallback_reason(err)}  # fmt: skip


# ====================================================================== 1. SD2.1 generation
def sd21_generate(suite: Suite, deadline: float) -> dict:
    """Full generation: prompt encoding, DDIM + CFG, VAE decode; jaxdiv bf16 vs diffusers."""
    import jax
    import jax.numpy as jnp
    import torch

    import jaxdiv
    from benchmarks.timing import interleaved, round_ratio_range
    from jaxdiv import guidance

    sz = suite.sz
    b = suite.sd_bundle()
    prompts, steps = sz["prompts"], sz["sd_steps"]

    def program(pipe):
        shape = pipe.noise_shape(len(prompts), height=sz["sd_px"], width=sz["sd_px"])
        sampler = pipe.ddim(steps)
        term = guidance.cfg(CFG, null_cond=pipe.null_cond)
        params = (pipe.encode_prompt.params, pipe.denoiser.model.params, pipe.decode.params)

        def generate(params, tokens, noise):
            enc, unet, dec = params
            cond = pipe.encode_prompt.apply(enc, tokens)
            den = pipe.denoiser._replace(model=pipe.denoiser.model._replace(params=unet))
            out = jaxdiv.sample(sampler, den, noise, key=jax.random.key(0), cond=cond,
                                guidance=term)  # fmt: skip
            return pipe.decode.apply(dec, out.x0)

        return shape, params, generate

    pipe = b["pipe"]
    shape, params, generate = program(pipe)
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    noise_j = jnp.asarray(noise)
    tokens = jnp.asarray(pipe.tokenize(prompts))
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(generate).lower(params, tokens, noise_j).compile()
        compiled(params, tokens, noise_j).block_until_ready()
    except Exception as err:  # noqa: BLE001 - a fused-attention failure: retry without it
        if b["attention"] is None:
            raise
        pipe = suite.sd_reload_without_fused_attention(_fallback_reason(err))["pipe"]
        shape, params, generate = program(pipe)
        t0 = time.perf_counter()
        compiled = jax.jit(generate).lower(params, tokens, noise_j).compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        return compiled(params, tokens, noise_j).block_until_ready()

    fns = {"jaxdiv": run_jax}
    peers = {"jaxdiv": {"status": "ok", "dtype": "bfloat16"}}
    torch_dtype = torch.float16
    height, width = (n * pipe.vae_scale_factor for n in shape[2:])
    if b.get("torch_pipe") is not None:
        t0 = time.perf_counter()
        torch_pipe = b["torch_pipe"].to(suite.torch_device, torch_dtype)
        to_device_s = time.perf_counter() - t0
        latents_t = torch.from_numpy(noise).to(suite.torch_device, torch_dtype)

        def run_torch():
            with torch.no_grad():
                images = torch_pipe(prompts, num_inference_steps=steps, guidance_scale=CFG,
                                    eta=0.0, latents=latents_t, height=height, width=width,
                                    output_type="np").images  # fmt: skip
            _sync()
            return images

        fns["diffusers"] = run_torch
        peers["diffusers"] = {"status": "ok", "dtype": "float16", "to_device_s": to_device_s}
        _drop_failing_peers(fns, peers, ("jaxdiv",))
    rounds_budget = max(1.0, deadline - time.perf_counter())
    timed = interleaved(fns, sz["rounds"], budget_s=rounds_budget)
    out = {
        "image_px": [height, width],
        "latent_shape": list(shape),
        "batch": len(prompts),
        "steps": steps,
        "cfg": CFG,
        "sampler": "DDIM eta 0 (diffusers' DDIMScheduler grid)",
        "unet_params": b["unet_params"],
        "text_encoder_params": b["text_params"],
        "vae_params": b["vae_params"],
        "build_save_s": b["build_save_s"],
        "jax_load_s": b["jax_load_s"],
        "jax_compile_s": compile_s,
        "attention_implementation": b["attention"],
        "attention_fallback": b.get("attention_fallback"),
        "peers": peers,
        "times": {k: _stats(v) for k, v in timed.items()},
    }
    ours = np.asarray(run_jax(), np.float32)
    out["jaxdiv_image_finite_fraction"] = _finite_fraction(ours)
    if "diffusers" in timed:
        d = timed["diffusers"]["median_s"] / timed["jaxdiv"]["median_s"]
        out["diffusers_over_jaxdiv"] = d
        out["ratio_min_max"] = round_ratio_range(timed, "diffusers", "jaxdiv")
        theirs = np.asarray(run_torch(), np.float32)
        ours01 = np.clip(ours.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
        out["max_abs_image_diff"] = float(np.abs(ours01 - theirs).max())
        out["max_abs_image_diff_note"] = "sanity figure only: bf16 vs fp16, random weights"
        # the SD folder's torch pipeline is done: free the device for the next sections
        b["torch_pipe"] = None
        del torch_pipe, fns, run_torch
        suite.free_torch()
    else:
        peers["diffusers"] = {"status": "skipped", "reason": suite.diffusers_reason}
    suite.cache["sd21_step_s"] = timed["jaxdiv"]["median_s"] / steps
    return out


# ====================================================================== 2. methods
def methods_overhead(suite: Suite, deadline: float) -> dict:
    """Per-step overhead of each diversity method over CFG only (jaxdiv, one program each)."""
    import jax

    import jaxdiv
    from benchmarks.sd_methods import PROMPT, build_methods, tpso_ratio
    from benchmarks.timing import interleaved
    from jaxdiv.pipelines.tpso import tpso_conditions, tpso_guidance

    sz = suite.sz
    b = suite.sd_bundle()
    if b.get("torch_pipe") is not None:  # section 1 did not run: free the torch copy
        b["torch_pipe"] = None
        suite.free_torch()
    pipe = b["pipe"]
    steps, batch = sz["methods_steps"], sz["methods_batch"]
    noise = jax.random.normal(
        jax.random.key(1), pipe.noise_shape(batch, height=sz["sd_px"], width=sz["sd_px"])
    )
    t0 = time.perf_counter()
    cond, r, methods = build_methods(pipe, noise, steps, sz["gass_iters"])
    setup_s = time.perf_counter() - t0  # includes the unguided program's compile
    methods.pop("gass (latent write-back)", None)  # VAE decoder fwd + bwd per Adam iteration
    sampler = pipe.ddim(steps, clean_endpoint=True)

    width = pipe.token_embedding.shape[1]
    kernel = jax.random.normal(jax.random.key(5), (width, 64)) / width**0.5

    def optimise():
        c = tpso_conditions(pipe, [PROMPT], batch, jax.random.key(0), projection=kernel)
        return c.optimized.block_until_ready(), c

    # GASS right after CFG: its compile is the longest, and last it was skipped for the
    # budget the cheap methods had used
    order = ["unguided (CFG)", "gass (pixel write-back)", "spell", "particle", "cads",
             "interval", "tpso (sampling)"]  # fmt: skip
    fns, first_call_s, skipped, errors = {}, {}, {}, {}
    tpso_c = None
    for name in order:
        # GASS's program adds the VAE and the CLIP tower's backward pass: a larger compile
        # (36 s against CFG's 25 s of setup on the H200, 2026-12-04)
        factor = 1.6 if name.startswith("gass") else 1.2
        est = factor * max([setup_s, *first_call_s.values()])  # setup: CFG's compile
        if name != order[0] and time.perf_counter() + est > deadline:
            skipped[name] = (f"budget: compiling it (~{est:.0f} s, the slowest so far) would "
                             "pass the section's share")  # fmt: skip
            continue
        t0 = time.perf_counter()
        try:
            if name.startswith("tpso"):
                _, tpso_c = optimise()
                first_call_s["tpso (optimisation, once per prompt)"] = time.perf_counter() - t0
                g, c = tpso_guidance(tpso_c, CFG, ratio=tpso_ratio(steps)), tpso_c.cond
                t0 = time.perf_counter()
            else:
                g, c = methods[name], cond

            def run(g=g, c=c):
                out = jaxdiv.sample(sampler, pipe.denoiser, noise, key=jax.random.key(2),
                                    cond=c, guidance=g)  # fmt: skip
                return out.x0.block_until_ready()

            run()
        except Exception as err:  # noqa: BLE001 - record it, time the other methods
            if name == order[0]:
                raise
            errors[name] = {"type": type(err).__name__, "message": str(err)[:1000],
                            "traceback_tail": traceback.format_exc()[-2000:]}  # fmt: skip
            continue
        first_call_s[name] = time.perf_counter() - t0
        fns[name] = run
        if name.startswith("tpso"):
            fns["tpso (optimisation, once per prompt)"] = optimise
    timed = interleaved(fns, sz["rounds"], budget_s=max(1.0, deadline - time.perf_counter()))
    base = timed["unguided (CFG)"]["median_s"]
    rows = []
    for name, t in timed.items():
        once = name.startswith("tpso (optim")
        rows.append({
            "method": name,
            "times": _stats(t),
            "per_step_s": None if once else t["median_s"] / steps,
            "overhead_per_step_s": None if once else (t["median_s"] - base) / steps,
            "ratio_to_unguided": t["median_s"] / base,
            "first_call_s": first_call_s.get(name),
        })  # fmt: skip
    return {
        "image_px": sz["sd_px"] or pipe.sample_size * pipe.vae_scale_factor,
        "latent_shape": list(noise.shape),
        "batch": batch,
        "steps": steps,
        "cfg": CFG,
        "sampler": "DDIM eta 0, clean endpoint",
        "gass_max_iters": sz["gass_iters"],
        "spell_radius": r,
        "tpso_optimizer_steps": None if tpso_c is None else int(tpso_c.result.steps),
        "tpso_ratio": tpso_ratio(steps),
        "setup_s": setup_s,
        "attention_implementation": b["attention"],
        "rows": rows,
        "skipped": skipped,
        "errors": errors,
        "note": "GASS latent write-back omitted (its Adam iterations run the VAE decoder "
                "forward and backward); first_call_s includes compilation",
    }  # fmt: skip


# ====================================================================== 3. SD3 MMDiT step
def _torch_mmdit_on_device(config: dict, device: str, seed: int):
    """A random diffusers SD3 transformer built on ``device`` (fp32 init, random norms and
    biases as :func:`jaxdiv.testing.randomize_norms_and_biases`), then bf16."""
    import torch
    from diffusers import SD3Transformer2DModel as TorchMMDiT

    from jaxdiv.testing import randomize_norms_and_biases

    torch.manual_seed(seed)
    with torch.device(device):
        model = TorchMMDiT(**config)
    model = randomize_norms_and_biases(model, seed)  # CPU draws, copied to the device
    # .to(device) too: buffers made from NumPy (the position table) start on the CPU
    return model.to(device=device, dtype=torch.bfloat16).eval()


def _jax_mmdit_from_torch(torch_model, dtype, attention):
    """The jaxdiv MMDiT holding ``torch_model``'s weights, converted in memory."""
    from flax import nnx

    from jaxdiv.models.checkpoint import assign_params
    from jaxdiv.models.conversion import convert_mmdit_state_dict
    from jaxdiv.models.mmdit import MMDiTConfig, SD3Transformer2DModel

    config = dict(torch_model.config)
    sd = {k: v.detach().float().cpu().numpy() for k, v in torch_model.state_dict().items()}
    model = nnx.eval_shape(lambda: SD3Transformer2DModel(
        MMDiTConfig.from_dict(config), dtype=dtype, attention_implementation=attention,
        rngs=nnx.Rngs(0)))  # fmt: skip
    assign_params(model, convert_mmdit_state_dict(sd, config), component="gpu_suite",
                  dtype=dtype)  # fmt: skip
    return model


def _jax_mmdit_random(config: dict, dtype, attention, seed: int):
    """A jaxdiv MMDiT with random NumPy weights (no torch), as
    :func:`jaxdiv.testing.random_mmdit` but in ``dtype``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdiv.models.mmdit import MMDiTConfig, SD3Transformer2DModel

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: SD3Transformer2DModel(
        MMDiTConfig.from_dict(config), dtype=dtype, attention_implementation=attention,
        rngs=nnx.Rngs(0))))  # fmt: skip
    rng = np.random.default_rng(seed)

    def fill(a):
        scale = 1.0 / math.sqrt(a.shape[-2]) if len(a.shape) >= 2 else 0.1
        return jnp.asarray(rng.normal(0.0, scale, a.shape).astype(np.float32), a.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, abstract))


CONTEXTUAL_ETA, CONTEXTUAL_M = 1e3, 100  # SD3.5-Large's M; eta inside the paper's range


def sd3_step(suite: Suite, deadline: float) -> dict:
    """One SD3-Medium-shaped MMDiT forward on a CFG pair: jaxdiv bf16 vs diffusers, and
    jaxdiv with contextual-space repulsion (M = 100 after every joint block) vs without."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.sd3_step import BATCH, CLIP_TOKENS, TIMESTEP, make_inputs
    from benchmarks.timing import interleaved

    sz = suite.sz
    config = dict(sz["sd3_config"])
    latent, t5 = sz["sd3_latent"], sz["sd3_t5_tokens"]
    peers: dict[str, Any] = {}
    attention = suite.attention
    t0 = time.perf_counter()
    torch_model = None
    if suite.diffusers is not None:
        torch_model = _torch_mmdit_on_device(config, suite.torch_device, seed=0)
        torch_build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = _jax_mmdit_from_torch(torch_model, suite.jdtype, attention)
        build = "diffusers model built on the device, state dict converted in memory"
    else:
        torch_build_s = None
        model = _jax_mmdit_random(config, suite.jdtype, attention, seed=0)
        build = "random NumPy weights (no diffusers)"
        peers["diffusers"] = {"status": "skipped", "reason": suite.diffusers_reason}
    jax_build_s = time.perf_counter() - t0
    sizes = {jax.tree_util.keystr(k): int(np.prod(v.shape)) for k, v in
             jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}  # fmt: skip
    pos_params = sum(v for k, v in sizes.items() if "pos_embed" in k)
    n_params = sum(sizes.values()) - pos_params  # diffusers' count: the table is a buffer

    x, t, ctx, pooled = make_inputs(config, latent, t5, seed=0)
    args_j = tuple(jnp.asarray(a) for a in (x, t, ctx, pooled))

    def compile_step(model, hook=None, args=args_j):
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, hook, x, t, ctx, pooled):
            return nnx.merge(graphdef, state)(x, t, ctx, pooled, context_hook=hook)

        compiled = step.lower(state, hook, *args).compile()
        run = functools.partial(compiled, state, hook)
        run(*args).block_until_ready()
        return run

    t0 = time.perf_counter()
    try:
        compiled = compile_step(model)
    except Exception as err:  # noqa: BLE001 - a fused-attention failure: retry without it
        if attention is None:
            raise
        peers["jaxdiv_attention_fallback"] = _fallback_reason(err)
        attention = None
        for _, m in nnx.iter_graph(model):
            if isinstance(m, nnx.Module) and hasattr(m, "implementation"):
                m.implementation = None
        t0 = time.perf_counter()
        compiled = compile_step(model)
    compile_s = time.perf_counter() - t0
    # contextual-space repulsion (issue: <= 10% per step): the paper's M = 100 inner steps
    # after every joint block, each CFG branch within itself. It needs two samples per
    # branch to act (one sample has nothing to repel from: the 2026-12-04 run timed the
    # CFG pair, where the hook is the identity): two CFG pairs, against the plain forward
    # of the same batch
    from jaxdiv.guidance import contextual_hook

    pair2 = make_inputs(config, latent, t5, seed=1)
    args_c = tuple(jnp.concatenate([a, jnp.asarray(b)]) for a, b in zip(args_j, pair2))
    plain4 = compile_step(model, args=args_c)
    with_hook = compile_step(model, contextual_hook(CONTEXTUAL_ETA, CONTEXTUAL_M,
                                                    cfg_halves=True), args=args_c)  # fmt: skip
    del model

    def run_jax():
        return compiled(*args_j).block_until_ready()

    fns = {"jaxdiv_bf16": run_jax,
           "jaxdiv_bf16_batch4": lambda: plain4(*args_c).block_until_ready(),
           "jaxdiv_bf16_batch4_contextual": lambda: with_hook(*args_c).block_until_ready()}
    peers["jaxdiv_bf16"] = {"status": "ok"}
    model16 = None
    if torch_model is not None:
        import torch

        dev = suite.torch_device

        def torch_runner(model, dtype):
            xt, ct, pt = (torch.from_numpy(a).to(dev, dtype) for a in (x, ctx, pooled))
            tt = torch.from_numpy(t).to(dev)

            def run():
                with torch.no_grad():
                    out = model(xt, encoder_hidden_states=ct, pooled_projections=pt,
                                timestep=tt).sample  # fmt: skip
                _sync()
                return out

            return run

        fns["diffusers_bf16"] = torch_runner(torch_model, torch.bfloat16)
        peers["diffusers_bf16"] = {"status": "ok"}
        _drop_failing_peers(fns, peers, tuple(n for n in fns if n.startswith("jaxdiv")))
        try:
            model16 = copy.deepcopy(torch_model).to(torch.float16)
            fns["diffusers_fp16"] = torch_runner(model16, torch.float16)
            fns["diffusers_fp16"]()
            peers["diffusers_fp16"] = {"status": "ok"}
        except Exception as err:  # noqa: BLE001 - fp16 kernels missing on this device
            fns.pop("diffusers_fp16", None)
            peers["diffusers_fp16"] = {"status": "error", "reason": _fallback_reason(err)}
    agreement = {}
    ours = np.asarray(run_jax(), np.float32)
    agreement["jaxdiv_finite_fraction"] = _finite_fraction(ours)
    if "diffusers_bf16" in fns:
        ref = fns["diffusers_bf16"]().float().cpu().numpy()
        scale = float(np.abs(ref).max())
        agreement["max_abs_diff_vs_diffusers_bf16"] = float(np.abs(ours - ref).max())
        agreement["max_abs_output"] = scale
        agreement["rel_max_abs_diff"] = (agreement["max_abs_diff_vs_diffusers_bf16"] / scale
                                         if scale else float("nan"))  # fmt: skip
    timed = interleaved(fns, sz["rounds"], budget_s=max(1.0, deadline - time.perf_counter()))
    out = {
        "model_config": config,
        "params": n_params,
        "pos_embed_params": pos_params,
        "latent_shape": list(x.shape),
        "image_px": latent * 8,
        "image_tokens": (latent // config["patch_size"]) ** 2,
        "text_tokens": CLIP_TOKENS + t5,
        "batch": BATCH,
        "timestep": TIMESTEP,
        "build": build,
        "torch_build_s": torch_build_s,
        "jax_build_s": jax_build_s,
        "jax_compile_s": compile_s,
        "attention_implementation": attention,
        "peers": peers,
        "agreement": agreement,
        "times": {k: _stats(v) for k, v in timed.items()},
    }
    for peer in ("diffusers_bf16", "diffusers_fp16"):
        if peer in timed:
            out[f"{peer}_over_jaxdiv"] = timed[peer]["median_s"] / timed["jaxdiv_bf16"]["median_s"]
    repelled = np.asarray(with_hook(*args_c), np.float32)
    change = np.abs(repelled - np.asarray(plain4(*args_c), np.float32)).max()
    out["contextual"] = {"eta": CONTEXTUAL_ETA, "inner_steps": CONTEXTUAL_M,
                         "blocks": "every joint block but the last (context_pre_only)",
                         "batch": int(args_c[0].shape[0]), "samples_per_cfg_branch": 2,
                         "finite_fraction": _finite_fraction(repelled),
                         # > 0: the hook acted (it is the identity on one sample per branch)
                         "max_abs_change": float(change)}  # fmt: skip
    if "jaxdiv_bf16_batch4_contextual" in timed:
        out["contextual_over_plain"] = (timed["jaxdiv_bf16_batch4_contextual"]["median_s"]
                                        / timed["jaxdiv_bf16_batch4"]["median_s"])  # fmt: skip
    # the fp16 copy too (4 GB at SD3-Medium size): torch kept it reserved into spell_million
    del fns, torch_model, model16
    suite.free_torch()
    return out


# ====================================================================== 4. SPELL 10^6
def spell_million(suite: Suite, deadline: float) -> dict:
    """Exact SPELL search over 10^6 shields per DDIM step, with vs without the term."""

    import jax

    from benchmarks.spell import DenseDummy, time_terms
    from jaxdiv import samplers, schedules
    from jaxdiv.guidance.spell import spell
    from jaxdiv.guidance.spell.radius_search import build_index

    sz = suite.sz
    # the SD sections' pipeline (3 GB) is not needed here: the reference set is 16 GB
    suite.cache.pop("sd", None)
    suite.free_torch()
    shape, k, bs = tuple(sz["spell_shape"]), sz["spell_refs"], sz["spell_block"]
    d = int(np.prod(shape))
    steps, radius = sz["spell_steps"], sz["spell_radius"]
    chunks = 1
    while k % (chunks * 2) == 0 and k // chunks > 65536:
        chunks *= 2

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def references(key, k, d, chunks):  # (k, d) normal rows, drawn in chunks
        keys = jax.random.split(key, chunks)  # lax.map: one chunk's temporaries at a time
        return jax.lax.map(lambda kk: jax.random.normal(kk, (k // chunks, d)), keys).reshape(k, d)

    t0 = time.perf_counter()
    ref = references(jax.random.key(2), k, d, chunks).block_until_ready()
    # jitted: the finiteness check (a host copy) is skipped, temporaries fuse
    idx = jax.jit(build_index, static_argnames="block_size")(ref, block_size=bs)
    jax.block_until_ready(idx)
    del ref
    index_s = time.perf_counter() - t0

    sch = schedules.vp_linear()
    smp = samplers.ddim(sch, steps)
    den = DenseDummy(shape, sz["spell_depth"], jax.random.key(5))
    key = jax.random.key(0)
    rows = []
    for b in sz["spell_batches"]:
        if rows and time.perf_counter() > deadline:
            rows.append({"batch": b, "status": "skipped", "reason": "budget"})
            continue
        noise = jax.random.normal(jax.random.key(1), (b,) + shape)
        g = spell(radius, reference=idx, intra_batch=False, block_size=bs)
        left = max(1.0, (deadline - time.perf_counter()) / max(1, len(sz["spell_batches"])))
        res = time_terms(smp, sch, den, noise, key, {"with": g}, sz["rounds"], budget_s=left)
        base = res["step"]["without"]["median_s"]
        with_ = res["step"]["with"]["median_s"]
        term = res["alone"]["with"]["median_s"]
        row = {
            "batch": b,
            "status": "ok",
            "step_s_without": base,
            "step_s_with": with_,
            "times_step_without": _stats(res["step"]["without"]),
            "times_step_with": _stats(res["step"]["with"]),
            "spell_term_s": _stats(res["alone"]["with"]),
            "overhead_term_over_step": term / base,
            "overhead_end_to_end": with_ / base - 1.0,
            "first_calls_s": sum(res["first_call_s"].values()),
        }
        if "sd21_step_s" in suite.cache:
            row["term_over_sd21_512px_step"] = term / suite.cache["sd21_step_s"]
        rows.append(row)
    del idx
    return {
        "num_reference": k,
        "latent_shape": list(shape),
        "d": d,
        "reference_gb_float32": k * d * 4 / 1e9,
        "block_size": bs,
        "search": "exact (blockwise matmul candidates, exact pass on candidate blocks)",
        "radius": radius,
        "steps": steps,
        "denoiser": f"benchmarks.spell.DenseDummy: {sz['spell_depth']} dense {d}x{d} tanh "
                    "layers (a UNet-sized stand-in)",
        "index_build_s": index_s,
        "rows": rows,
        "note": "step = one DDIM step of the dummy denoiser; term_over_sd21_512px_step "
                "compares the term with one SD2.1 512 px CFG step of section 1 (batch 2)",
    }  # fmt: skip


FUNCTIONS = {name: globals()[name] for name in SECTIONS}


def _short(method: str) -> str:
    for long, short in (("unguided (CFG)", "cfg"), (" (sampling)", ""),
                        (" (optimisation, once per prompt)", " opt (once)"),
                        (" (pixel write-back)", "")):  # fmt: skip
        method = method.replace(long, short)
    return method


def summary(result: dict) -> list[str]:
    """One screen: a line or two per section."""
    env = result["environment"]
    lines = [f"gpu_suite ({'smoke' if result['smoke'] else 'full'}) on "
             f"{env['jax_device_kind']} / {env['torch_device_name'] or env['torch_device']}, "
             f"{result.get('elapsed_s', 0):.0f} s of {result['budget_s']:.0f} s"]  # fmt: skip
    for name, e in result["sections"].items():
        st = e["status"]
        head = f"{name:17s} {st:7s} {e.get('elapsed_s', 0):6.1f} s"
        if st == "error":
            lines.append(f"{head}  {e['error']['type']}: {e['error']['message'][:100]}")
            continue
        if st != "ok":
            lines.append(f"{head}  {e.get('reason', '')[:110]}")
            continue
        r = e["result"]
        if name == "sd21_generate":
            t = r["times"]
            s = f"{head}  jaxdiv {_fmt(t['jaxdiv'])}"
            if "diffusers" in t:
                s += (f"  diffusers {_fmt(t['diffusers'])}  diffusers/jaxdiv "
                      f"{r['diffusers_over_jaxdiv']:.2f}x")  # fmt: skip
            lines.append(s + f"  (compile {r['jax_compile_s']:.0f} s)")
        elif name == "methods_overhead":
            parts = [f"{_short(row['method'])} {row['ratio_to_unguided']:.2f}x"
                     for row in r["rows"]]  # fmt: skip
            lines.append(f"{head}  vs CFG: " + ", ".join(parts))
            if r["skipped"]:
                lines.append(f"{'':34s}skipped: {', '.join(r['skipped'])}")
            for m, err in r["errors"].items():
                lines.append(f"{'':34s}{m} failed: {err['type']}: {err['message'][:60]}")
        elif name == "sd3_step":
            t = r["times"]
            s = f"{head}  jaxdiv {_fmt(t['jaxdiv_bf16'], 1e3, 'ms')}"
            for peer in ("diffusers_bf16", "diffusers_fp16"):
                if peer in t:
                    s += f"  {peer} {_fmt(t[peer], 1e3, 'ms')}"
            lines.append(s)
            if "contextual_over_plain" in r:
                lines.append(f"{'':34s}contextual repulsion (M=100, every block) "
                             f"{r['contextual_over_plain']:.2f}x the plain forward")  # fmt: skip
        elif name == "spell_million":
            for row in r["rows"]:
                if row["status"] != "ok":
                    continue
                lines.append(f"{head}  K={r['num_reference']} B={row['batch']}: term "
                             f"{row['spell_term_s']['median_s'] * 1e3:.3g} ms, step "
                             f"{row['step_s_without'] * 1e3:.3g} -> "
                             f"{row['step_s_with'] * 1e3:.3g} ms")  # fmt: skip
    return lines


def _platform_version() -> str | None:
    """The JAX backend's platform version (CUDA / cuDNN / driver on a GPU), if it says."""
    try:
        from jax.extend import backend

        return str(backend.get_backend().platform_version)
    except Exception:  # noqa: BLE001 - informational only
        return None


def main(argv: list[str] | None = None, functions: dict | None = None) -> dict:
    """Parse arguments, run the sections, write the JSON; returns the written dict.

    ``functions`` overrides section functions by name (tests inject a failing one).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU test)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument(
        "--budget-s",
        type=float,
        default=450.0,
        help="overall time budget; sections skip work past their share",
    )
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3, smoke 1)")
    p.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "none", "xla", "cudnn", "blocked"),
        help="jaxdiv attention_implementation: auto (cudnn on GPU, with a "
        "fallback to XLA's on failure; default on CPU), none, xla, cudnn, blocked",
    )
    p.add_argument(
        "--compilation-cache",
        default=None,
        help="JAX persistent compilation cache folder (speeds up a rerun)",
    )
    p.add_argument("--out", default="results/benchmarks/gpu_suite.json")
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    args.argv = argv
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.compilation_cache:  # JAX's 1 s threshold: the suite's programs are large
        from jaxdiv import compilation_cache

        try:
            compilation_cache.enable(args.compilation_cache, min_compile_time_s=None)
        except ValueError as err:
            p.error(f"--compilation-cache: {err}")
    # smoke: the same programs, compiled without XLA's slow optimisation passes (CPU test)
    optimisations_off = jax.config.read("jax_disable_most_optimizations")
    if args.smoke:
        jax.config.update("jax_disable_most_optimizations", True)
    sections = [s for s in SECTIONS if s in args.sections]
    funcs = dict(FUNCTIONS, **(functions or {}))
    suite = Suite(args, sections)
    suite.write()
    # `timeout` (gpu_run.sh) sends SIGTERM: exit through the finally below, which writes
    # the summary and the last section's state
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for name in sections:
            suite.run_section(name, funcs[name])
    finally:
        suite.result["finished_utc"] = _utc()
        suite.result["summary"] = summary(suite.result)
        suite.write()
        suite.cache.clear()
        suite.tmp.cleanup()
        jax.config.update("jax_disable_most_optimizations", optimisations_off)
        signal.signal(signal.SIGTERM, previous_handler)
    print("\n".join(suite.result["summary"]))
    print(f"wrote {suite.out}", flush=True)
    return suite.result


if __name__ == "__main__":
    main()
