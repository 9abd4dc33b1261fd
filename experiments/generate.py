"""Prompts in, PNG images + a grid + metadata JSON out, from a local Stable Diffusion folder.

    python -m experiments.generate --model PATH --prompt "a photo of a cat" "a dog" \\
        --sampler ddim --steps 50 --cfg 7.5 --n 8 --seed 0 --out results/generate/cats

Writes, under ``--out``::

    images/p000_i0000.png   one PNG per (prompt, image index)
    grid.png                all images, one block of rows per prompt (8 per row)
    metadata.json           settings, model / schedule / sampler details, per-image records
                            and timings (load, first batch incl. compilation, later batches)

Image ``i`` of every prompt starts from the same noise, drawn from
``fold_in(key(seed), i)``; batches never mix prompts and always have ``--batch-size``
rows (the last one is padded), so an image depends only on the settings, its prompt and
its index -- never on ``--n`` or on which batches ran before. That makes the folder
**resumable**: rerunning the same command skips every batch whose PNGs exist (files are
written atomically, so a crash never leaves a half-written PNG), and rerunning with a
larger ``--n`` adds images; a smaller ``--n`` is refused (the folder's grid and metadata
would then describe fewer images than it holds). A folder holding a run with different
settings is refused.

Integrity (see README "Guarantees"; helpers in :mod:`experiments.run_folder`): a run
locks ``--out`` (``.run.lock``: pid and host; a second run into a folder in use fails, a
lock left by a killed run is taken over); ``metadata.json`` with the settings is written
before the first image, so a rerun of the same command always resumes; on resume every
finished PNG is checked (non-empty, complete, decodable, expected size) and damaged ones
are regenerated; an image with a NaN or inf anywhere (latents or decoded pixels) is never
written -- the run fails naming the image, the step where non-finite values first
appeared and the likely cause. Bad option values fail before the model loads, in one
line on stderr (exit 2); a failed run exits 1.

``--sampler ddim`` is DDIM (eta 0 by default) on the scheduler config's timestep spacing;
``--sampler edm`` is Karras Alg. 2 (Heun) on Karras noise levels, NFE ``2N - 1``;
``--sampler dpmpp_2m`` is DPM-Solver++(2M) as diffusers' ``DPMSolverMultistepScheduler``
(Karras noise levels unless ``--no-karras``, then the config's DPM timestep spacing);
``dpmpp_2m_sde`` / ``dpmpp_3m_sde`` are its SDE variants (eta 1) on the same grid;
``--sampler euler`` / ``euler_ancestral`` are diffusers' ``EulerDiscreteScheduler`` (Karras
noise levels as the config's ``use_karras_sigmas`` unless ``--karras`` / ``--no-karras``) and
``EulerAncestralDiscreteScheduler``; on SD3 ``--sampler flow_euler`` (the default) and
``flow_heun`` are diffusers' ``FlowMatchEulerDiscreteScheduler`` /
``FlowMatchHeunDiscreteScheduler`` on the folder's shifted grid. CFG
uses diffusers' convention (``--cfg 1`` switches it off; the empty or ``--negative-prompt``
embedding is the unconditional branch); ``--guidance-rescale PHI`` adds diffusers'
``guidance_rescale`` (``guidance.cfg(rescale=PHI)`` in the model's prediction space; with
``--method interval`` inside the interval, with ``--method tpso`` to TPSO's CFG).

``--method`` adds a diversity method to CFG (table in :mod:`jaxdiv.pipelines.generation`);
each method's knobs are flags named after it, defaulting to its paper's SD values, and a
knob flag of another method is refused:

* ``spell``: intra-batch SPELL on the latents, ``--spell-overcompensation 1.6``;
  ``--spell-radius auto`` (default) is App. D's median pairwise distance of the final
  latents of an unguided (CFG-only) batch -- each prompt's first batch, same noise and key
  -- computed once and recorded in ``metadata.json`` (``method_resolved``);
* ``particle``: PG in the paper's form (potential on ``x_t``, force added to the score);
  no published SD strength, so ``--pg-strength`` is required; ``--pg-time-scaling eps
  --pg-min-noise-level 1`` is PG's public SD code;
* ``cads``: noise on the text embedding (``--cads-noise-scale/-tau1/-tau2/-psi``);
* ``interval``: CFG with scale ``--cfg`` only for noise levels in
  ``(--interval-lo, --interval-hi]`` (SD-XL's 0.28, 5.42); ``--interval-rule step``
  decides once per step, as EDM2's official code does (matters with ``--sampler edm``);
* ``gass``: needs ``<model>/image_encoder`` and a CLIP text projection into its space
  (``--clip-projection FOLDER``, unless the text encoder has its own); paper defaults,
  Adam on the latent ``x0_hat`` through the VAE decoder;
* ``tpso``: ``--batch-size`` optimised variants of the prompt per batch (key from the
  seed, prompt and batch), cosines measured after ``--tpso-projection FOLDER`` (default:
  ``--clip-projection``, else the text encoder's own; ``none``: the pooled output); the
  negative CFG branch as in the public code: each image draws one of a pool of
  ``--tpso-null-pool 350`` optimised blank-prompt embeddings (built once per output
  folder, same kappa/lambda/projection, kept in ``tpso_null_pool.npz`` so a rerun reuses
  it; ``none``: the plain null embedding, the paper's text). On SD3 folders both CLIP
  encoders are optimised, each measured through its own projection (the projection flags
  are refused), with the public SD3.5 defaults: ``--tpso-lambda 10``,
  ``--tpso-max-steps 200``, a pool of 300 optimised with lambda 0;
* ``contextual``: contextual-space repulsion inside the MMDiT (SD3 folders only): the text
  stream after every joint block pushed apart ``--contextual-inner-steps 100`` times with
  scale ``--contextual-eta`` (required: the paper gives a range, 5e2 .. 5e6 on
  SD3.5-Large), during the first ``--contextual-tau 4`` steps.

The method and its knobs are settings: a folder made with other knobs is refused, and the
same command resumes byte-identically. So is ``--batch-size``: without the flag a rerun
takes the folder's (a larger ``--n`` then adds images to it). ``spell``, ``particle``,
``gass``, ``tpso`` and ``contextual`` couple the images of a batch: an image then depends
on its batch -- rows ``b * bs .. (b + 1) * bs - 1`` of its prompt, padding included, fixed
by the settings -- and a batch with a missing image is generated and written whole.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path

import numpy as np

from experiments import processes, run_folder
from experiments.common import progress_bar, quiet, say  # no jax: parsing stays fast
from experiments.run_folder import write_json

SAMPLERS = ("ddim", "edm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "euler", "euler_ancestral",
            "flow_euler", "flow_heun")
# pipeline kind -> (samplers it runs, default sampler, default --steps, default --cfg):
# diffusers' defaults for each (SD3: 28 FlowMatch Euler steps, guidance 7.0)
KINDS = {
    "sd": (SAMPLERS[:-2], "ddim", 50, 7.5),
    "sd3": (SAMPLERS[-2:], "flow_euler", 28, 7.0),
}
GRID_COLUMNS = 8
# Settings that change the pixels of an image: a folder made with other values is refused.
_RUN_KEYS = (
    "model",
    "prompts",
    "negative_prompt",
    "sampler",
    "steps",
    "cfg",
    "guidance_rescale",
    "eta",
    "s_churn",
    "karras",
    "seed",
    "height",
    "width",
    "batch_size",
    "dtype",
    "clip_skip",
    "method",
    "method_knobs",
    "clean_endpoint",
    "image_encoder",
)
# what a folder made before --method existed holds
_LEGACY = {"method": "none", "method_knobs": {}}


# method -> knobs a folder from before the knob's flag lacks, and the value that run used:
# TPSO's plain null before --tpso-null-pool, PG's paper form always on before
# --pg-time-scaling / --pg-min-noise-level, the per-evaluation rule before --interval-rule
_LEGACY_KNOBS = {
    "tpso": {"null_pool": "none"},
    "particle": {"time_scaling": "score", "min_noise_level": "none"},
    "interval": {"rule": "evaluation"},
}


def _legacy(old: dict, key: str):
    """A setting missing from an older metadata.json: what that version did."""
    if key == "clean_endpoint":  # DDIM grids ended at sigma = 0 before --clean-endpoint
        return True if old.get("sampler") == "ddim" else None
    return _LEGACY.get(key)


class RunError(ValueError):
    """A user-facing problem with the model folder, the output folder or the settings."""


class NonFiniteError(RuntimeError):
    """Sampling produced NaN or inf for some images; they were not written."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad value in one line on stderr (no usage block), exit 2,
    and takes no abbreviated flags (``--prompt`` is not a prefix of ``--prompts``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# run() called again in the same process (a notebook, the tests) reuses the loaded model
# and the guidance term, hence the compiled sampling program.
_LOADED: dict = {}
_TERMS: dict = {}
_KERNELS: dict = {}  # text projections loaded from folders


# ---------------------------------------------------------------------------------------
# --method: the diversity methods and their knobs (shared with experiments.sd_methods)

METHODS = ("none", "spell", "particle", "cads", "interval", "gass", "tpso", "contextual")
# methods whose images depend on the other images of their batch
COUPLED = ("spell", "particle", "gass", "tpso", "contextual")
# methods that run on one pipeline kind only (see KINDS), and why
ONLY_ON = {
    "contextual": ("sd3", "it acts inside an MMDiT's joint blocks"),
}
# method -> ((knob, flag, default, kind), ...); the defaults are each paper's for SD
# (PG publishes no SD strength: --pg-strength has none). ``--clip-projection`` is GASS's
# text projection and TPSO's unless ``--tpso-projection`` is given.
METHOD_KNOBS = {
    "none": (),
    "spell": (
        ("radius", "--spell-radius", "auto", "radius"),
        ("overcompensation", "--spell-overcompensation", 1.6, "positive"),
    ),
    "particle": (
        ("strength", "--pg-strength", None, "real"),
        ("time_scaling", "--pg-time-scaling", "score", "pg_scaling"),
        ("min_noise_level", "--pg-min-noise-level", "none", "level"),
    ),
    "cads": (
        ("noise_scale", "--cads-noise-scale", 0.25, "nonnegative"),
        ("tau1", "--cads-tau1", 0.6, "unit"),
        ("tau2", "--cads-tau2", 0.9, "unit"),
        ("psi", "--cads-psi", 1.0, "unit"),
    ),
    "interval": (
        ("sigma_lo", "--interval-lo", 0.28, "nonnegative"),
        ("sigma_hi", "--interval-hi", 5.42, "upper"),
        ("rule", "--interval-rule", "evaluation", "interval_rule"),
    ),
    "gass": (
        ("r_dep", "--gass-r-dep", 0.02, "nonnegative"),
        ("r_ind", "--gass-r-ind", 0.02, "nonnegative"),
        ("lr", "--gass-lr", 1e-4, "positive"),
        ("max_iters", "--gass-max-iters", 60, "count"),
        ("num_active", "--gass-num-active", 20, "count"),
        ("projection", "--clip-projection", None, "projection"),
    ),
    "tpso": (
        ("ratio", "--tpso-ratio", 0.4, "unit"),
        ("kappa", "--tpso-kappa", 0.8, "cosine"),
        ("diversity_weight", "--tpso-lambda", 1.0, "nonnegative"),
        ("max_steps", "--tpso-max-steps", 50, "count"),
        ("projection", "--tpso-projection", None, "projection"),
        ("null_pool", "--tpso-null-pool", 350, "pool"),
    ),
    # the paper gives a range per model (SD3.5-Large 5e2 .. 5e6), not one value
    "contextual": (
        ("eta", "--contextual-eta", None, "positive"),
        ("inner_steps", "--contextual-inner-steps", 100, "count"),
        ("tau", "--contextual-tau", 4, "count"),
    ),
}
# --gass-num-active's default, the paper's (guidance.gass's default too)
_GASS_NUM_ACTIVE = next(d for k, _, d, _ in METHOD_KNOBS["gass"] if k == "num_active")
# --interval-rule's values: guidance.interval(..., per_step=False / True)
INTERVAL_RULES = ("evaluation", "step")
KNOB_FLAGS = tuple(dict.fromkeys(f for knobs in METHOD_KNOBS.values() for _, f, _, _ in knobs))
# what each knob flag sets, and the paper's value (the default, where the paper gives one)
KNOB_HELP = {
    "--spell-radius": "SPELL's shield radius r; 'auto': App. D's median pairwise distance of "
                      "an unguided batch's final latents",
    "--spell-overcompensation": "SPELL's overcompensation lambda (1 exact; the paper uses 1.6 "
                                "for SD3 / LDM)",
    "--pg-strength": "particle guidance strength (required: the paper publishes no SD value)",
    "--pg-time-scaling": "particle guidance: 'score' (paper: the force added to the score), "
                         "'eps' (PG's public SD code: eps -= s (sigma/alpha) F) or 'x0'",
    "--pg-min-noise-level": "particle guidance off below this noise level sigma/alpha, or "
                            "'none' (paper: always on; PG's public SD code: 1)",
    "--cads-noise-scale": "CADS noise scale s (paper: 0.25)",
    "--cads-tau1": "CADS tau1: clean condition below it (paper: 0.6; some text-to-image "
                   "setups 0.3)",
    "--cads-tau2": "CADS tau2: pure noise above it (paper: 0.9; some text-to-image setups 0.8)",
    "--cads-psi": "CADS mixing psi of the rescaled and raw noisy condition (paper: 1)",
    "--interval-lo": "interval guidance: lowest guided noise level, exclusive (SD-XL: 0.28; "
                     "EDM2: 0.19)",
    "--interval-hi": "interval guidance: highest guided noise level, inclusive, or inf "
                     "(SD-XL: 5.42; EDM2: 1.61)",
    "--interval-rule": "interval guidance: 'evaluation' (the paper's text: each network "
                       "evaluation by its own noise level) or 'step' (EDM2's official code: "
                       "both of a Heun step's evaluations by the level where the step "
                       "starts); the two differ only with --sampler edm",
    "--gass-r-dep": "GASS target radius along the text direction e_t (paper: 0.02)",
    "--gass-r-ind": "GASS target radius along u_ind (paper: 0.02)",
    "--gass-lr": "GASS Adam learning rate on x0_hat (paper: 1e-4)",
    "--gass-max-iters": "GASS Adam iterations per active step, at most (paper: 60)",
    "--gass-num-active": "GASS active steps, evenly spread, at most --steps (paper: 20; "
                         "left at 20, every step with fewer --steps)",
    "--clip-projection": "CLIP text model folder whose text projection maps into the image "
                         "encoder's space (GASS; TPSO unless --tpso-projection; default: the "
                         "text encoder's own projection, where it has one)",
    "--tpso-ratio": "TPSO schedule ratio r: variants fade out over the first int(r N) steps "
                    "(paper: 0.4; 0.3 .. 0.5 recommended)",
    "--tpso-kappa": "TPSO target cosine to the prompt kappa (paper: 0.8)",
    "--tpso-lambda": "TPSO diversity weight lambda (paper: 1 for SD 1.5 / 2.1; SD3 folders: "
                     "10, SD3.5's)",
    "--tpso-max-steps": "TPSO RMSprop steps, at most (public code: 50 for SD 1.5 / 2.1; SD3 "
                        "folders: 200, SD3.5's)",
    "--tpso-projection": "TPSO's CLIP text projection folder, or 'none' for the pooled output "
                         "(default: --clip-projection, else the text encoder's own; SD 1.x/2.x "
                         "only: on SD3 each CLIP encoder's own)",
    "--tpso-null-pool": "TPSO negative branch: size of the pool of optimised blank-prompt "
                        "embeddings, or 'none' for the plain null embedding (public code: 350 "
                        "for SD 1.5 / 2.1; SD3 folders: 300, SD3.5's); the pool's own "
                        "optimisation takes at most 200 steps, as the public code's, whatever "
                        "--tpso-max-steps",
    "--contextual-eta": "contextual repulsion scale eta (required: the paper gives a range, "
                        "5e2 .. 5e6 on SD3.5-Large)",
    "--contextual-inner-steps": "contextual repulsion inner steps M (paper: 100 on SD3.5)",
    "--contextual-tau": "contextual repulsion: active for the first tau steps (paper: 4 on "
                        "SD3.5-Large)",
}


def knob_value(flag: str, text: str, kind: str):
    """One knob from its command-line text; ValueError with a one-line message."""
    if kind == "radius" and text == "auto":
        return "auto"
    if kind == "projection":
        if text == "none" and flag == "--tpso-projection":
            return "none"
        folder = Path(text)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{flag} {text!r} is not a CLIP text model folder (no config.json)")
        try:
            archs = json.loads((folder / "config.json").read_text()).get("architectures")
        except (OSError, ValueError, AttributeError):
            archs = None  # the loader reports an unreadable config
        if isinstance(archs, list) and archs and not any(
                isinstance(a, str) and ("WithProjection" in a or a == "CLIPModel")
                for a in archs):  # fmt: skip
            raise ValueError(f"{flag} {text!r} holds a {archs[0]} without a text projection "
                             "(needs CLIPTextModelWithProjection or CLIPModel)")  # fmt: skip
        return str(folder.resolve())
    if kind in ("pool", "level") and text == "none":
        return "none"
    if kind in ("pg_scaling", "interval_rule"):
        from jaxdiv.guidance.particle import TIME_SCALINGS

        choices = TIME_SCALINGS if kind == "pg_scaling" else INTERVAL_RULES
        if text not in choices:
            raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {text!r}")
        return text
    if kind in ("count", "pool"):
        try:
            value = int(text)
        except ValueError:
            what = " (or 'none')" if kind == "pool" else ""
            raise ValueError(f"{flag} must be an integer >= 1{what}, got {text!r}") from None
        if value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {value}")
        return value
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{flag} must be a number, got {text!r}") from None
    if kind == "upper" and value == math.inf:
        return "inf"  # metadata.json stays strict JSON
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {text}")
    bounds = {
        "radius": (value > 0, "> 0 (or 'auto')"),
        "positive": (value > 0, "> 0"),
        "nonnegative": (value >= 0, ">= 0"),
        "level": (value >= 0, ">= 0 (or 'none')"),
        "upper": (value >= 0, ">= 0 (or inf)"),
        "unit": (0 <= value <= 1, "in [0, 1]"),
        "cosine": (-1 < value < 1, "in (-1, 1)"),
        "real": (True, ""),
    }
    ok, need = bounds[kind]
    if not ok:
        raise ValueError(f"{flag} must be {need}, got {value:g}")
    return value


def _text_encoder_has_projection(model: str) -> bool:
    """Whether ``<model>/text_encoder`` is a CLIP text model with a ``text_projection``."""
    try:
        config = json.loads((Path(model) / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") if isinstance(config, dict) else None
    return any("WithProjection" in a for a in archs or () if isinstance(a, str))


def kind_defaults(method: str, kind: str) -> dict:
    """Knob defaults that differ on ``kind``'s folders from :data:`METHOD_KNOBS` (the SD
    1.x/2.x values): TPSO on SD3 takes the public SD3.5 configuration
    (:data:`jaxdiv.pipelines.tpso_sd3.DEFAULTS` and ``NULL_POOL_DEFAULTS``).

    Example:
        >>> kind_defaults("tpso", "sd3")
        {'diversity_weight': 10.0, 'max_steps': 200, 'null_pool': 300}
    """
    if (method, kind) != ("tpso", "sd3"):
        return {}
    from jaxdiv.pipelines.tpso_sd3 import DEFAULTS, NULL_POOL_DEFAULTS

    return {"diversity_weight": DEFAULTS["diversity_weight"], "max_steps": DEFAULTS["max_steps"],
            "null_pool": NULL_POOL_DEFAULTS["size"]}  # fmt: skip


def method_knobs(method: str, given: dict, model: str, batch_size: int | None = None,
                 image_encoder: bool | None = None,
                 batch_flag: str = "--batch-size") -> dict:  # fmt: skip
    """Check ``method``'s knobs and fill in the defaults, before any model loads.

    Args:
        method: one of :data:`METHODS`.
        given: flag -> text for the knob flags the user gave (``{"--spell-radius": "2"}``);
            a flag of another method is refused.
        model: the model folder (GASS needs ``image_encoder/`` in it; without
            ``--clip-projection`` GASS and TPSO need a text encoder with projection).
        batch_size: rows per batch; batch-coupled methods need >= 2 (PG >= 3).
        image_encoder: whether an image encoder will be loaded (``None``: whether
            ``<model>/image_encoder`` holds one).
        batch_flag: the flag that sets ``batch_size``, for the messages (``sd-methods``
            runs each prompt's ``--n`` images as one batch).

    Returns:
        ``{knob: value}``: numbers, ``"auto"`` for SPELL's radius, and for a projection
        an absolute folder, ``"text_encoder"`` (the model's own; on SD3 each CLIP
        encoder's own) or ``"none"`` (TPSO on the pooled output). Defaults are the SD
        1.x/2.x values of :data:`METHOD_KNOBS`, except where :func:`kind_defaults` gives
        the SD3 folder's.

    Raises:
        ValueError: with a one-line message naming the flag.

    Example:
        >>> method_knobs("cads", {"--cads-noise-scale": "0.1"}, "unused")
        {'noise_scale': 0.1, 'tau1': 0.6, 'tau2': 0.9, 'psi': 1.0}
    """
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    folder_kind = pipeline_kind(model)
    if method in ONLY_ON and folder_kind != ONLY_ON[method][0]:
        kind, why = ONLY_ON[method]
        what = "SD3 / SD3.5" if kind == "sd3" else "SD 1.x/2.x"
        raise ValueError(f"--method {method} runs on {what} folders only: {why}")
    own = {f for _, f, _, _ in METHOD_KNOBS[method]}
    own_projection = method == "tpso" and folder_kind == "sd3"
    if method == "tpso" and not own_projection:
        own.add("--clip-projection")
    if own_projection:
        for flag in ("--tpso-projection", "--clip-projection"):
            if flag in given:
                raise ValueError(f"{flag} applies to SD 1.x/2.x folders: on SD3 TPSO measures "
                                 "each CLIP encoder's band through that encoder's own "
                                 "text_projection")  # fmt: skip
    defaults = kind_defaults(method, folder_kind)
    for flag in given:
        if flag not in own:
            users = [m for m, ks in METHOD_KNOBS.items() if any(f == flag for _, f, _, _ in ks)]
            users += ["tpso"] * (flag == "--clip-projection")
            raise ValueError(f"{flag} applies to --method {' or '.join(users)} only, "
                             f"not to --method {method}")  # fmt: skip
    knobs = {}
    for knob, flag, default, kind in METHOD_KNOBS[method]:
        default = defaults.get(knob, default)
        text = given.get(flag)
        if text is None and flag == "--tpso-projection":
            text = given.get("--clip-projection")
        if text is not None:
            knobs[knob] = knob_value(flag, text, kind)
        elif own_projection and kind == "projection":
            knobs[knob] = "text_encoder"  # each CLIP encoder's own (tpso_sd3)
        elif kind == "projection":
            if not _text_encoder_has_projection(model):
                pooled = (", or --tpso-projection none to measure cosines on the pooled "
                          "output" if method == "tpso" else "")  # fmt: skip
                raise ValueError(
                    f"--method {method} needs {flag} PATH: a CLIP text model with projection "
                    "(e.g. openai/clip-vit-large-patch14 for SD 1.5, LAION CLIP-ViT-H-14 for "
                    f"SD 2.1), since the model's text encoder has no text_projection{pooled}"
                )
            knobs[knob] = "text_encoder"
        elif default is None:
            raise ValueError(f"--method {method} needs {flag} (no published default for SD)")
        else:
            knobs[knob] = default
    if method == "cads" and not knobs["tau1"] < knobs["tau2"]:
        raise ValueError(f"need --cads-tau1 < --cads-tau2, got {knobs['tau1']:g} and "
                         f"{knobs['tau2']:g}")  # fmt: skip
    if method == "interval" and not knobs["sigma_lo"] < float(knobs["sigma_hi"]):
        raise ValueError(f"need --interval-lo < --interval-hi, got {knobs['sigma_lo']:g} and "
                         f"{float(knobs['sigma_hi']):g}")  # fmt: skip
    if image_encoder is None:
        image_encoder = (Path(model) / "image_encoder" / "config.json").is_file()
    if method == "gass" and not image_encoder:
        raise ValueError(f"--method gass needs a CLIP image encoder in {model}/image_encoder "
                         "(CLIPVisionModelWithProjection)")  # fmt: skip
    pool = knobs.get("null_pool", "none")
    if batch_size is not None and pool != "none" and pool < batch_size:
        raise ValueError(f"--tpso-null-pool {pool} is smaller than {batch_flag} {batch_size}: "
                         "each image of a batch draws its own negative embedding")  # fmt: skip
    if batch_size is not None and method in COUPLED:
        least = 3 if method == "particle" else 2
        if batch_size < least:
            why = " (its median bandwidth needs 3 samples)" if method == "particle" else ""
            raise ValueError(f"--method {method} couples the images of a batch: it needs "
                             f"{batch_flag} >= {least}{why}, got {batch_size}")  # fmt: skip
    return knobs


def projection_kernel(pipe, spec: str):
    """The ``(D, P)`` text projection a knob names: a folder, ``"text_encoder"`` (the
    pipeline's own) or ``"none"`` (``False``: TPSO on the pooled output)."""
    from jaxdiv.pipelines import tpso

    if spec == "none":
        return False
    if spec == "text_encoder":
        if pipe.text_projection is None:
            raise RunError("the model's text encoder has no text_projection: pass "
                           "--clip-projection PATH")  # fmt: skip
        return pipe.text_projection
    if spec not in _KERNELS:
        try:
            _KERNELS[spec] = tpso.load_text_projection(spec)
        except (ValueError, TypeError, OSError) as err:
            raise RunError(f"cannot load the text projection {spec!r} ({err})") from err
    return _KERNELS[spec]


def tpso_null_pool(pipe, knobs: dict, key, path: Path, log=lambda msg: None):
    """TPSO's pool of optimised blank-prompt embeddings for the negative branch, loaded
    from ``path`` when an earlier run of the folder built it, else built and saved there
    atomically (``None`` for ``--tpso-null-pool none``)."""
    import jax
    import jax.numpy as jnp

    from jaxdiv.guidance.tpso import TPSOResult
    from jaxdiv.pipelines import generation, tpso
    from jaxdiv.pipelines.tpso_sd3 import ENCODERS, SD3TPSOResult

    if knobs["null_pool"] == "none":
        return None
    sd3 = generation.is_sd3(pipe)
    # what the pool depends on besides the model: a file made otherwise is rebuilt
    made_with = json.dumps({**knobs, "key": np.asarray(jax.random.key_data(key)).tolist()},
                           sort_keys=True)  # fmt: skip
    # an SD3 pool holds one TPSOResult per CLIP encoder: "clip_l.hidden", ...
    prefixes = [f"{name}." for name in ENCODERS] if sd3 else [""]
    if path.is_file():
        with np.load(path) as f:
            if "made_with" in f and str(f["made_with"]) == made_with:
                parts = [TPSOResult(*(jnp.asarray(f[p + name]) for name in TPSOResult._fields))
                         for p in prefixes]  # fmt: skip
                return SD3TPSOResult(*parts) if sd3 else parts[0]
    t0 = time.perf_counter()
    if sd3:  # the public SD3.5 protocol: each encoder's own projection, lambda 0
        projection, weight = None, None
    else:  # the public SD 1.5 / 2.1 protocol: the conditional kappa and lambda
        projection = projection_kernel(pipe, knobs["projection"])
        weight = knobs["diversity_weight"]
    pool = tpso.tpso_null_pool(pipe, key, size=knobs["null_pool"], projection=projection,
                               kappa=knobs["kappa"], diversity_weight=weight)  # fmt: skip
    parts = pool if sd3 else [pool]
    arrays = {p + name: np.asarray(v) for p, part in zip(prefixes, parts, strict=True)
              for name, v in part._asdict().items()}  # fmt: skip
    buf = io.BytesIO()
    np.savez(buf, made_with=np.asarray(made_with), **arrays)
    run_folder.atomic_write(path, buf.getvalue())
    steps = "/".join(str(int(part.steps)) for part in parts)
    log(f"--tpso-null-pool: {parts[0].hidden.shape[0]} blank-prompt embeddings optimised in "
        f"{time.perf_counter() - t0:.1f} s ({steps} steps, {int(np.sum(pool.converged))} in "
        f"the band); saved to {path}")  # fmt: skip
    return pool


def method_term(pipe, method: str, knobs: dict, *, cfg: float, null, cond, prompt: str,
                key, radius=None, text_emb=None, cfg_term=None, null_pool=None,
                rescale=None):  # fmt: skip
    """The guidance and the condition of one batch of ``prompt`` under ``method``.

    Condition terms (CADS) come before CFG, x0 terms (SPELL, PG, GASS) after it; interval
    guidance replaces CFG (windowed CFG with scale ``cfg``); TPSO optimises one variant
    per row of ``cond`` (key ``key``) and brings its own CFG.

    Args:
        pipe: the loaded pipeline.
        method, knobs: from :func:`method_knobs`.
        cfg: the CFG scale (1 = none).
        null: the unconditional embedding ``(1, L, D)``.
        cond: ``(B, L, D)`` the batch's prompt embedding.
        prompt: the batch's prompt (TPSO).
        key: PRNG key of TPSO's optimisation.
        radius: SPELL's radius (a number; resolve ``"auto"`` first).
        text_emb: GASS's ``(P,)`` text embedding (:func:`clip_text_embeddings`).
        cfg_term: a prebuilt ``generation.cfg_term(pipe, cfg, null, rescale)`` to reuse.
        null_pool: TPSO's negative-branch pool (:func:`tpso_null_pool`) or ``None``.
        rescale: the CFG rescale ``phi`` (``--guidance-rescale``) or ``None``: of CFG, of
            interval guidance inside its interval, of TPSO's CFG.

    Returns:
        ``(guidance or None, cond)``.
    """
    import jax

    from jaxdiv import guidance
    from jaxdiv.pipelines import generation, tpso

    if cfg_term is None and cfg != 1.0:
        cfg_term = generation.cfg_term(pipe, cfg, null, rescale)
    k = knobs
    scaled = generation.rescale_options(pipe, rescale)
    if method == "none":
        return cfg_term, cond
    if method == "interval":
        return guidance.interval(cfg, k["sigma_lo"], float(k["sigma_hi"]), null_cond=null,
                                 per_step=k["rule"] == "step", **scaled), cond  # fmt: skip
    if method == "tpso":
        # on SD3 each CLIP encoder's own projection (method_knobs refuses a folder there)
        sd3 = generation.is_sd3(pipe)
        projection = None if sd3 else projection_kernel(pipe, k["projection"])
        rows = jax.tree.leaves(cond)[0].shape[0]  # SD3's condition is an SD3Cond
        c = tpso.tpso_conditions(
            pipe, [prompt], rows, key, projection=projection, kappa=k["kappa"],
            diversity_weight=k["diversity_weight"], max_steps=k["max_steps"], null_pool=null_pool,
        )  # fmt: skip
        if cfg == 1.0:  # no CFG: the negative branch is never evaluated
            return guidance.tpso(c.optimized, k["ratio"], original=c.cond), c.cond
        return tpso.tpso_guidance(c, scale=cfg, ratio=k["ratio"], **scaled), c.cond
    if method == "cads":
        term = guidance.cads(tau1=k["tau1"], tau2=k["tau2"], noise_scale=k["noise_scale"],
                             psi=k["psi"])  # fmt: skip
        return (term if cfg_term is None else guidance.chain(cads=term, cfg=cfg_term)), cond
    if method == "spell":
        term = guidance.spell(radius, intra_batch=True, overcompensation=k["overcompensation"])
    elif method == "particle":
        floor = None if k["min_noise_level"] == "none" else k["min_noise_level"]
        term = guidance.particle(k["strength"], time_scaling=k["time_scaling"],
                                 min_noise_level=floor)  # fmt: skip
    elif method == "contextual":
        term = guidance.contextual(k["eta"], k["inner_steps"], tau=k["tau"])
    elif method == "gass":
        # the paper's 20 goes in as gass's own default, which means every step on a sampler
        # of fewer steps; another value must fit the sampler (parse_args checks --steps)
        active = {} if k["num_active"] == _GASS_NUM_ACTIVE else {"num_active": k["num_active"]}
        term = guidance.gass(generation.gass_encoder(pipe), text_emb, r_dep=k["r_dep"],
                             r_ind=k["r_ind"], lr=k["lr"], max_iters=k["max_iters"],
                             **active)  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r}")
    return (term if cfg_term is None else guidance.chain(cfg=cfg_term, **{method: term})), cond


def log_truncated(pipe, prompts, negative_prompt: str = "", say=None) -> None:
    """Log each prompt a text encoder cuts (:func:`jaxdiv.pipelines.generation.
    truncated_prompts`): the dropped words never reach the model."""
    from jaxdiv.pipelines.generation import truncated_prompts

    say = log if say is None else say
    texts = list(prompts) + ([negative_prompt] if negative_prompt else [])
    for j, encoder, tokens, kept in truncated_prompts(pipe, texts):
        what = f"prompt {j + 1}" if j < len(prompts) else "the negative prompt"
        say(f"{what} has {tokens} {encoder} tokens; it reads the first {kept} (BOS and EOS "
            "included) and drops the rest, as diffusers does")  # fmt: skip


def pipeline_kind(model: str) -> str:
    """``"sd3"`` for a ``StableDiffusion3Pipeline`` folder, else ``"sd"`` (SD 1.x/2.x; the
    loader reports a folder that is neither)."""
    try:
        index = json.loads((Path(model) / "model_index.json").read_text())
    except (OSError, ValueError):
        return "sd"
    name = index.get("_class_name", "") if isinstance(index, dict) else ""
    return "sd3" if isinstance(name, str) and name.startswith("StableDiffusion3") else "sd"


def load_pipeline(model: str, dtype: str = "float32", allow_pickle: bool = False,
                  clip_skip: int | None = None, image_encoder=None):  # fmt: skip
    """Load a pipeline (SD 1.x/2.x or SD3, by the folder's ``model_index.json``), or reuse
    the one loaded last with the same arguments (one model in memory; a reused pipeline
    reuses its compiled programs)."""
    import jax.numpy as jnp

    from jaxdiv.pipelines import stable_diffusion, stable_diffusion_3

    key = (str(Path(model).resolve()), dtype, allow_pickle, clip_skip, image_encoder)
    if key not in _LOADED:
        _LOADED.clear()  # keep at most one model in memory
        kw = dict(dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
                  allow_pickle=allow_pickle, clip_skip=clip_skip)  # fmt: skip
        loader = stable_diffusion_3 if pipeline_kind(model) == "sd3" else stable_diffusion
        _LOADED[key] = loader.load(model, image_encoder=image_encoder, **kw)
    return _LOADED[key]


# the prefix of progress lines: "generate", or "generate 1/2" for process 1 of a job of 2
_PREFIX = ["generate"]


def log(msg: str) -> None:
    """Print a progress line prefixed with ``[generate]`` (``[generate i/N]`` in process
    ``i`` of a job of ``N``; above the progress bar when one is drawn; nothing with
    ``--quiet``)."""
    say(_PREFIX[0], msg)


def parse_args(argv=None, prog: str = "python -m experiments.generate") -> argparse.Namespace:
    """Parse and check the command line; a bad value exits 2 with one line on stderr,
    before anything is loaded (``--steps`` is checked against the model's scheduler config).
    ``prog`` names the command in messages (``jaxdiv generate`` from the console script).
    """
    p = _OneLineParser(
        prog=prog,
        description="Generate images with a local Stable Diffusion folder (diffusers format). "
        "Resumable: rerunning the same command skips the images already in --out.",
    )
    p.add_argument("--model", required=True,
                   help="diffusers Stable Diffusion folder (SD 1.x/2.x or SD3; required)")
    p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts (required)")
    p.add_argument("--negative-prompt", default="",
                   help="prompt of CFG's unconditional branch (default: empty, the empty "
                        "prompt's embedding)")  # fmt: skip
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="default: ddim (SD 1.x/2.x), flow_euler (SD3, which also runs "
                        "flow_heun)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps N (default: 50; SD3 28, diffusers' defaults)")
    p.add_argument("--cfg", type=float, default=None,
                   help="CFG scale w in diffusers' convention, 1 = no guidance (default: 7.5; "
                        "SD3 7.0, diffusers' defaults)")  # fmt: skip
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="CFG rescale phi in [0, 1] (Lin et al. 2024, diffusers' "
                        "guidance_rescale; 0.7 suggested), in the model's prediction space "
                        "(default: none)")  # fmt: skip
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta in [0, 1], 0 = deterministic, 1 = DDPM-like (ddim only; "
                        "default: 0)")  # fmt: skip
    p.add_argument(
        "--clean-endpoint",
        action="store_true",
        default=None,
        help="ddim only: end the grid at sigma = 0 (the output is the last guided x0_hat, "
        "as SPELL's guarantee needs) instead of diffusers' last step to alphas_cumprod[0] "
        "(default: off)",
    )
    p.add_argument("--s-churn", type=float, default=None,
                   help="EDM S_churn, 0 = no churn (edm only; default: 0)")
    p.add_argument(
        "--karras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Karras noise levels (dpmpp_* and euler only; default: on for dpmpp_*, the "
        "scheduler config's use_karras_sigmas for euler, as diffusers' EulerDiscreteScheduler)",
    )
    p.add_argument("--n", type=int, default=8, help="images per prompt (default: 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise and the sampler's key (default: 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: min(n, 4))")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: the model's sample size)")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels (default: the model's sample size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and activations (default: float32)")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="skip the last N CLIP text layers, as diffusers (default: none)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin weights (default: safetensors only)")
    p.add_argument("--image-encoder", default=None,
                   help="CLIP vision tower folder for --method gass (default: "
                        "<model>/image_encoder; released SD3 folders have none)")  # fmt: skip
    p.add_argument("--method", choices=METHODS, default="none",
                   help="diversity method, composed with CFG (default: none; see "
                        "`jaxdiv methods`)")  # fmt: skip
    add_knob_flags(p, "method knobs (each for its --method; defaults: the papers')")
    p.add_argument("--out", default=None,
                   help="output folder (default: results/generate/<slug of the first prompt>_"
                        "<sampler><steps>_cfg<cfg>_seed<seed>[_rescale<phi>][_<method>])")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no progress messages; errors only (default: a "
                        "bar on a terminal, one line per batch otherwise)")  # fmt: skip
    processes.add_flags(p)
    args = p.parse_args(argv)
    processes.from_args(args, p.error)
    args.kind = pipeline_kind(args.model)
    runs, default_sampler, default_steps, default_cfg = KINDS[args.kind]
    if args.sampler is None:
        args.sampler = default_sampler
    elif args.sampler not in runs:
        what = "SD3 (a rectified flow)" if args.kind == "sd3" else "SD 1.x/2.x folders"
        p.error(f"--sampler {args.sampler} does not apply to {what}; choose from "
                f"{', '.join(runs)}")  # fmt: skip
    # a sampler's own flag given with another sampler could never take effect
    for flag, dest, default, owners in _SAMPLER_FLAGS:
        value = getattr(args, dest)
        if value is not None and args.sampler not in owners:
            p.error(f"{flag} applies to --sampler {' / '.join(owners)} only, not to --sampler "
                    f"{args.sampler}")  # fmt: skip
        if value is None:
            setattr(args, dest, default.get(args.sampler) if isinstance(default, dict) else default)
    if args.sampler == "euler" and args.karras is None:
        args.karras = (_scheduler_config(args.model) or {}).get("use_karras_sigmas") is True
    args.steps = default_steps if args.steps is None else args.steps
    args.cfg = default_cfg if args.cfg is None else args.cfg
    for name in ("steps", "n", "batch_size", "height", "width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("cfg", "eta", "s_churn"):
        v = getattr(args, name)
        if not math.isfinite(v):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    for name in ("eta", "s_churn"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name):g}")
    if args.eta > 1:
        p.error(f"--eta must be <= 1 (above 1 DDIM's step noise exceeds the next noise "
                f"level), got {args.eta:g}")  # fmt: skip
    problem = seed_problem(args.seed)
    if problem:
        p.error(problem)
    if args.clip_skip is not None and args.clip_skip < 0:
        p.error(f"--clip-skip must be >= 0, got {args.clip_skip}")
    layers = _text_encoder_layers(args.model)
    if args.clip_skip is not None and layers is not None and args.clip_skip >= layers:
        p.error(f"--clip-skip must be < {layers}, the text encoder's number of layers "
                f"(its config.json), got {args.clip_skip}")  # fmt: skip
    limit = _schedule_length(args.model)
    if limit is not None and args.steps > limit:
        p.error(
            f"--steps {args.steps} is beyond the model's schedule ({limit} training timesteps "
            "in scheduler/scheduler_config.json)"
        )
    if any(not s.strip() for s in args.prompt):
        p.error("--prompt: prompts must be non-empty")
    if args.negative_prompt and args.cfg == 1.0:
        p.error("--negative-prompt has no effect with --cfg 1 (no unconditional branch)")
    problem = rescale_problem(args.guidance_rescale, args.cfg)
    if problem:
        p.error(problem)
    if args.method == "interval" and args.cfg == 1.0:
        p.error("--method interval with --cfg 1 guides nowhere: interval guidance is CFG at "
                "scale --cfg inside the interval and the conditional model (scale 1) outside")
    if args.negative_prompt and args.method == "tpso":
        p.error("--negative-prompt does not apply to --method tpso: its negative branch is "
                "the pool of optimised blank prompts (--tpso-null-pool), or the empty "
                "prompt's embedding with --tpso-null-pool none")  # fmt: skip
    # a defaulted batch size gives way to an earlier run's in --out (images depend on it)
    args.batch_size_given = args.batch_size is not None
    if args.batch_size is None:
        args.batch_size = min(args.n, 4)
    given = given_knobs(args)
    if args.image_encoder is not None:
        if args.method != "gass":
            p.error(f"--image-encoder applies to --method gass only, not to --method "
                    f"{args.method}")  # fmt: skip
        if not (Path(args.image_encoder) / "config.json").is_file():
            p.error(f"--image-encoder {args.image_encoder!r} is not a model folder (no "
                    "config.json)")  # fmt: skip
        args.image_encoder = str(Path(args.image_encoder).resolve())
    try:  # a defaulted batch size is min(n, 4): the flag to raise is then --n
        args.method_knobs = method_knobs(args.method, given, args.model, args.batch_size,
                                         args.image_encoder is not None or None,
                                         batch_flag="--batch-size" if args.batch_size_given
                                         else "--n")  # fmt: skip
    except ValueError as err:
        p.error(str(err))
    # more GASS steps than sampler steps could never take effect: refused here, where the
    # number of steps is known (jaxdiv.sample would refuse it only after the model load);
    # the default, the paper's 20, means every step on a shorter sampler (method_term)
    if args.method == "gass" and "--gass-num-active" in given:
        problem = num_active_problem(args.method_knobs["num_active"], args.steps)
        if problem:
            p.error(problem)
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", args.prompt[0].lower()).strip("-")[:40] or "prompt"
        args.out = (
            f"results/generate/{slug}_{args.sampler}{args.steps}_cfg{args.cfg:g}_seed{args.seed}"
        )
        if args.guidance_rescale is not None:
            args.out += f"_rescale{args.guidance_rescale:g}"
        if args.method != "none":
            args.out += f"_{args.method}"
    args._parser = p
    return args


