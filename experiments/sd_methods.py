"""Every diversity method on one Stable Diffusion model, from the same noise, side by side.

    python -m experiments.sd_methods --model PATH --prompts FILE --n 8 --out DIR \\
        [--steps 50 --cfg 7.5 --seed 0 --clip-projection FOLDER --image-encoder FOLDER \\
         --methods none,spell,... --pg-strength S --gass-max-iters 60 ...]

``FILE`` holds one prompt per line. For each prompt, every applicable method of
:data:`experiments.generate.METHODS` runs at its paper's defaults for SD (the knob
defaults of ``experiments.generate``; SPELL's radius is App. D's median pairwise distance
of the unguided row's final latents) with DDIM (eta 0; on an SD3 folder flow Euler, 28
steps and CFG 7.0 by default) and CFG ``--cfg``, on the **same**
``n`` noise latents and the same sampling key; every knob flag of ``experiments.generate``
sets that method's knob here (a flag for a method not in ``--methods`` is refused).
Writes, under ``--out``::

    grid_p000.png   one row per method (its name on the left), n images per row
    results.json    settings; per method its knobs or why it was skipped; per prompt and
                    method Vendi, MSS, SPP, CLIP score (CLIP image features), the mean
                    pairwise latent distance and the seconds (the first prompt's include
                    compilation); means over prompts

``--out`` is locked for the run (:class:`experiments.run_folder.FolderLock`); a folder
whose ``results.json`` holds other settings is refused before the model loads, so the grids
of two comparisons never mix (the same settings run again and rewrite the same files).

Features are ``pipe.encode_image`` of the decoded images (the folder's ``image_encoder``
or ``--image-encoder``): Vendi (cosine kernel, q = 1) and MSS need only them; SPP and the
CLIP score (``100 * max(cos, 0)``) need a text embedding in the same space -- the text
encoder's pooled output through ``--clip-projection`` (or the text encoder's own
projection). A metric that cannot be computed is ``null`` with its reason in
``metric_notes``. Methods are skipped, with the reason recorded, when the folder lacks
what they need: GASS an image encoder and a projection, TPSO a projection, PG a
``--pg-strength`` (no published SD value) and ``--n >= 3``, contextual repulsion an SD3
folder and a ``--contextual-eta``; ``--guidance-rescale`` (diffusers' CFG rescale) applies
to every row's CFG (interval guidance's inside its interval, TPSO's own); on SD3 folders
TPSO optimises both CLIP encoders with the public SD3.5 defaults, and GASS, SPP and the
CLIP score use CLIP-L's own projected text embedding (``--image-encoder`` must then be the
vision tower of the same CLIP, ViT-L/14 for the released models).

For real checkpoints: SD 1.5's text encoder is OpenAI CLIP ViT-L/14's text tower, so
``--clip-projection`` is that model's folder (``CLIPModel`` or
``CLIPTextModelWithProjection``) and ``--image-encoder`` its vision tower
(``CLIPVisionModelWithProjection``); for SD 2.1 the LAION CLIP-ViT-H-14 pair.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from experiments import generate, run_folder
from experiments.common import progress_bar, quiet, say

LABEL_WIDTH = 72  # pixels of the method-name column of the grids


_OneLineParser = generate._OneLineParser


def log(msg: str) -> None:
    """Print a progress line prefixed with ``[sd-methods]`` (above the progress bar when
    one is drawn; nothing with ``--quiet``)."""
    say("sd-methods", msg)


def parse_args(argv=None, prog: str = "python -m experiments.sd_methods") -> argparse.Namespace:
    """Parse and check the command line (one line on stderr and exit 2 for a bad value,
    before the model loads). ``prog`` names the command in messages."""
    p = _OneLineParser(
        prog=prog,
        description="Every diversity method on one SD model, same noise.",
    )
    p.add_argument("--model", required=True,
                   help="diffusers Stable Diffusion folder (SD 1.x/2.x or SD3; required)")
    p.add_argument("--prompts", required=True,
                   help="text file, one prompt per line (required)")
    p.add_argument("--n", type=int, default=8,
                   help="images per prompt and method, >= 2 (default: 8)")
    p.add_argument("--out", required=True,
                   help="output folder: grid_p000.png ..., results.json (required)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: SD 50 DDIM, SD3 28 flow Euler)")  # fmt: skip
    p.add_argument("--cfg", type=float, default=None,
                   help="CFG scale (1 = none; default: SD 7.5, SD3 7.0)")  # fmt: skip
    p.add_argument("--guidance-rescale", type=float, default=None,
                   help="CFG rescale phi in [0, 1] as experiments.generate's, for every "
                        "method's CFG: interval guidance's inside its interval, TPSO's own "
                        "(default: none)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the shared noise and sampling keys (default: 0)")
    p.add_argument(
        "--clip-projection",
        default=None,
        help="CLIP text model with projection (GASS, TPSO, SPP, CLIP score; default: the "
        "text encoder's own projection, where it has one)",
    )
    p.add_argument("--image-encoder", default=None,
                   help="CLIP vision tower folder (default: <model>/image_encoder)")  # fmt: skip
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of " + ",".join(generate.METHODS)
                   + " (default: all of them, skipping with the reason those the model or "
                   "the settings cannot run; named ones must run)")  # fmt: skip
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin weights (default: safetensors only)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no progress messages; errors only (default: a "
                        "bar on a terminal, one line per method otherwise)")  # fmt: skip
    generate.add_knob_flags(p, "method knobs, as experiments.generate's (defaults: the "
                               "papers'; --pg-strength is required for PG)")  # fmt: skip
    args = p.parse_args(argv)
    args.kind = generate.pipeline_kind(args.model)
    _, _, default_steps, default_cfg = generate.KINDS[args.kind]
    args.steps = default_steps if args.steps is None else args.steps
    args.cfg = default_cfg if args.cfg is None else args.cfg
    if args.n < 2:
        p.error(f"--n must be >= 2 (the metrics compare images), got {args.n}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.cfg):
        p.error(f"--cfg must be a finite number, got {args.cfg}")
    for problem in (generate.rescale_problem(args.guidance_rescale, args.cfg),
                    generate.seed_problem(args.seed)):  # fmt: skip
        if problem:
            p.error(problem)
    args.methods_given = args.methods is not None
    methods = [m.strip() for m in (args.methods or ",".join(generate.METHODS)).split(",")
               if m.strip()]  # fmt: skip
    unknown = [m for m in methods if m not in generate.METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from "
                f"{', '.join(generate.METHODS)}")  # fmt: skip
    args.methods = [m for m in generate.METHODS if m in methods]
    for flag, text in generate.given_knobs(args).items():
        if flag == "--clip-projection":  # also the metrics' projection
            continue
        uses = [(m, kind) for m, ks in generate.METHOD_KNOBS.items() for _, f, _, kind in ks
                if f == flag]  # fmt: skip
        if not {m for m, _ in uses} & set(args.methods):
            p.error(f"{flag} applies to --methods {' or '.join(m for m, _ in uses)}, which "
                    "this run does not include")  # fmt: skip
        try:
            value = generate.knob_value(flag, text, uses[0][1])
        except ValueError as err:
            p.error(str(err))
        # refused before the model loads (jaxdiv.sample would refuse it at GASS's turn)
        problem = flag == "--gass-num-active" and generate.num_active_problem(value, args.steps)
        if problem:
            p.error(problem)
    for flag, value in (("--image-encoder", args.image_encoder),
                        ("--clip-projection", args.clip_projection)):  # fmt: skip
        if value is not None and not (Path(value) / "config.json").is_file():
            p.error(f"{flag} {value!r} is not a model folder (no config.json)")
    if args.clip_projection is not None:  # for the metrics too: one without projection
        try:
            generate.knob_value("--clip-projection", args.clip_projection, "projection")
        except ValueError as err:
            p.error(str(err))
    if args.methods_given:  # asked for by name: a method that cannot run is an error
        _, skipped = plan(args)
        for method, why in skipped.items():
            p.error(f"--methods {method} cannot run: {why}")
    try:
        lines = Path(args.prompts).read_text().splitlines()
    except OSError as err:
        p.error(f"--prompts {args.prompts!r}: {err.strerror}")
    args.prompt_list = [line.strip() for line in lines if line.strip()]
    if not args.prompt_list:
        p.error(f"--prompts {args.prompts!r} holds no prompt")
    try:
        run_folder.prepare_folder(args.out)
    except run_folder.FolderError as err:
        p.error(f"--out {err}")
    args._parser = p
    return args


def plan(args: argparse.Namespace) -> tuple[dict, dict]:
    """Which methods run with which knobs, and why the others are skipped.

    Returns:
        ``(knobs, skipped)``: ``{method: knobs}`` (:func:`experiments.generate.method_knobs`
        at the paper defaults) and ``{method: reason}``.
    """
    has_encoder = args.image_encoder is not None or None  # None: look in the model folder
    knobs, skipped = {}, {}
    for method in args.methods:
        own = {f for _, f, _, _ in generate.METHOD_KNOBS[method]}
        given = {f: v for f, v in generate.given_knobs(args).items() if f in own}
        if method == "tpso" and args.clip_projection is not None:
            given["--clip-projection"] = args.clip_projection
        if method == "interval" and args.cfg == 1.0:
            skipped[method] = ("--cfg 1: interval guidance (CFG at scale --cfg inside the "
                               "interval) would be the unguided run")  # fmt: skip
            continue
        try:
            knobs[method] = generate.method_knobs(method, given, args.model, args.n, has_encoder,
                                                  batch_flag="--n")  # fmt: skip
        except ValueError as err:
            skipped[method] = str(err)
    return knobs, skipped


def _metric_text(pipe, args):
    """The prompts' CLIP text embeddings for SPP / CLIP score, or ``(None, why not)``."""
    if pipe.encode_image is None:
        return None, "no image encoder (pass --image-encoder or add <model>/image_encoder)"
    spec = args.clip_projection
    if spec is None:
        if args.kind == "sd3":
            spec = "text_encoder"  # CLIP-L's own projected text_embeds
        elif pipe.text_projection is None:
            return None, "no text embedding in CLIP space: pass --clip-projection"
        spec = "text_encoder"
    elif spec != "text_encoder":
        spec = str(Path(spec).resolve())
    try:
        return generate.clip_text_embeddings(pipe, args.prompt_list, spec), None
    except generate.RunError as err:
        return None, str(err)


