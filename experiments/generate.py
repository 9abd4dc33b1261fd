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
larger ``--n`` adds images. A folder holding a run with different settings is refused.

``--sampler ddim`` is DDIM (eta 0 by default) on the scheduler config's timestep spacing;
``--sampler edm`` is Karras Alg. 2 (Heun) on Karras noise levels, NFE ``2N - 1``;
``--sampler dpmpp_2m`` is DPM-Solver++(2M) as diffusers' ``DPMSolverMultistepScheduler``
(Karras noise levels unless ``--no-karras``, then the config's DPM timestep spacing). CFG
uses diffusers' convention (``--cfg 1`` switches it off; the empty or ``--negative-prompt``
embedding is the unconditional branch).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.common import write_json

SAMPLERS = ("ddim", "edm", "dpmpp_2m")
GRID_COLUMNS = 8
# Settings that change the pixels of an image: a folder made with other values is refused.
_RUN_KEYS = (
    "model",
    "prompts",
    "negative_prompt",
    "sampler",
    "steps",
    "cfg",
    "eta",
    "s_churn",
    "karras",
    "seed",
    "height",
    "width",
    "batch_size",
    "dtype",
    "clip_skip",
)


class RunError(ValueError):
    """A user-facing problem with the model folder, the output folder or the settings."""


# run() called again in the same process (a notebook, the tests) reuses the loaded model
# and the guidance term, hence the compiled sampling program.
_LOADED: dict = {}
_TERMS: dict = {}