# flags of one sampler family: (flag, attribute, default, the samplers it applies to)
_DPMPP = tuple(s for s in SAMPLERS if s.startswith("dpmpp"))
_KARRAS = (*_DPMPP, "euler")
_SAMPLER_FLAGS = (
    ("--eta", "eta", 0.0, ("ddim",)),
    ("--clean-endpoint", "clean_endpoint", False, ("ddim",)),
    ("--s-churn", "s_churn", 0.0, ("edm",)),
    # the default per sampler: Karras levels for DPM-Solver++; for Euler the scheduler
    # config's use_karras_sigmas (parse_args reads it), as diffusers' EulerDiscreteScheduler
    ("--karras / --no-karras", "karras", {**dict.fromkeys(_DPMPP, True), "euler": None}, _KARRAS),
)


def _dest(flag: str) -> str:
    """argparse's attribute name of a flag (``--spell-radius`` -> ``spell_radius``)."""
    return flag.lstrip("-").replace("-", "_")


def seed_problem(seed: int) -> str | None:
    """Why ``--seed`` cannot be used, or ``None``: ``jax.random.key`` takes a 64-bit
    integer, and the images fold indices into the key (never into the integer).

    >>> seed_problem(0) is None, seed_problem(-1)
    (True, '--seed must be an integer in [0, 2**63), got -1')
    """
    return None if 0 <= seed < 2**63 else f"--seed must be an integer in [0, 2**63), got {seed}"