def _metrics(feats, latents, text_emb, key, text_note):
    """Vendi / MSS / SPP / CLIP score of one method's images, and the latent spread."""
    import jax.numpy as jnp

    from jaxdiv import metrics
    from jaxdiv.guidance import median_pairwise_distance

    flat = np.asarray(latents, np.float64).reshape(len(latents), -1)
    d = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
    row = {"latent_mean_distance": float(d[np.triu_indices(len(flat), 1)].mean())}
    row["latent_median_distance"] = float(median_pairwise_distance(latents))
    for name in ("vendi", "mss", "spp", "clip_score"):
        row[name] = None
    if feats is None:
        return row
    feats = jnp.asarray(feats, jnp.float32)
    row["vendi"] = float(metrics.vendi(feats))
    row["mss"] = float(metrics.mss(feats))
    if text_emb is not None and text_note is None:
        directions = min(10, feats.shape[1] - 1)
        row["spp"] = float(metrics.spp(feats, text_emb, key, num_directions=directions).spp)
        row["clip_score"] = float(metrics.clip_score(feats, text_emb))
    return row


def _label(name: str, width: int, height: int) -> np.ndarray:
    """A white tile with ``name`` written on it (PIL's default font)."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(tile).text((2, max(0, height // 2 - 6)), name, fill="black")
    return np.asarray(tile)


def write_grid(path: Path, rows: dict) -> None:
    """One row per method (``{name: (n, H, W, 3) uint8}``), its name on the left; atomic."""
    from PIL import Image

    tiles = []
    for name, images in rows.items():
        h = images.shape[1]
        tiles.append(np.concatenate([_label(name, LABEL_WIDTH, h), *images], axis=1))
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(tiles, axis=0)).save(buf, format="PNG")
    run_folder.atomic_write(path, buf.getvalue())


def run(args: argparse.Namespace) -> dict:
    """Run every planned method on every prompt; returns what ``results.json`` holds."""
    import jax
    import jax.numpy as jnp

    import jaxdiv
    from jaxdiv import guidance
    from jaxdiv.pipelines import generation

    knobs, skipped = plan(args)
    out = Path(args.out)
    settings = _settings(args)
    try:  # not into a model folder or another command's output
        run_folder.refuse_foreign(out, "results.json", ("grid_p*.png", "tpso_null_pool.npz"),
                                  "sd-methods")  # fmt: skip
    except run_folder.FolderError as err:
        raise generate.RunError(f"--out {err}") from None
    _check_folder(out, settings)  # before the (slow) model load
    t0 = time.perf_counter()
    try:
        pipe = generate.load_pipeline(args.model, allow_pickle=args.allow_pickle,
                                      image_encoder=args.image_encoder)  # fmt: skip
    # CheckpointError is a ValueError; a wrongly typed config value is a TypeError
    except (ValueError, TypeError) as err:
        raise generate.RunError(str(err)) from err
    log(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    generate.log_truncated(pipe, args.prompt_list, say=log)
    text_embs, text_note = _metric_text(pipe, args)
    gass_embs = None
    if "gass" in knobs:
        try:
            gass_embs = generate.clip_text_embeddings(pipe, args.prompt_list,
                                                      knobs["gass"]["projection"])  # fmt: skip
        except generate.RunError as err:
            if args.methods_given:  # asked for by name: it must run
                raise generate.RunError(f"--methods gass cannot run: {err}") from err
            skipped["gass"] = str(err)
            del knobs["gass"]
    # SPELL's guarantee needs a last step onto x0_hat (sigma = 0): DDIM's clean endpoint;
    # flow Euler's last step always lands there
    if args.kind == "sd3":
        sampler = pipe.flow_euler(args.steps)
    else:
        sampler = pipe.ddim(args.steps, clean_endpoint=True)
    null = pipe.null_cond
    cfg_term = None if args.cfg == 1.0 else generation.cfg_term(pipe, args.cfg, null,
                                                                args.guidance_rescale)
    root = jax.random.key(args.seed)
    prompt_emb = pipe.encode_prompt(pipe.tokenize(args.prompt_list))
    null_pool = None
    if "tpso" in knobs and cfg_term is not None:
        null_pool = generate.tpso_null_pool(pipe, knobs["tpso"], jax.random.fold_in(root, 11),
                                            out / "tpso_null_pool.npz", log)  # fmt: skip
    results = {
        "settings": settings,
        "methods": {m: {"knobs": k} for m, k in knobs.items()},
        "skipped": skipped,
        "metric_notes": {
            "features": "CLIP image features of the decoded images (pipe.encode_image)",
            "vendi": "cosine kernel, q = 1",
            "clip_score": "100 * max(cos(image, text), 0)",
            "spp": "GASS's D_dep + D_ind with the prompt's CLIP text embedding",
            "null": text_note,
        },
        "noise": "per prompt j: normal(fold_in(fold_in(key(seed), 7), j), (n, C, h, w)), "
        "shared by every method; sampling key fold_in(fold_in(key(seed), 8), j)",
        "prompts": [],
    }
    # a bar on a terminal (method runs, rate, time left); else one line per method
    bar = progress_bar(total=len(args.prompt_list) * len(knobs), desc="sd_methods",
                       unit="method")  # fmt: skip
    try:
        for j, prompt in enumerate(args.prompt_list):
            noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(root, 7), j),
                                      pipe.noise_shape(args.n))  # fmt: skip
            key = jax.random.fold_in(jax.random.fold_in(root, 8), j)
            cond = jax.tree.map(lambda a: jnp.broadcast_to(a[j : j + 1],
                                                           (args.n,) + a.shape[1:]),
                                prompt_emb)  # fmt: skip
            spp_key = jax.random.fold_in(jax.random.fold_in(root, 9), j)
            rows, per_method, unguided = {}, {}, None
            for method, k in knobs.items():
                t1 = time.perf_counter()
                radius = None
                if method == "spell":
                    if k["radius"] != "auto":
                        radius = k["radius"]
                    else:  # App. D from the unguided row (same noise, same key)
                        if unguided is None:
                            unguided = jaxdiv.sample(sampler, pipe.denoiser, noise, key=key,
                                                     cond=cond, guidance=cfg_term).x0  # fmt: skip
                        radius = float(guidance.median_pairwise_distance(unguided))
                g, c = generate.method_term(
                    pipe, method, k, cfg=args.cfg, null=null, cond=cond, prompt=prompt,
                    key=jax.random.fold_in(jax.random.fold_in(root, 10), j), radius=radius,
                    text_emb=gass_embs[j] if method == "gass" else None, cfg_term=cfg_term,
                    null_pool=null_pool, rescale=args.guidance_rescale,
                )  # fmt: skip
                x0 = jaxdiv.sample(sampler, pipe.denoiser, noise, key=key, cond=c,
                                   guidance=g).x0  # fmt: skip
                images = pipe.decode(x0)
                images.block_until_ready()
                seconds = time.perf_counter() - t1
                if method == "none":
                    unguided = x0
                bar.set_postfix_str(f"prompt {j + 1}/{len(args.prompt_list)} {method}",
                                    refresh=False)  # fmt: skip
                bar.update()
                if not (np.isfinite(np.asarray(images)).all()
                        and np.isfinite(np.asarray(x0)).all()):  # fmt: skip
                    per_method[method] = {"error": "non-finite values (NaN or inf) in the "
                                                   "output", "seconds": seconds}  # fmt: skip
                    continue
                feats = None if pipe.encode_image is None else pipe.encode_image(images)
                row = _metrics(feats, x0, None if text_embs is None else text_embs[j], spp_key,
                               text_note)  # fmt: skip
                row["seconds"] = seconds
                if radius is not None:
                    row["spell_radius"] = radius
                per_method[method] = row
                rows[method] = generation.to_uint8(images)
                if bar.disable:  # no bar (not a terminal): one line per method
                    log(f"prompt {j + 1}/{len(args.prompt_list)} {method}: {seconds:.1f} s"
                        + (f", vendi {row['vendi']:.3f}" if row["vendi"] is not None
                           else ""))  # fmt: skip
            grid = f"grid_p{j:03d}.png"
            if rows:
                write_grid(out / grid, rows)
            results["prompts"].append({"prompt": prompt, "grid": grid if rows else None,
                                       "methods": per_method})  # fmt: skip
            results["mean"] = _means(results["prompts"], knobs)
            run_folder.write_json(out / "results.json", results)
    finally:
        bar.close()
    log(f"wrote {out / 'results.json'}")
    return results


_KNOB_KINDS = {flag: kind for knobs in generate.METHOD_KNOBS.values()
               for _, flag, _, kind in knobs}  # fmt: skip


def _knob_values(flags: dict) -> dict:
    """The knob flags' values as the methods read them (``--pg-strength 0.50`` is 0.5, a
    folder its absolute path), so that two spellings of one run compare equal; a value
    that does not parse (an older file's) stays as it was written."""
    out = {}
    for flag, text in flags.items():
        try:
            out[flag] = generate.knob_value(flag, str(text), _KNOB_KINDS[flag])
        except (KeyError, ValueError):
            out[flag] = text
    return out


def _folder(path):
    return None if path is None else str(Path(path).resolve())


def _settings(args: argparse.Namespace) -> dict:
    """What decides this comparison's files: the model, prompts, sampling settings, the
    methods asked for and the knob flags given, as values (``results.json``'s
    ``settings``)."""
    return {
        "model": str(Path(args.model).resolve()),
        "pipeline": args.kind,
        "prompts": args.prompt_list,
        "n": args.n,
        "steps": args.steps,
        # SPELL's guarantee needs a last step onto x0_hat: DDIM's clean endpoint
        "sampler": "flow_euler" if args.kind == "sd3" else "ddim",
        "cfg": args.cfg,
        "guidance_rescale": args.guidance_rescale,
        "seed": args.seed,
        "clip_projection": _folder(args.clip_projection),
        "image_encoder": _folder(args.image_encoder) or "<model>/image_encoder",
        "methods": list(args.methods),
        "knob_flags": _knob_values(generate.given_knobs(args)),
    }


def _check_folder(out: Path, settings: dict) -> None:
    """Refuse an ``--out`` that holds another comparison: its grids and this run's would
    mix (a rerun with the same settings rewrites the same files)."""
    path = out / "results.json"
    if not path.is_file():
        if any(out.glob("grid_p*.png")):
            raise generate.RunError(f"--out {str(out)!r} holds grids but no results.json; "
                                    "refusing to mix runs (choose another --out or delete "
                                    "the folder)")  # fmt: skip
        return
    try:
        old = json.loads(path.read_text())["settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise generate.RunError(f"--out {str(out)!r}: unreadable results.json ({err})") from err
    # older files: raw flag text and paths as typed
    old = dict(old)
    if isinstance(old.get("knob_flags"), dict):
        old["knob_flags"] = _knob_values(old["knob_flags"])
    for key in ("clip_projection", "image_encoder"):
        if isinstance(old.get(key), str) and old[key] != "<model>/image_encoder":
            old[key] = _folder(old[key])
    # a folder from before "methods" / "knob_flags" were recorded: the keys it has
    diffs = []
    for k, v in settings.items():
        if k not in old or old[k] == v:
            continue
        if k == "knob_flags" and isinstance(old[k], dict):  # name the flags that differ
            diffs += [f"{f}: {old[k].get(f)!r} -> {v.get(f)!r}" for f in sorted({*old[k], *v})
                      if old[k].get(f) != v.get(f)]  # fmt: skip
        else:
            diffs.append(f"{k}: {old[k]!r} -> {v!r}")
    if diffs:
        raise generate.RunError(f"--out {str(out)!r} holds a comparison with different "
                                f"settings ({'; '.join(diffs)}); choose another --out or "
                                "delete the folder")  # fmt: skip


def _means(prompts: list, knobs: dict) -> dict:
    """Per method and metric, the mean over the prompts where it is a number."""
    means = {}
    for method in knobs:
        rows = [p["methods"].get(method, {}) for p in prompts]
        names = {k for r in rows for k, v in r.items() if isinstance(v, float)}
        means[method] = {
            k: float(np.mean([r[k] for r in rows if isinstance(r.get(k), float)]))
            for k in sorted(names)
        }
    return means


def main(argv=None, prog: str = "python -m experiments.sd_methods") -> int:
    """Run the command line; exit 2 for refused inputs, 1 for a failed run."""
    args = parse_args(argv, prog)
    try:
        with quiet(getattr(args, "quiet", False)), run_folder.FolderLock(args.out):
            run(args)
    except (generate.RunError, run_folder.FolderError) as err:
        prefix = "--out " if isinstance(err, run_folder.FolderError) else ""
        args._parser.error(prefix + str(err))
    except OSError as err:
        print(f"{args._parser.prog}: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