def log(msg: str) -> None:
    print(f"[generate] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.generate",
        description="Generate images with a local Stable Diffusion folder (diffusers format).",
    )
    p.add_argument("--model", required=True, help="diffusers Stable Diffusion folder")
    p.add_argument("--prompt", required=True, nargs="+", help="one or more prompts")
    p.add_argument("--negative-prompt", default="", help="unconditional prompt for CFG")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampler steps N")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale (1 = no guidance)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ddim only)")
    p.add_argument("--s-churn", type=float, default=0.0, help="EDM S_churn (edm only)")
    p.add_argument(
        "--karras",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Karras noise levels (dpmpp_2m only; default on)",
    )
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="default: min(n, 4)")
    p.add_argument("--height", type=int, default=None, help="default: the UNet's sample size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights")
    p.add_argument("--out", default=None, help="output folder (default: results/generate/<slug>)")
    args = p.parse_args(argv)
    for name in ("steps", "n", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.eta < 0 or args.s_churn < 0:
        p.error("--eta and --s-churn must be >= 0")
    if any(not s.strip() for s in args.prompt):
        p.error("--prompt: prompts must be non-empty")
    if args.batch_size is None:
        args.batch_size = min(args.n, 4)
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", args.prompt[0].lower()).strip("-")[:40] or "prompt"
        args.out = (
            f"results/generate/{slug}_{args.sampler}{args.steps}_cfg{args.cfg:g}_seed{args.seed}"
        )
    args._parser = p
    return args


def save_png_atomic(array_hwc_uint8: np.ndarray, path: Path) -> None:
    """Write a PNG through a temp file in the same folder and an atomic rename."""
    from PIL import Image

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(array_hwc_uint8).save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_uint8(images_nchw) -> np.ndarray:
    """``[-1, 1]`` NCHW floats -> uint8 NHWC, as diffusers' image postprocessor."""
    x = np.asarray(images_nchw, np.float32).transpose(0, 2, 3, 1)
    return (np.clip(x / 2 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)


def image_name(prompt_index: int, image_index: int) -> str:
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
            with Image.open(f) as im:
                grid.paste(im.convert("RGB"), ((k % cols) * w, (row + k // cols) * h))
        row += nrows
    path = out / "grid.png"
    save_png_atomic(np.asarray(grid), path)
    return path


def check_existing(out: Path, settings: dict, skip: tuple = ()) -> dict | None:
    """Previous metadata of this folder; refuse a folder made with other settings.

    ``skip`` names settings not known yet (the default image size before the model loads).
    """
    import json

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
    diffs = [
        f"{k}: {old.get(k)!r} -> {settings[k]!r}"
        for k in _RUN_KEYS
        if k not in skip and old.get(k) != settings[k]
    ]
    if diffs:
        raise RunError(
            f"--out {str(out)!r} holds a run with different settings ({'; '.join(diffs)}); "
            "choose another --out or delete the folder"
        )
    return meta


def _runs_of(meta: dict) -> list:
    """Timings and counts of the runs recorded in an earlier metadata.json (resume history)."""
    this = {
        k: meta.get(k) for k in ("timings_s", "generated_this_run", "skipped_this_run", "device")
    }
    return list(meta.get("previous_runs", [])) + [this]


def run(args: argparse.Namespace) -> dict:
    """Generate (or resume) the images; returns the metadata written to ``metadata.json``."""
    import jax
    import jax.numpy as jnp

    import jaxdiv
    from jaxdiv import guidance
    from jaxdiv.pipelines import stable_diffusion

    out = Path(args.out)
    settings = {
        "model": str(Path(args.model).resolve()),
        "prompts": list(args.prompt),
        "negative_prompt": args.negative_prompt,
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "eta": args.eta if args.sampler == "ddim" else None,
        "s_churn": args.s_churn if args.sampler == "edm" else None,
        "karras": args.karras if args.sampler == "dpmpp_2m" else None,
        "seed": args.seed,
        "height": args.height,
        "width": args.width,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "clip_skip": args.clip_skip,
    }
    unknown = tuple(k for k in ("height", "width") if settings[k] is None)
    previous = check_existing(out, settings, skip=unknown)  # before the (slow) model load
    files = [
        [out / "images" / image_name(j, i) for i in range(args.n)] for j in range(len(args.prompt))
    ]
    if previous is not None and all(f.is_file() for row in files for f in row):
        # nothing to generate: no need to load the model
        grid = write_grid(out, files)
        log(f"all {args.n * len(args.prompt)} images already in {out / 'images'}; wrote {grid}")
        return previous

    t0 = time.perf_counter()
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    pipe_key = (settings["model"], args.dtype, args.allow_pickle, args.clip_skip)
    try:
        if pipe_key not in _LOADED:
            _LOADED.clear()  # keep at most one model in memory
            _LOADED[pipe_key] = stable_diffusion.load(
                args.model, dtype=dtype, allow_pickle=args.allow_pickle, clip_skip=args.clip_skip
            )
        pipe = _LOADED[pipe_key]
        load_s = time.perf_counter() - t0
        bs = args.batch_size
        shape = pipe.noise_shape(bs, args.height, args.width)
    # CheckpointError is a ValueError; a wrongly typed config value is a TypeError
    except (ValueError, TypeError) as err:
        raise RunError(str(err)) from err
    height, width = shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor
    settings["height"], settings["width"] = height, width
    check_existing(out, settings)  # again, now that the default size is known
    log(
        f"loaded {args.model} in {load_s:.1f} s ({pipe.prediction_type}, "
        f"{pipe.schedule.name}, {height}x{width}, latents {shape[1:]})"
    )

    if args.sampler == "ddim":
        sampler = pipe.ddim(args.steps, eta=args.eta)
    elif args.sampler == "edm":
        sampler = pipe.edm(args.steps, s_churn=args.s_churn)
    else:
        try:
            sampler = pipe.dpmpp_2m(args.steps, karras=args.karras)
        except ValueError as err:  # e.g. more steps than the config's spacing allows
            raise RunError(str(err)) from err
    if args.negative_prompt:  # diffusers encodes negative prompts without clip_skip
        null = pipe.encode_prompt(pipe.tokenize([args.negative_prompt]), clip_skip=None)
    else:
        null = pipe.null_cond
    term = None
    if args.cfg != 1.0:
        # the same term object for the same settings: jaxdiv.sample then reuses its program
        term_key = (pipe_key, args.cfg, args.negative_prompt)
        if term_key not in _TERMS:
            _TERMS[term_key] = guidance.cfg(args.cfg, null_cond=null)
        term = _TERMS[term_key]
    prompt_emb = pipe.encode_prompt(pipe.tokenize(args.prompt))

    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    root_key = jax.random.key(args.seed)
    n_batches = math.ceil(args.n / bs)
    jobs = [(j, b) for j in range(len(args.prompt)) for b in range(n_batches)]
    total = len(args.prompt) * args.n
    done = sum(
        (img_dir / image_name(j, i)).is_file()
        for j in range(len(args.prompt))
        for i in range(args.n)
    )
    if done:
        log(f"resuming: {done}/{total} images already in {img_dir}")
    batch_times, generated, skipped = [], 0, 0
    meta = {
        "settings": settings,
        "pipeline": {
            "prediction_type": pipe.prediction_type,
            "schedule": pipe.schedule.name,
            "grid_kwargs": pipe.grid_kwargs,
            "latent_shape": list(shape[1:]),
            "vae_scale_factor": pipe.vae_scale_factor,
        },
        "sampler": {"name": sampler.name, "nfe": sampler.nfe, "times": sampler.times.tolist()},
        "versions": {"jaxdiv": jaxdiv.__version__, "jax": jax.__version__},
        "device": str(jax.devices()[0]),
        "noise": "image i of every prompt: normal(fold_in(key(seed), i), latent_shape)",
        "timings_s": {"load": load_s, "batches": batch_times},
        "previous_runs": [] if previous is None else _runs_of(previous),
    }
    for k, (j, b) in enumerate(jobs):
        idx = list(range(b * bs, (b + 1) * bs))
        wanted = [i for i in idx if i < args.n]
        missing = [i for i in wanted if not (img_dir / image_name(j, i)).is_file()]
        if not missing:
            skipped += len(wanted)
            continue
        t1 = time.perf_counter()
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(root_key, i), shape[1:]))(
            jnp.asarray(idx)
        )
        cond = jnp.broadcast_to(prompt_emb[j : j + 1], (bs,) + prompt_emb.shape[1:])
        batch_key = jax.random.fold_in(jax.random.fold_in(root_key, 1_000_003 + j), b)
        result = jaxdiv.sample(
            sampler, pipe.denoiser, noise, key=batch_key, cond=cond, guidance=term
        )
        pixels = to_uint8(pipe.decode(result.x0))
        for i in missing:
            save_png_atomic(pixels[i - b * bs], img_dir / image_name(j, i))
        dt = time.perf_counter() - t1
        batch_times.append(dt)
        generated += len(missing)
        done += len(missing)
        note = (
            " (includes compilation)"
            if len(batch_times) == 1
            else f", ETA <= {dt * (len(jobs) - k - 1):.0f} s"
        )
        log(
            f"prompt {j + 1}/{len(args.prompt)} batch {b + 1}/{n_batches}: "
            f"{len(missing)} images in {dt:.1f} s{note}; {done}/{total} done"
        )
        meta["images_done"] = done
        write_json(out / "metadata.json", meta)

    grid = write_grid(out, files)
    meta["images"] = [
        {"file": f"images/{image_name(j, i)}", "prompt_index": j, "prompt": p, "image_index": i}
        for j, p in enumerate(args.prompt)
        for i in range(args.n)
    ]
    meta["images_done"] = total
    meta["generated_this_run"] = generated
    meta["skipped_this_run"] = skipped
    meta["grid"] = grid.name
    write_json(out / "metadata.json", meta)
    log(f"wrote {grid} and {out / 'metadata.json'} ({generated} new, {skipped} skipped)")
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except RunError as err:
        args._parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