def rescale_problem(rescale, cfg: float) -> str | None:
    """Why ``--guidance-rescale`` cannot run with ``--cfg``, or ``None``: a value outside
    [0, 1], or CFG off.

    >>> rescale_problem(0.7, 7.5) is None, rescale_problem(0.7, 1.0).split(" (")[0]
    (True, '--guidance-rescale has no effect with --cfg 1')
    """
    if rescale is None:
        return None
    if not 0 <= rescale <= 1:  # NaN fails too
        return f"--guidance-rescale must be in [0, 1], got {rescale}"
    if cfg == 1.0:
        return ("--guidance-rescale has no effect with --cfg 1 (the guided prediction is the "
                "conditional one, already at its own scale)")  # fmt: skip
    return None


def num_active_problem(active: int, steps: int) -> str | None:
    """Why an explicit ``--gass-num-active`` can never take effect with ``--steps``, or
    ``None`` (GASS acts at most once per sampler step).

    >>> num_active_problem(20, 50) is None, num_active_problem(20, 10).split(":")[0]
    (True, '--gass-num-active 20 exceeds --steps 10')
    """
    if active > steps:
        return (f"--gass-num-active {active} exceeds --steps {steps}: GASS acts at most once "
                "per step, so the setting could never take effect; pass --gass-num-active "
                f"{steps} or fewer")  # fmt: skip
    return None


def add_knob_flags(parser: argparse.ArgumentParser, title: str) -> None:
    """Add every method's knob flags (:data:`METHOD_KNOBS`) not already in ``parser``,
    defaulting to ``None`` (= the method's default), with the default in the help."""
    group = parser.add_argument_group(title)
    for flag in KNOB_FLAGS:
        if flag in parser._option_string_actions:
            continue
        default = next(d for ks in METHOD_KNOBS.values() for _, f, d, _ in ks if f == flag)
        methods = [m for m, ks in METHOD_KNOBS.items() if any(f == flag for _, f, _, _ in ks)]
        methods += ["tpso"] * (flag == "--clip-projection")  # TPSO's unless --tpso-projection
        text = KNOB_HELP.get(flag, flag.lstrip("-"))
        if default is not None:
            text += f" (default: {default})"
        group.add_argument(flag, default=None, metavar="VALUE",
                           help=f"[{'/'.join(methods)}] {text}")  # fmt: skip


def given_knobs(args: argparse.Namespace) -> dict:
    """``{flag: text}`` of the knob flags given on the command line."""
    return {f: getattr(args, _dest(f)) for f in KNOB_FLAGS if getattr(args, _dest(f)) is not None}


def _scheduler_config(model: str) -> dict | None:
    """The model's ``scheduler/scheduler_config.json``, or None when it cannot be read
    (the loader reports that)."""
    try:
        config = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _text_encoder_layers(model: str) -> int | None:
    """``num_hidden_layers`` of ``<model>/text_encoder/config.json``, or None when it
    cannot be read (the loader reports that)."""
    try:
        config = json.loads((Path(model) / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
    return layers if isinstance(layers, int) else None


def _schedule_length(model: str) -> int | None:
    """``num_train_timesteps`` of the model's scheduler config (diffusers' default 1000),
    or None when the file cannot be read."""
    T = (_scheduler_config(model) or {}).get("num_train_timesteps", 1000)
    return T if isinstance(T, int) and not isinstance(T, bool) else None


def image_size_problem(model: str, height: int | None, width: int | None) -> str | None:
    """Why ``--height`` / ``--width`` cannot run on the model, read from its ``config.json``
    files alone (the multiple of :func:`jaxdiv.pipelines.stable_diffusion.size_multiple` /
    :func:`jaxdiv.pipelines.stable_diffusion_3.size_multiple`), or None; also None where
    the files cannot be read (the loader then reports that)."""
    sizes = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if not sizes:
        return None
    from jaxdiv import validation
    from jaxdiv.models.checkpoint import read_config
    from jaxdiv.pipelines import stable_diffusion, stable_diffusion_3

    root, sd3 = Path(model), pipeline_kind(model) == "sd3"
    try:
        if sd3:
            multiple = stable_diffusion_3.size_multiple(read_config(root / "transformer"),
                                                        read_config(root / "vae"))  # fmt: skip
        else:
            multiple = stable_diffusion.size_multiple(read_config(root / "unet"),
                                                      read_config(root / "vae"))  # fmt: skip
    except (OSError, ValueError, TypeError):  # CheckpointError is a ValueError
        return None
    try:
        validation.image_sizes(multiple, **sizes)
    except ValueError as err:
        part = "MMDiT" if sd3 else "UNet"
        return f"--{err} (the multiple comes from this model's {part} and VAE configs)"
    return None


def save_png_atomic(array_hwc_uint8: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (:func:`experiments.run_folder.atomic_write`)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array_hwc_uint8).save(buf, format="PNG")
    run_folder.atomic_write(path, buf.getvalue())


def image_name(prompt_index: int, image_index: int) -> str:
    """File name of an image, e.g. ``p001_i0002.png`` for prompt 1, image 2."""
    return f"p{prompt_index:03d}_i{image_index:04d}.png"


def write_grid(out: Path, files: list[list[Path]]) -> Path:
    """One block of rows per prompt, ``GRID_COLUMNS`` images per row."""
    from PIL import Image

    first = Image.open(files[0][0])
    w, h = first.size
    cols = min(GRID_COLUMNS, max(len(f) for f in files))
    rows_per_prompt = [math.ceil(len(f) / cols) for f in files]
    grid = Image.new("RGB", (cols * w, sum(rows_per_prompt) * h), "white")
    row = 0
    for prompt_files, nrows in zip(files, rows_per_prompt, strict=True):
        for k, f in enumerate(prompt_files):
            try:
                with Image.open(f) as im:
                    grid.paste(im.convert("RGB"), ((k % cols) * w, (row + k // cols) * h))
            except (OSError, ValueError, SyntaxError) as err:
                raise RunError(f"cannot read {str(f)!r} for the grid ({err})") from err
        row += nrows
    path = out / "grid.png"
    save_png_atomic(np.asarray(grid), path)
    return path


def check_existing(out: Path, settings: dict, skip: tuple = ()) -> dict | None:
    """Previous metadata of this folder; refuse a folder made with other settings.

    ``skip`` names settings not known yet (the default image size before the model loads).
    """
    meta_path = out / "metadata.json"
    if not meta_path.is_file():
        if (out / "images").is_dir() and any((out / "images").glob("*.png")):
            raise RunError(
                f"--out {str(out)!r} holds images but no metadata.json; refusing to mix runs "
                "(choose another --out or delete the folder)"
            )
        return None
    try:
        meta = json.loads(meta_path.read_text())
        old = meta["settings"]
    except (ValueError, KeyError) as err:
        raise RunError(f"--out {str(out)!r}: unreadable metadata.json ({err})") from err
    knobs = old.get("method_knobs")
    if isinstance(knobs, dict):  # knobs added since: what the older version did
        old = {**old, "method_knobs": {**_LEGACY_KNOBS.get(old.get("method"), {}), **knobs}}
    diffs = [
        f"{k}: {old.get(k, _legacy(old, k))!r} -> {settings[k]!r}"
        for k in _RUN_KEYS
        if k not in skip and old.get(k, _legacy(old, k)) != settings[k]
    ]
    if diffs:
        raise RunError(
            f"--out {str(out)!r} holds a run with different settings ({'; '.join(diffs)}); "
            "choose another --out or delete the folder"
        )
    return meta


def _recorded_n(meta: dict, n_prompts: int) -> int | None:
    """The ``--n`` of the run recorded in ``meta`` (an earlier ``metadata.json``): its
    ``n``, written before the first image, or, in a folder from before ``n`` was recorded,
    the length of its finished image list per prompt; ``None`` where neither is there."""
    n = meta.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n >= 1:
        return n
    listed = meta.get("images")
    if isinstance(listed, list) and listed and n_prompts:
        return len(listed) // n_prompts
    return None


def _earlier_batch_size(out: Path) -> int | None:
    """The ``batch_size`` setting of the run recorded in ``out/metadata.json``, if any
    (:func:`check_existing` reports an unreadable file)."""
    try:
        size = json.loads((out / "metadata.json").read_text())["settings"]["batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


def _runs_of(meta: dict) -> list:
    """Timings and counts of the runs recorded in an earlier metadata.json (resume history)."""
    this = {
        k: meta.get(k) for k in ("timings_s", "generated_this_run", "skipped_this_run", "device")
    }
    if "processes" in meta:  # a job of several processes: theirs
        this["processes"] = meta["processes"]
    return list(meta.get("previous_runs", [])) + [this]


def _verify_images(files: list[list[Path]], size: tuple | None) -> int:
    """Check every existing image of ``files`` (:func:`run_folder.check_png`); delete and
    report the damaged ones so they are generated again. Returns the number of good ones."""
    good, damaged = 0, []
    for f in (f for row in files for f in row):
        if not f.exists():
            continue
        problem = run_folder.check_png(f, size)
        if problem is None:
            good += 1
        else:
            damaged.append(f"{f.parent.name}/{f.name} ({problem})")
            f.unlink()
    if damaged:
        log(f"{len(damaged)} damaged images, generating them again: {', '.join(damaged)}")
    return good


def _non_finite_weights(pipe) -> list[str]:
    """Names of the pipeline's parameters holding NaN or inf (empty when all are finite)."""
    import jax

    found = []
    model = "transformer" if hasattr(pipe, "flow_euler") else "unet"
    parts = ((model, "denoiser"), ("vae", "decode"), ("text_encoders", "encode_prompt"))
    for component, attr in parts:
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(pipe, attr)):
            if not hasattr(leaf, "dtype") or not jax.numpy.issubdtype(leaf.dtype, np.floating):
                continue
            if not np.isfinite(np.asarray(leaf, np.float32)).all():
                found.append(f"{component}{jax.tree_util.keystr(path)}")
    return found


def _non_finite_report(args, pipe, names, rerun_traced, latents_bad) -> str:
    """Where NaN / inf first appeared for the rows of ``names`` and the likely cause."""
    n_steps = args.steps
    if not latents_bad:
        where = "in the VAE decoder (the final latents are finite)"
    else:
        trace, rows = rerun_traced()
        x = np.asarray(trace.x, np.float32)[:, rows].reshape(len(trace.t), -1)
        x0_hat = np.asarray(trace.x0_hat, np.float32)[:, rows].reshape(len(trace.t), -1)
        t = np.asarray(trace.t, np.float32)
        where = f"in the last update (step {n_steps}/{n_steps})"
        for k in range(len(t)):
            if not np.isfinite(x[k]).all():
                where = (
                    "in the initial noise"
                    if k == 0
                    else f"in the sampler update of step {k}/{n_steps} (t = {t[k - 1]:g})"
                )
                break
            if not np.isfinite(x0_hat[k]).all():
                where = f"in the guided prediction x0_hat at step {k + 1}/{n_steps} (t = {t[k]:g})"
                break
    return (
        f"non-finite values (NaN or inf) in {', '.join(names)}, not written: they first "
        f"appeared {where}; likely cause: {_likely_cause(args, pipe)}"
    )


def _likely_cause(args, pipe) -> str:
    """The likely reasons for NaN / inf in a run: non-finite weights, a huge --cfg, bf16."""
    causes = []
    weights = _non_finite_weights(pipe)
    if weights:
        more = f" and {len(weights) - 3} more" if len(weights) > 3 else ""
        causes.append(f"non-finite weights in the model folder ({', '.join(weights[:3])}{more})")
    if args.cfg != 1 and abs(args.cfg) > 50:
        causes.append(f"--cfg {args.cfg:g} is so large that the guided prediction overflows")
    if args.dtype == "bfloat16":
        causes.append("an overflow in bfloat16 (try --dtype float32)")
    if not causes:
        causes.append("an overflow in the model at that step (check the weights and --cfg)")
    return "; ".join(causes)


# the flags every process of a job must share (they decide the images and the folder)
_JOB_KEYS = ("model", "prompt", "negative_prompt", "sampler", "steps", "cfg",
             "guidance_rescale", "eta",
             "clean_endpoint", "s_churn", "karras", "n", "seed", "batch_size", "height",
             "width", "dtype", "clip_skip", "allow_pickle", "method", "method_knobs",
             "image_encoder")  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    """Generate (or resume) the images; returns the metadata written to ``metadata.json``.

    Holds ``--out``'s :class:`~experiments.run_folder.FolderLock` for the whole run. In a
    job of several processes (``args.processes``, :mod:`experiments.processes`) this joins
    ``jax.distributed`` first, each process holds its own lock of ``--out`` and generates
    its share of the batches; process 0 writes the settings before any image and the grid
    and the final metadata once every image exists.
    """
    procs = getattr(args, "processes", None) or processes.SINGLE
    # from the config files: before the output folder exists and the (slow) model load
    size_problem = image_size_problem(args.model, args.height, args.width)
    if size_problem:
        raise RunError(size_problem)
    try:
        processes.initialize(procs)
    except ValueError as err:
        raise RunError(str(err)) from None
    lock, why = processes.lock_output(args.out, procs)
    failure = None if why is None else RunError(why)
    if failure is not None and not procs.multi:
        raise failure
    job = {k: getattr(args, k, None) for k in _JOB_KEYS}
    job["model"], job["out"] = str(Path(args.model).resolve()), str(Path(args.out).resolve())
    reason = processes.agree(procs, failure is None, processes.fingerprint(job))
    if failure is not None or reason is not None:
        lock.release()
        raise failure or RunError(reason)
    if procs.multi:
        _PREFIX[0] = f"generate {procs.index}/{procs.num}"
    try:
        with quiet(getattr(args, "quiet", False)):
            if lock.stale_owner:
                pid, host = lock.stale_owner.get("pid"), lock.stale_owner.get("host")
                log(f"took over the lock of an earlier run that is gone (pid {pid} on {host})")
            return _run_locked(args, procs)
    finally:
        _PREFIX[0] = "generate"
        lock.release()


def clip_text_embeddings(pipe, prompts, projection):
    """Per-prompt CLIP text embeddings ``(len(prompts), P)`` in the image encoder's space
    (GASS's ``e_t``; SPP and CLIP score): :func:`jaxdiv.pipelines.generation.
    clip_text_embeddings` through the projection a knob names (:func:`projection_kernel`);
    RunError naming ``--clip-projection`` when it does not fit."""
    from jaxdiv.pipelines import generation

    if generation.is_sd3(pipe) and projection != "text_encoder":
        raise RunError("--clip-projection is not supported with SD3 folders: their CLIP-L "
                       "text encoder has its own projection (pair it with the image "
                       "encoder of the same CLIP, ViT-L/14)")  # fmt: skip
    own = projection == "text_encoder"
    kernel = None if generation.is_sd3(pipe) else projection_kernel(pipe, projection)
    try:
        return generation.clip_text_embeddings(pipe, prompts, None if own else kernel)
    except ValueError as err:
        raise RunError(str(err) if own else f"--clip-projection: {err}") from None


PROGRESS_DIR = "progress"  # per-process progress files of a multi-process job
# what a run writes into --out (besides metadata.json, hidden temporaries and the lock)
RUN_FILES = ("images", "grid.png", PROGRESS_DIR, "tpso_null_pool.npz")


def _run_locked(args: argparse.Namespace, procs: processes.Processes = processes.SINGLE) -> dict:
    """The body of :func:`run`, with ``--out`` locked (by every process of the job).

    Several processes: process ``i`` generates the batches ``k`` (prompt-major order)
    with ``k % N == i``. Process 0 alone removes temp files and writes ``metadata.json``
    (the settings, before the barrier after which the others write images), the grid and
    the final metadata (after the barrier where every share is done); each process
    records its own progress in ``progress/process-<i>.json``. SPELL's automatic radii are
    computed by the processes in turn (prompt ``j`` by process ``j % N``) and gathered, so
    every process uses the same values. Every collective below is reached by every process
    in the same order, whatever the state of the folder.
    """
    import jax
    import jax.numpy as jnp

    import jaxdiv
    from jaxdiv import guidance, recipes
    from jaxdiv.guidance.base import check_windows
    from jaxdiv.pipelines import generation

    out = Path(args.out)
    multi, lead = procs.multi, procs.lead
    earlier = _earlier_batch_size(out)
    if not getattr(args, "batch_size_given", True) and earlier not in (None, args.batch_size):
        log(f"--batch-size {earlier}: the batch size {out} was made with (not given; the "
            f"default min(n, 4) would be {args.batch_size})")  # fmt: skip
        args.batch_size = earlier
    if lead:  # the other processes of a job write nothing before the "settings" barrier
        leftovers = run_folder.remove_temporaries(out) + run_folder.remove_temporaries(
            out / "images") + run_folder.remove_temporaries(out / PROGRESS_DIR)  # fmt: skip
        if leftovers:
            log(f"removed {len(leftovers)} partial files of an interrupted run")
    settings = {
        "model": str(Path(args.model).resolve()),
        "prompts": list(args.prompt),
        "negative_prompt": args.negative_prompt,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "guidance_rescale": args.guidance_rescale,
        "eta": args.eta if args.sampler == "ddim" else None,
        "s_churn": args.s_churn if args.sampler == "edm" else None,
        "karras": args.karras if args.sampler in _KARRAS else None,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "clip_skip": args.clip_skip,
        "method": args.method,
        "method_knobs": args.method_knobs,
        "clean_endpoint": args.clean_endpoint if args.sampler == "ddim" else None,
        "image_encoder": args.image_encoder,  # None: the model folder's own
    }
    unknown = tuple(k for k in ("height", "width") if settings[k] is None)
    try:  # not into a model folder or another command's output
        run_folder.refuse_foreign(out, "metadata.json", RUN_FILES, "generate")
    except run_folder.FolderError as err:
        raise RunError(f"--out {err}") from None
    previous = check_existing(out, settings, skip=unknown)  # before the (slow) model load
    had = None if previous is None else _recorded_n(previous, len(args.prompt))
    if had is not None and args.n < had:
        # a larger --n adds images; a smaller one would rewrite the grid and metadata of a
        # folder whose other images stay on disk (the image list and the grid disagreed)
        raise RunError(
            f"--out {str(out)!r} holds a run with --n {had}, got --n {args.n}: a rerun can "
            "add images, not drop them (its grid and metadata would leave out images the "
            f"folder holds); rerun with --n {had} or more, or choose another --out (an "
            f"image does not depend on --n: the first {args.n} per prompt here are already "
            f"those of --n {args.n})"
        )
    files = [
        [out / "images" / image_name(j, i) for i in range(args.n)] for j in range(len(args.prompt))
    ]
    bs = args.batch_size
    n_batches = math.ceil(args.n / bs)
    jobs = [(j, b) for j in range(len(args.prompt)) for b in range(n_batches)]
    mine = processes.share(jobs, procs)  # every job for a single process
    # this process's images (all of them for a single process)
    my_files = [files[j][i] for j, b in mine for i in range(b * bs, min((b + 1) * bs, args.n))]
    if previous is not None:
        old = previous["settings"]
        size = (old["width"], old["height"]) if old.get("width") and old.get("height") else None
        _verify_images([my_files], size)
    finished = previous is not None and all(f.is_file() for f in my_files)
    if processes.all_true(procs, finished):
        # nothing to generate: no need to load the model
        if lead:
            grid = write_grid(out, files)
            log(f"all {args.n * len(args.prompt)} images already in {out / 'images'}; wrote "
                f"{grid}")  # fmt: skip
            total = args.n * len(args.prompt)
            if not isinstance(previous.get("images"), list) or "grid" not in previous:
                # killed after its last image but before its final metadata: finish it now
                previous = _finish_metadata(dict(previous), args, grid, 0, total)
                write_json(out / "metadata.json", previous)
                _remove_progress(out)
            else:
                # the counters describe this run (the image list, what the folder holds)
                counts = {"generated_this_run": 0, "skipped_this_run": total}
                if any(previous.get(k) != v for k, v in counts.items()):
                    previous = {**previous, **counts}
                    write_json(out / "metadata.json", previous)
        processes.barrier(procs, "jaxdiv-generate-finished")
        return previous

    t0 = time.perf_counter()
    pipe_key = (settings["model"], args.dtype, args.allow_pickle, args.clip_skip,
                args.image_encoder)  # fmt: skip
    try:
        pipe = load_pipeline(args.model, args.dtype, args.allow_pickle, args.clip_skip,
                             args.image_encoder)  # fmt: skip
        load_s = time.perf_counter() - t0
        shape = pipe.noise_shape(bs, args.height, args.width)
    # CheckpointError is a ValueError; a wrongly typed config value is a TypeError
    except (ValueError, TypeError) as err:
        raise RunError(str(err)) from err
    height, width = shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor
    settings["height"], settings["width"] = height, width
    check_existing(out, settings)  # again, now that the default size is known
    log(
        f"loaded {args.model} in {load_s:.1f} s ({getattr(pipe, 'prediction_type', 'flow')}, "
        f"{pipe.schedule.name}, {height}x{width}, latents {shape[1:]})"
    )
    log_truncated(pipe, args.prompt, args.negative_prompt)

    if args.sampler == "flow_euler":
        sampler = pipe.flow_euler(args.steps)
    elif args.sampler == "ddim":
        sampler = pipe.ddim(args.steps, eta=args.eta, clean_endpoint=args.clean_endpoint)
    elif args.sampler == "edm":
        sampler = pipe.edm(args.steps, s_churn=args.s_churn)
    else:
        try:
            kw = {"karras": args.karras} if args.sampler in _KARRAS else {}
            sampler = getattr(pipe, args.sampler)(args.steps, **kw)
        except ValueError as err:  # e.g. more steps than the config's spacing allows
            raise RunError(str(err)) from err
    null = generation.null_condition(pipe, args.negative_prompt)
    # knobs that would never act on this model and sampler (an interval outside its noise
    # levels, a TPSO ratio scheduling no step): refused now, before any folder is written
    k = args.method_knobs
    probes = {"interval": lambda: guidance.interval(
                  args.cfg, k["sigma_lo"], float(k["sigma_hi"]), null_cond=null,
                  per_step=k["rule"] == "step"),
              "tpso": lambda: guidance.tpso(jnp.zeros((1,)), k["ratio"])}  # fmt: skip
    probe = probes.get(args.method)
    if probe is not None:
        try:
            check_windows(guidance.as_terms(probe()), sampler)
        except ValueError as err:
            raise RunError(f"--method {args.method}: {err}") from err
    term = None
    if args.cfg != 1.0:
        # the same term object for the same settings: jaxdiv.sample then reuses its program
        term_key = (pipe_key, args.cfg, args.negative_prompt, args.guidance_rescale)
        if term_key not in _TERMS:
            _TERMS[term_key] = generation.cfg_term(pipe, args.cfg, null, args.guidance_rescale)
        term = _TERMS[term_key]
    prompt_emb = pipe.encode_prompt(pipe.tokenize(args.prompt))
    texts = [(f"--prompt {p!r}", jax.tree.map(lambda e, j=j: e[j], prompt_emb))
             for j, p in enumerate(args.prompt)]  # fmt: skip
    if term is not None:
        texts.append((f"--negative-prompt {args.negative_prompt!r}", null))
    bad_texts = [name for name, e in texts
                 if not all(np.isfinite(np.asarray(x, np.float32)).all()
                            for x in jax.tree.leaves(e))]  # fmt: skip
    if bad_texts:
        raise NonFiniteError(
            f"non-finite values (NaN or inf) in the text encoder's embedding of "
            f"{', '.join(bad_texts)}; no image written; likely cause: {_likely_cause(args, pipe)}"
        )

    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    root_key = jax.random.key(args.seed)
    # the whole run's images, and this process's (the same for a single process)
    total_all = len(args.prompt) * args.n
    done_all = sum(f.is_file() for row in files for f in row)
    total, done = len(my_files), sum(f.is_file() for f in my_files)
    if done:
        what = f"of this process's {total}" if multi else f"/{total}"
        log(f"resuming: {done}{' ' * multi}{what} images already in {img_dir}")
    batch_times, generated, skipped = [], 0, 0

    def batch_noise(b):  # pipe.generate's noise and keys: the same images for the same seed
        return generation.image_noise(root_key, jnp.arange(b * bs, (b + 1) * bs), shape[1:])

    def batch_key(j, b):
        return generation.sampling_key(root_key, j, b)

    def prompt_cond(j):
        return jax.tree.map(lambda e: jnp.broadcast_to(e[j : j + 1], (bs,) + e.shape[1:]),
                            prompt_emb)  # fmt: skip

    method, knobs = args.method, args.method_knobs
    coupled = method in COUPLED
    # values derived from the settings (SPELL's auto radius): kept from an earlier run
    resolved = dict((previous or {}).get("method_resolved", {}))
    text_embs, null_pool = None, None
    # a job's process 0 builds TPSO's pool before the others start; they read it back
    if method == "tpso" and args.cfg != 1.0 and lead and done_all < total_all:
        null_pool = tpso_null_pool(pipe, knobs, jax.random.fold_in(root_key, 3_000_017),
                                   out / "tpso_null_pool.npz", log)  # fmt: skip
    if method == "gass":
        text_embs = clip_text_embeddings(pipe, args.prompt, knobs["projection"])

    def spell_radius(j):
        if knobs["radius"] != "auto":
            return knobs["radius"]
        radii = resolved.setdefault("spell_radius", {})
        if str(j) not in radii:
            # App. D: the median pairwise distance of an unguided (CFG-only) batch's final
            # latents; here the prompt's first batch (same noise and key as its images)
            r = recipes.radius_from_unguided(sampler, pipe.denoiser, batch_noise(0),
                                             key=batch_key(j, 0), cond=prompt_cond(j),
                                             guidance=term)  # fmt: skip
            if not (math.isfinite(r) and r > 0):
                raise NonFiniteError(
                    f"--spell-radius auto: the unguided first batch of --prompt "
                    f"{args.prompt[j]!r} gave a median pairwise distance of {r!r} (need a "
                    f"finite value > 0); pass --spell-radius VALUE; likely cause: "
                    f"{_likely_cause(args, pipe)}"
                )
            radii[str(j)] = r
            log(f"--spell-radius auto for prompt {j + 1}: {r:.6g}")
            if not multi:  # a job records the radii once they are gathered
                write_json(out / "metadata.json", meta)
        return radii[str(j)]

    meta = {
        "settings": settings,
        "n": args.n,  # images per prompt: a rerun may raise it, never lower it
        "pipeline": {
            "prediction_type": getattr(pipe, "prediction_type", "flow"),
            "schedule": pipe.schedule.name,
            "grid_kwargs": getattr(pipe, "grid_kwargs", {}),
            "latent_shape": list(shape[1:]),
            "vae_scale_factor": pipe.vae_scale_factor,
        },
        "sampler": {"name": sampler.name, "nfe": sampler.nfe, "times": sampler.times.tolist()},
        "versions": {"jaxdiv": jaxdiv.__version__, "jax": jax.__version__},
        "device": str(jax.local_devices()[0]),
        "noise": "image i of every prompt: normal(fold_in(key(seed), i), latent_shape)",
        "timings_s": {"load": load_s, "batches": batch_times},
        "previous_runs": [] if previous is None else _runs_of(previous),
        "images_done": done,
        "method": {
            "name": method,
            "knobs": knobs,
            "coupling": (
                "per batch: an image depends on its batch (rows b * batch_size .. "
                "(b + 1) * batch_size - 1 of its prompt, padding included); a batch is "
                "generated and written whole"
                if coupled
                else "none: an image depends only on the settings, its prompt and its index"
            ),
        },
        "method_resolved": resolved,
    }
    if multi:
        meta["images_done"] = done_all
        meta["processes"] = {"num_processes": procs.num, "coordinator": procs.coordinator,
                             "share": "process i generates the batches k (prompt-major) "
                                      "with k % num_processes == i"}  # fmt: skip
    # the settings reach the disk before the first image: a rerun of this command resumes
    if lead:
        write_json(out / "metadata.json", meta)
    processes.barrier(procs, "jaxdiv-generate-settings")
    if multi and not lead:
        check_existing(out, settings)  # process 0's metadata.json: the same settings
        if method == "tpso" and args.cfg != 1.0 and done < total:
            null_pool = tpso_null_pool(pipe, knobs, jax.random.fold_in(root_key, 3_000_017),
                                       out / "tpso_null_pool.npz", log)  # fmt: skip
    if multi and method == "spell" and knobs["radius"] == "auto":
        _share_spell_radii(procs, resolved, len(args.prompt), spell_radius)
        if lead:
            write_json(out / "metadata.json", meta)
    progress_file = out / PROGRESS_DIR / f"process-{procs.index}.json"
    record = {"process_id": procs.index, "num_processes": procs.num, "pid": os.getpid(),
              "host": socket.gethostname(), "device": str(jax.local_devices()[0]),
              "batches": len(mine), "images": total, "images_done": done,
              "timings_s": {"load": load_s, "batches": batch_times}}  # fmt: skip

    def save_progress(done):
        if multi:
            record["images_done"] = done
            record.update(generated_this_run=generated, skipped_this_run=skipped)
            write_json(progress_file, record)
        else:
            meta["images_done"] = done
            write_json(out / "metadata.json", meta)

    # a bar on a terminal (images, rate, time left); else the one-line messages below
    bar = progress_bar(total=total, initial=done, desc="generate", unit="img")
    try:
        for k, (j, b) in enumerate(mine):
            idx = list(range(b * bs, (b + 1) * bs))
            wanted = [i for i in idx if i < args.n]
            missing = [i for i in wanted if not (img_dir / image_name(j, i)).is_file()]
            if not missing:
                skipped += len(wanted)
                continue
            radius = spell_radius(j) if method == "spell" else None
            t1 = time.perf_counter()
            noise, key_b = batch_noise(b), batch_key(j, b)
            tpso_key = jax.random.fold_in(jax.random.fold_in(root_key, 2_000_003 + j), b)
            try:
                g, cond = method_term(
                    pipe, method, knobs, cfg=args.cfg, null=null, cond=prompt_cond(j),
                    prompt=args.prompt[j], key=tpso_key, radius=radius, cfg_term=term,
                    text_emb=None if text_embs is None else text_embs[j], null_pool=null_pool,
                    rescale=args.guidance_rescale,
                )  # fmt: skip
            except (ValueError, TypeError) as err:
                raise RunError(f"--method {method}: {err}") from err
            result = jaxdiv.sample(sampler, pipe.denoiser, noise, key=key_b, cond=cond, guidance=g)
            # a coupled method's batch is written whole: its images always come from one run
            to_write = wanted if coupled else missing
            decoded = np.asarray(pipe.decode(result.x0), np.float32)
            latents = np.asarray(result.x0, np.float32)
            finite_lat = np.isfinite(latents.reshape(bs, -1)).all(axis=1)
            finite = finite_lat & np.isfinite(decoded.reshape(bs, -1)).all(axis=1)
            pixels = generation.to_uint8(np.where(np.isfinite(decoded), decoded, 0.0))
            bad = [i for i in to_write if not finite[i - b * bs]]
            for i in to_write:
                if finite[i - b * bs]:  # never an image from NaN / inf
                    save_png_atomic(pixels[i - b * bs], img_dir / image_name(j, i))
            if bad:
                rows = [i - b * bs for i in bad]

                def rerun_traced(noise=noise, cond=cond, key_b=key_b, g=g, rows=rows):
                    traced = jaxdiv.sample(sampler, pipe.denoiser, noise, key=key_b, cond=cond,
                                           guidance=g, trace=True)  # fmt: skip
                    return traced.trace, rows

                save_progress(done + len([i for i in missing if i not in bad]))
                names = [f"images/{image_name(j, i)}" for i in bad]
                raise NonFiniteError(
                    _non_finite_report(args, pipe, names, rerun_traced, not finite_lat[rows].all())
                )
            dt = time.perf_counter() - t1
            batch_times.append(dt)
            generated += len(missing)
            skipped += len(wanted) - len(missing)  # a batch cut short by a kill: its survivors
            done += len(missing)
            left = len(mine) - k - 1
            note = (" (includes compilation)" if len(batch_times) == 1
                    else f", ETA <= {dt * left:.0f} s" if left else "")  # fmt: skip
            bar.set_postfix_str(f"prompt {j + 1}/{len(args.prompt)} batch {b + 1}/{n_batches}",
                                refresh=False)  # fmt: skip
            bar.update(len(missing))
            if bar.disable:  # no bar (not a terminal): one line per batch
                log(
                    f"prompt {j + 1}/{len(args.prompt)} batch {b + 1}/{n_batches}: "
                    f"{len(missing)} image{'s' * (len(missing) != 1)} in {dt:.1f} s{note}; "
                    f"{done}/{total} done"
                )
            save_progress(done)
    finally:
        bar.close()

    if multi:
        save_progress(done)
        processes.barrier(procs, "jaxdiv-generate-generated")  # every share is done
        if not lead:
            processes.barrier(procs, "jaxdiv-generate-finished")
            return json.loads((out / "metadata.json").read_text())
        _merge_progress(out, meta, procs, files)
    grid = write_grid(out, files)
    if multi:
        generated = sum(r.get("generated_this_run", 0) for r in meta["processes"]["runs"])
        skipped = sum(r.get("skipped_this_run", 0) for r in meta["processes"]["runs"])
    meta = _finish_metadata(meta, args, grid, generated, skipped)
    write_json(out / "metadata.json", meta)
    if multi:
        _remove_progress(out)
    log(f"wrote {grid} and {out / 'metadata.json'} ({generated} new, {skipped} skipped)")
    processes.barrier(procs, "jaxdiv-generate-finished")
    return meta


def _finish_metadata(meta: dict, args, grid: Path, generated: int, skipped: int) -> dict:
    """``meta`` of a finished run: the image list, every image done, the grid and this
    run's counters (what ``evaluate`` reads as a finished folder)."""
    meta["images"] = [
        {"file": f"images/{image_name(j, i)}", "prompt_index": j, "prompt": p, "image_index": i}
        for j, p in enumerate(args.prompt)
        for i in range(args.n)
    ]
    meta["images_done"] = len(meta["images"])
    meta["generated_this_run"] = generated
    meta["skipped_this_run"] = skipped
    meta["grid"] = grid.name
    return meta


def _remove_progress(out: Path) -> None:
    """The per-process progress files of a finished job (and their folder, if empty)."""
    for f in sorted((out / PROGRESS_DIR).glob("process-*.json")):
        f.unlink(missing_ok=True)
    try:
        (out / PROGRESS_DIR).rmdir()
    except OSError:  # absent, or not empty: files that are not ours
        pass


def _share_spell_radii(procs, resolved: dict, n_prompts: int, spell_radius) -> None:
    """SPELL's automatic radius of every prompt, the same in every process of a job:
    prompt ``j`` lacking one is computed by process ``j % N`` (:func:`spell_radius`), and
    the values are gathered (as exact float64 bytes) into ``resolved``."""
    radii = resolved.setdefault("spell_radius", {})
    values = np.full(n_prompts, np.nan)
    for j in range(n_prompts):
        if str(j) in radii:
            values[j] = radii[str(j)]
        elif j % procs.num == procs.index:
            values[j] = spell_radius(j)
    got = processes.gather(procs, values)
    for j in range(n_prompts):
        finite = [float(v) for v in got[:, j] if np.isfinite(v)]
        if not finite or len(set(finite)) != 1:
            raise RunError(f"--spell-radius auto: the processes disagree on prompt {j}'s "
                           f"radius ({finite})")  # fmt: skip
        radii[str(j)] = finite[0]


def _merge_progress(out: Path, meta: dict, procs, files) -> None:
    """Process 0, once every share is done: the progress files of the job's processes
    into ``meta["processes"]["runs"]``; RunError when an image is still missing."""
    runs = []
    for i in range(procs.num):
        try:
            runs.append(json.loads((out / PROGRESS_DIR / f"process-{i}.json").read_text()))
        except (OSError, ValueError):
            runs.append({"process_id": i, "note": "no progress file"})
    meta["processes"]["runs"] = runs
    missing = [f"images/{f.name}" for row in files for f in row if not f.is_file()]
    if missing:
        raise RunError(f"{len(missing)} images are missing after every process finished "
                       f"(e.g. {missing[0]})")  # fmt: skip


def main(argv=None, prog: str = "python -m experiments.generate") -> int:
    """Run the command line; returns 0, or exits with 2 for refused inputs (bad values, a
    folder in use or holding other settings) and returns 1 for a failed run (non-finite
    values, a write error), each with one line on stderr."""
    args = parse_args(argv, prog)
    try:
        run(args)
    except RunError as err:
        _fail(args, str(err), 2)
    except NonFiniteError as err:
        return _fail(args, str(err), 1)
    except OSError as err:  # disk full, permissions changed mid-run, ...
        return _fail(args, f"{err} (finished images are kept; rerun the same command to "
                           "resume)", 1)  # fmt: skip
    return 0


def _fail(args, message: str, code: int) -> int:
    procs = getattr(args, "processes", None) or processes.SINGLE
    return processes.fail(procs, args._parser, message, code)


if __name__ == "__main__":
    sys.exit(main())
