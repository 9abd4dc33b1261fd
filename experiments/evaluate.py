"""Folders of generated images -> encoder features -> the tables diversity papers report.

    python -m experiments.evaluate --images DIR [DIR ...] [--reference DIR] \\
        --encoders clip,dinov2 --clip CLIP_FOLDER --dinov2 DINOV2_FOLDER --out DIR \\
        [--batch-size 32 --bootstrap 1000 --seed 0]

Each ``--images`` folder is an ``experiments.generate`` output (its ``metadata.json`` lists
every image with its prompt, and the method with its knobs) or any folder of PNG / JPEG
images (then all images form one group). ``--reference`` is a folder of real images for
the fidelity metrics (FD, KID, PRDC, CMMD).

Features: ``clip`` is a CLIP vision tower (``CLIPVisionModel[WithProjection]`` folder;
its ``image_embeds``, else ``pooler_output``), ``dinov2`` a ``Dinov2Model`` folder (the CLS
token after the final layernorm, FD-DINOv2's feature). Preprocessing is the encoders' own
image processors' (PIL bicubic resize of the short side, centre crop, rescale, normalise),
bit-exact in JAX (:func:`jaxdiv.models.dinov2.dinov2_preprocess`: ``BitImageProcessor``
for DINOv2 at 256 -> 224, the same steps at the tower's size with CLIP's mean / std for
``CLIPImageProcessor``). Images stream through fixed-size batches (the last one padded: one
compiled program per encoder and image size), so memory does not grow with the number of
images.

Cache: ``<out>/features/<folder>-<hash>/<encoder>-<hash>.npz`` holds each image's SHA-256
and feature; a rerun, or a run adding a metric, reads them back, and an image whose bytes
changed is encoded again (as is every image when the encoder folder changes). The cache is
written atomically every ``--save-every`` batches and at the end, so a killed run resumes.
``--out`` is locked for the run (one writer).

Writes ``results.json`` (every number, per prompt and pooled), ``table.md`` and
``table.csv`` (one row per image folder and encoder):

* per prompt (the images of one prompt): Vendi (cosine kernel, q = 1) and MSS; with
  ``--clip-text`` (the text tower of the ``--clip`` model, and its tokenizer) also the CLIP
  score (``100 max(cos, 0)``) and GASS's SPP against the prompt's text embedding;
* pooled: their mean over prompts with a percentile bootstrap 95% interval (prompts
  resampled with replacement, ``--bootstrap`` times), and the Vendi of all images;
* against ``--reference``: FD, KID (mean, std over subsets), precision / recall /
  density / coverage (k = 5), and CMMD (CLIP features only).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from experiments import processes, run_folder
from experiments.common import progress_bar, quiet, say

ENCODERS = ("clip", "dinov2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CLIP_PROCESSOR = dict(mean=(0.48145466, 0.4578275, 0.40821073),
                      std=(0.26862954, 0.26130258, 0.27577711))  # fmt: skip


class EvaluateError(Exception):
    """A refused input or a failed run, reported in one line."""


# the prefix of progress lines: "evaluate", or "evaluate 1/2" for process 1 of a job of 2
_PREFIX = ["evaluate"]


def log(msg: str) -> None:
    """Print a progress line prefixed with ``[evaluate]`` (``[evaluate i/N]`` in process
    ``i`` of a job of ``N``; above the progress bar when one is drawn; nothing with
    ``--quiet``)."""
    say(_PREFIX[0], msg)


class ImageSet(NamedTuple):
    """One folder of images to evaluate.

    Attributes:
        name: the folder's name (table row label).
        folder: the resolved folder.
        files: image paths.
        prompts: the prompt of each image (``None`` where unknown).
        method: ``settings.method`` of a generate folder (``None`` otherwise).
        knobs: its ``settings.method_knobs``.
    """

    name: str
    folder: Path
    files: tuple
    prompts: tuple
    method: str | None
    knobs: dict


def read_image_set(folder, reference: bool = False) -> ImageSet:
    """The images of ``folder``: a generate folder's ``metadata.json`` list, else every
    PNG / JPEG in it (sorted by name). EvaluateError when it holds none, or when it is the
    ``images/`` folder of a generate run and not a ``reference`` set (read alone, its images
    would lose their prompts)."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise EvaluateError(f"{folder} is not a folder")
    meta_file = folder / "metadata.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            entries = meta["images"]
            files = tuple(folder / e["file"] for e in entries)
            prompts = tuple(str(e["prompt"]) for e in entries)
        except (ValueError, KeyError, TypeError):
            raise EvaluateError(f"{meta_file} is not a finished experiments.generate run (no "
                                "valid 'images' list)") from None  # fmt: skip
        missing = [str(f.relative_to(folder)) for f in files if not f.is_file()]
        if missing:
            raise EvaluateError(f"{folder}: {len(missing)} images listed in metadata.json are "
                                f"missing, e.g. {missing[0]}")  # fmt: skip
        settings = meta.get("settings", {})
        return ImageSet(folder.name, folder, files, prompts, settings.get("method"),
                        settings.get("method_knobs", {}))  # fmt: skip
    if not reference and folder.name == "images" and (folder.parent / "metadata.json").is_file():
        raise EvaluateError(f"{folder} is the images/ folder of an experiments.generate run: "
                            f"pass the run folder {folder.parent} (its metadata.json gives "
                            "each image's prompt)")  # fmt: skip
    files = tuple(sorted(p for p in folder.iterdir()
                         if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))  # fmt: skip
    if not files:
        raise EvaluateError(f"{folder} holds no metadata.json and no PNG / JPEG images")
    return ImageSet(folder.name, folder, files, (None,) * len(files), None, {})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _folder_digest(folder: Path) -> str:
    """A hash of an encoder folder: its config and the names, sizes and times of its
    files (a changed checkpoint invalidates the cached features)."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


class Encoder(NamedTuple):
    """``encode(uint8 NHWC batch) -> (B, D) float32``, with the tag its cache is keyed by."""

    name: str
    tag: str
    encode: Any


#: the ``model_type`` values of ``config.json`` each encoder flag takes
_ENCODER_TYPES = {"clip": ("clip_vision_model", "clip"), "dinov2": ("dinov2",)}


def check_encoder_folder(name: str, folder) -> Path:
    """``folder`` if it holds a model of the kind ``--name`` needs (its ``config.json``'s
    ``model_type``), else :class:`EvaluateError` in one line -- checked for every encoder
    before any image is encoded."""
    folder = Path(folder)
    where = f"--{name} {str(folder)!r}"
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise EvaluateError(f"{where} is not a model folder (no config.json)") from None
    except (OSError, ValueError) as err:
        raise EvaluateError(f"{where}: unreadable config.json ({err})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in _ENCODER_TYPES[name]:
        raise EvaluateError(f"{where} holds a {kind!r} model (config.json's model_type); "
                            f"--{name} needs one of {_ENCODER_TYPES[name]}")  # fmt: skip
    return folder


def load_encoder(name: str, folder, batch_size: int) -> Encoder:
    """A jitted feature extractor for ``name`` in :data:`ENCODERS` from a local folder."""
    folder = check_encoder_folder(name, folder)
    try:
        return _load_encoder(name, folder, batch_size)
    except (ValueError, TypeError) as err:  # a checkpoint that does not fit its config
        raise EvaluateError(f"--{name} {str(folder)!r}: {err}") from None


def _load_encoder(name: str, folder: Path, batch_size: int) -> Encoder:
    import jax
    import jax.numpy as jnp

    from jaxdiv.models.dinov2 import dinov2_preprocess, load_dinov2
    from jaxdiv.models.layers import pure

    if name == "clip":
        from jaxdiv.models.clip import load_clip_vision
        from jaxdiv.pipelines.folder import image_preprocess_stats

        model = load_clip_vision(folder)
        size = model.config.image_size
        mean, std, _ = image_preprocess_stats(folder, folder)
        projected = hasattr(model, "visual_projection")
        net = pure(model)

        def features(params, images):
            x = dinov2_preprocess(images, size=size, crop_size=size, mean=mean, std=std)
            out = net.apply(params, x)
            return out.image_embeds if projected else out.pooler_output
    else:
        net = pure(load_dinov2(folder))

        def features(params, images):
            return net.apply(params, dinov2_preprocess(images)).pooler_output

    run = jax.jit(features)

    def encode(images: np.ndarray) -> np.ndarray:
        n = len(images)
        pad = np.zeros((batch_size - n, *images.shape[1:]), np.uint8)
        out = run(net.params, jnp.asarray(np.concatenate([images, pad])))
        return np.asarray(out[:n], np.float32)

    return Encoder(name, f"{name}-{_folder_digest(folder)}", encode)


def load_text_embedder(folder):
    """``embed(prompts) -> (n, P)`` CLIP text embeddings (``text_embeds``) from a local
    ``CLIPTextModelWithProjection`` or ``CLIPModel`` folder and its tokenizer files (in the
    folder or its ``tokenizer/``)."""
    import jax

    from jaxdiv.models.checkpoint import CheckpointError
    from jaxdiv.models.clip import load_clip_text, load_clip_tokenizer, tokenize
    from jaxdiv.models.layers import pure

    folder = Path(folder)
    try:
        model = load_clip_text(folder, with_projection=True)
        tok_folder = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        tokenizer = load_clip_tokenizer(tok_folder)
    except (CheckpointError, ValueError, TypeError) as err:
        raise EvaluateError(f"--clip-text {str(folder)!r}: {err}") from None
    net = pure(model)
    run = jax.jit(lambda params, ids: net.apply(params, ids).text_embeds)
    length = model.config.max_position_embeddings

    def embed(prompts):
        ids = tokenize(tokenizer, list(prompts), max_length=length)
        return np.asarray(run(net.params, ids), np.float32)

    return embed


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as err:
        raise EvaluateError(f"{path} is not a readable image ({err})") from None


def load_rgb(path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB; EvaluateError when unreadable.

    16-bit grayscale (PNG) is scaled to 8 bits (``v / 257``): PIL's ``convert("RGB")``
    clips it instead, turning nearly every pixel white. 32-bit integer or float images
    have no defined 8-bit range and are refused.

    >>> import tempfile, numpy as np
    >>> from PIL import Image
    >>> path = tempfile.mkdtemp() + "/g16.png"
    >>> Image.fromarray(np.array([[0, 32896, 65535]], np.uint16)).save(path)
    >>> load_rgb(path)[0, :, 0].tolist()
    [0, 128, 255]
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
                gray = np.rint(np.asarray(im).astype(np.float64) / 257.0)
                return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, -1)
            if im.mode in ("I", "F"):
                raise EvaluateError(f"{path} is a 32-bit {'float' if im.mode == 'F' else 'integer'}"
                                    " image: it has no defined 8-bit range; save it as an 8- or "
                                    "16-bit PNG")  # fmt: skip
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise EvaluateError(f"{path} is not a readable image ({err})") from None


def _cache_path(out: Path, image_set: ImageSet, encoder: Encoder) -> Path:
    key = hashlib.sha256(str(image_set.folder).encode()).hexdigest()[:8]
    return out / "features" / f"{image_set.name}-{key}" / f"{encoder.tag}.npz"


def _part_paths(path: Path) -> list[Path]:
    """The per-process caches of a multi-process job next to the cache ``path``
    (``<encoder tag>.part-<i>.npz``), merged into ``path`` when the job ends."""
    return sorted(path.parent.glob(f"{path.stem}.part-*.npz"))


def _part_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}.part-{index}.npz")


def _read_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with np.load(path) as f:
            return {str(k): (str(d), v) for k, d, v in zip(f["files"], f["sha256"], f["features"])}
    except (OSError, ValueError, KeyError):
        log(f"ignoring an unreadable feature cache {path}")
        return {}


def _read_caches(path: Path) -> dict:
    """The cache ``path`` and the per-process caches a killed job left next to it."""
    cached = _read_cache(path)
    for part in _part_paths(path):
        cached.update(_read_cache(part))
    return cached


def _write_cache(path: Path, entries: dict) -> None:
    names = sorted(entries)
    buf = io.BytesIO()
    np.savez(buf, files=np.array(names), sha256=np.array([entries[n][0] for n in names]),
             features=np.stack([entries[n][1] for n in names]))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    run_folder.atomic_write(path, buf.getvalue())


def features_of(image_set: ImageSet, encoder: Encoder, out: Path, batch_size: int,
                save_every: int = 20, procs: processes.Processes = processes.SINGLE,
                ) -> tuple[np.ndarray, int]:  # fmt: skip
    """Features of every image of ``image_set`` (in its order), from the cache where the
    image bytes are unchanged; returns ``(features, number computed now)``.

    In a job of several processes (``procs``) this is a collective: process ``i`` encodes
    the images ``k`` with ``k % N == i`` (from the cache where it can), keeps them in its
    own cache file (``<encoder>.part-<i>.npz``, so a killed job resumes), and the features
    and SHA-256s are gathered across the processes (padded to equal counts); process 0
    then writes the merged cache and removes the parts. Every process returns all the
    features.
    """
    path = _cache_path(out, image_set, encoder)
    cached = _read_caches(path)
    every = [str(f.relative_to(image_set.folder)) for f in image_set.files]
    mine = processes.share(range(len(every)), procs)  # every index for a single process
    files = [image_set.files[k] for k in mine]
    rel = [every[k] for k in mine]
    digests = [_digest(f) for f in files]
    entries = {r: cached[r] for r, d in zip(rel, digests) if r in cached and cached[r][0] == d}
    todo = [i for i, r in enumerate(rel) if r not in entries]
    write_to = _part_path(path, procs.index) if procs.multi else path
    # images of one size share a batch (one compiled program per size); only the headers
    # are read here, the pixels batch by batch, so memory does not grow with the folder
    by_size: dict = {}
    for i in todo:
        by_size.setdefault(_image_size(files[i]), []).append(i)
    batches = [ids[k : k + batch_size] for ids in by_size.values()
               for k in range(0, len(ids), batch_size)]  # fmt: skip
    t0 = time.perf_counter()
    # a bar on a terminal (images, rate, time left); else a line at every cache write
    bar = progress_bar(total=len(todo), desc=f"{image_set.name} / {encoder.name}", unit="img")
    try:
        for b, ids in enumerate(batches):
            feats = encoder.encode(np.stack([load_rgb(files[i]) for i in ids]))
            if not np.isfinite(feats).all():
                raise EvaluateError(f"{encoder.name} features of {image_set.name} hold NaN or "
                                    f"inf (images {[rel[i] for i in ids][:3]} ...)")  # fmt: skip
            for i, f in zip(ids, feats):
                entries[rel[i]] = (digests[i], f)
            bar.update(len(ids))
            if (b + 1) % save_every == 0 or b + 1 == len(batches):
                _write_cache(write_to, entries)
                if bar.disable:
                    count = sum(map(len, batches[: b + 1]))
                    log(f"{image_set.name} / {encoder.name}: {count}/{len(todo)} images "
                        f"encoded in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    finally:
        bar.close()
    if not procs.multi:
        parts = _part_paths(path)  # a killed job's: merged into this cache
        if parts or (not batches and set(entries) != set(cached)):
            _write_cache(path, entries)  # (and drop entries of images no longer there)
        for part in parts:
            part.unlink(missing_ok=True)
        return np.stack([entries[r][1] for r in rel]), len(todo)
    feats, shas, computed = _gather_features(procs, every, [entries[r] for r in rel], len(todo))
    if procs.lead:
        _write_cache(path, {r: (s, f) for r, s, f in zip(every, shas, feats)})
        for part in _part_paths(path):
            part.unlink(missing_ok=True)
    return feats, computed


def _gather_features(procs, every: list, mine: list, computed: int):
    """Every process's ``(sha256, feature)`` entries of its share into the order of
    ``every``: counts and widths first, then the padded features and digests."""
    width = len(mine[0][1]) if mine else 0
    sizes = processes.gather(procs, np.asarray([len(mine), width, computed], np.int64))
    rows, dim = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    feats = np.zeros((rows, dim), np.float32)
    shas = np.zeros((rows, 32), np.uint8)
    for m, (sha, f) in enumerate(mine):
        feats[m] = f
        shas[m] = np.frombuffer(bytes.fromhex(sha), np.uint8)
    all_feats, all_shas = processes.gather(procs, feats), processes.gather(procs, shas)
    out_feats = np.zeros((len(every), dim), np.float32)
    out_shas = [""] * len(every)
    for k in range(len(every)):  # image k is row k // N of process k % N
        i, m = k % procs.num, k // procs.num
        out_feats[k] = all_feats[i, m]
        out_shas[k] = bytes(all_shas[i, m]).hex()
    return out_feats, out_shas, int(sizes[:, 2].sum())


def bootstrap_interval(values, num: int, seed: int) -> list[float] | None:
    """Percentile 95% interval of the mean of ``values`` (resampled with replacement)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2 or num < 1:
        return None
    idx = np.random.default_rng(seed).integers(0, len(v), size=(num, len(v)))
    means = v[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def set_metrics(feats: np.ndarray, prompts, reference: np.ndarray | None, encoder: str,
                bootstrap: int, seed: int, text: dict | None = None,
                prdc_k: int = 5) -> dict:  # fmt: skip
    """Per-prompt diversity (and, given ``text`` = {prompt: CLIP text embedding}, CLIP
    score and SPP), pooled means with bootstrap intervals, and the fidelity metrics
    against ``reference`` features (PRDC with ``prdc_k`` neighbours when both sets have
    more than ``prdc_k`` images; otherwise ``None`` and the reason in ``prdc_skipped``)."""
    import jax
    import jax.numpy as jnp

    from jaxdiv import metrics

    groups: dict = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    per_prompt = []
    for p, ids in groups.items():
        x = feats[ids]
        row = {"prompt": p, "n": len(ids), "vendi": None, "mss": None}
        if len(ids) >= 2:
            row["vendi"] = float(metrics.vendi(x))
            row["mss"] = float(metrics.mss(x))
        if text is not None and p in text:
            t = jnp.asarray(text[p])
            row["clip_score"] = float(metrics.clip_score(x, t))
            if len(ids) >= 2:
                # a key of the prompt's text, not of its place in this folder: every
                # folder evaluated with one seed searches a prompt's u_ind the same way
                key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(p.encode()) >> 1)
                row["spp"] = float(metrics.spp(x, t, key,
                                               num_directions=min(10, x.shape[1] - 1)).spp)
        per_prompt.append(row)
    pooled: dict = {"n": int(len(feats)), "prompts": len(groups),
                    "vendi_all": float(metrics.vendi(feats))}  # fmt: skip
    for name in ("vendi", "mss", "clip_score", "spp"):
        if name in ("clip_score", "spp") and text is None:
            continue
        vals = [r[name] for r in per_prompt if r.get(name) is not None]
        pooled[f"{name}_mean"] = float(np.mean(vals)) if vals else None
        # Vendi, MSS and SPP need two images of a prompt: say over how many prompts
        pooled[f"{name}_prompts"] = len(vals)
        pooled[f"{name}_ci95"] = bootstrap_interval(vals, bootstrap, seed)
    if reference is not None:
        # float64: with fewer images than feature dimensions the covariances are rank
        # deficient and float32 rounding in their null space biases FD low
        pooled["fd"] = float(metrics.frechet_distance_from_features(feats, reference,
                                                                    dtype=jnp.float64))  # fmt: skip
        size = min(len(feats), len(reference), 1000)
        k = metrics.kid(feats, reference, subset_size=size, key=jax.random.key(seed))
        pooled["kid_mean"], pooled["kid_std"] = float(k.mean), float(k.std)
        if min(len(feats), len(reference)) > prdc_k:
            pr = metrics.prdc(reference, feats, k=prdc_k)
            pooled.update(precision=float(pr.precision), recall=float(pr.recall),
                          density=float(pr.density), coverage=float(pr.coverage))  # fmt: skip
        else:  # a k-NN ball needs k other points in its own set
            pooled.update(precision=None, recall=None, density=None, coverage=None)
            pooled["prdc_skipped"] = (f"PRDC needs more than --prdc-k {prdc_k} images in both "
                                      f"sets; this set has {len(feats)}, the reference "
                                      f"{len(reference)}")  # fmt: skip
        if encoder == "clip":  # on unit rows, as the reference (cmmd/embedding.py) embeds
            pooled["cmmd"] = float(metrics.cmmd(_unit_rows(feats), _unit_rows(reference)))
    return {"pooled": pooled, "per_prompt": per_prompt}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


TABLE_COLUMNS = ("set", "method", "encoder", "n", "prompts", "vendi_mean", "vendi_ci95",
                 "mss_mean", "mss_ci95", "vendi_all", "clip_score_mean", "clip_score_ci95",
                 "spp_mean", "spp_ci95", "fd", "kid_mean", "kid_std", "precision", "recall",
                 "density", "coverage", "cmmd")  # fmt: skip


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return str(v)


def write_tables(out: Path, rows: list[dict]) -> None:
    """``table.md`` and ``table.csv``, one row per set and encoder (atomic)."""
    md = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for r in rows:
        cells = [_cell(r.get(c)) for c in TABLE_COLUMNS]
        md.append("| " + " | ".join(cells) + " |")
        writer.writerow(cells)
    run_folder.atomic_write(out / "table.md", ("\n".join(md) + "\n").encode())
    run_folder.atomic_write(out / "table.csv", buf.getvalue().encode())


def parse_args(argv=None, prog: str = "python -m experiments.evaluate") -> argparse.Namespace:
    """Parse and check the command line before any model loads (one line on stderr, exit
    2 for a bad value). ``prog`` names the command in messages."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line
    p.add_argument("--images", nargs="+", required=True,
                   help="image folders to evaluate: experiments.generate outputs or folders "
                        "of PNG / JPEG images (required)")  # fmt: skip
    p.add_argument("--reference", default=None,
                   help="folder of reference (real) images for FD, KID, PRDC and CMMD "
                        "(default: none, diversity metrics only)")  # fmt: skip
    p.add_argument("--encoders", default="clip",
                   help="comma-separated feature encoders, from " + ",".join(ENCODERS)
                   + " (default: clip)")  # fmt: skip
    p.add_argument("--clip", default=None,
                   help="CLIP vision model folder (required for --encoders clip; e.g. ViT-L/14, "
                        "CMMD's paper uses ViT-L/14@336)")  # fmt: skip
    p.add_argument("--dinov2", default=None,
                   help="Dinov2Model folder (required for --encoders dinov2; FD-DINOv2 uses "
                        "ViT-L/14)")  # fmt: skip
    p.add_argument("--clip-text", default=None,
                   help="CLIP text model with projection of the --clip model (and its "
                        "tokenizer): adds CLIP score and SPP per prompt "
                        "(default: none)")  # fmt: skip
    p.add_argument("--out", required=True,
                   help="output folder: results.json, table.md, table.csv, features/ "
                        "(required)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per encoder batch (default: 32)")
    p.add_argument("--save-every", type=int, default=20,
                   help="batches between writes of the feature cache (default: 20)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the 95%% intervals, 0 = none (default: 1000)")
    p.add_argument("--prdc-k", type=int, default=None,
                   help="neighbours defining the PRDC balls (default: 5, the value of Naeem "
                        "et al. 2020 and dgm-eval)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the bootstrap, KID subsets and SPP directions (default: 0)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no progress messages; errors only (default: a "
                        "bar on a terminal, one line per cache write otherwise)")  # fmt: skip
    processes.add_flags(p)
    args = p.parse_args(argv)
    processes.from_args(args, p.error)
    args.encoder_list = [e.strip() for e in args.encoders.split(",") if e.strip()]
    unknown = [e for e in args.encoder_list if e not in ENCODERS]
    if unknown or not args.encoder_list:
        p.error(f"--encoders: unknown {', '.join(unknown) or '(empty)'}; choose from "
                f"{', '.join(ENCODERS)}")  # fmt: skip
    for e in args.encoder_list:
        folder = getattr(args, e)
        if folder is None:
            p.error(f"--encoders {e} needs --{e} FOLDER (a local model folder)")
        try:
            check_encoder_folder(e, folder)
        except EvaluateError as err:
            p.error(str(err))
    if args.clip_text is not None:
        if "clip" not in args.encoder_list:
            p.error("--clip-text needs --encoders clip (CLIP score and SPP use CLIP features)")
        if not (Path(args.clip_text) / "config.json").is_file():
            p.error(f"--clip-text {args.clip_text!r} is not a model folder (no config.json)")
        text_folder = Path(args.clip_text)
        tok = text_folder / "tokenizer" if (text_folder / "tokenizer").is_dir() else text_folder
        if not ((tok / "tokenizer.json").is_file()
                or all((tok / f).is_file() for f in ("vocab.json", "merges.txt"))):
            p.error(f"--clip-text {args.clip_text!r} holds no tokenizer files (vocab.json and "
                    "merges.txt, or tokenizer.json; in the folder or its tokenizer/)")
    for name in ("batch_size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # a setting that could never take effect (an unused --clip / --dinov2 folder is fine:
    # scripts keep both and switch --encoders)
    if args.prdc_k is not None and args.reference is None:
        p.error("--prdc-k needs --reference (PRDC compares with reference images)")
    args.prdc_k = 5 if args.prdc_k is None else args.prdc_k
    if args.prdc_k < 1:
        p.error(f"--prdc-k must be >= 1, got {args.prdc_k}")
    if args.bootstrap < 0:
        p.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if not 0 <= args.seed < 2**32:
        p.error(f"--seed must be an integer in [0, 2**32), got {args.seed}")
    try:
        args.sets = [read_image_set(f) for f in args.images]
        args.ref_set = (None if args.reference is None
                        else read_image_set(args.reference, reference=True))  # fmt: skip
    except EvaluateError as err:
        p.error(str(err))
    names = [s.name for s in args.sets]
    if len(set(names)) != len(names):
        p.error(f"--images: two folders share a name ({names}); the table labels rows by name")
    try:
        run_folder.prepare_folder(args.out)
    except run_folder.FolderError as err:
        p.error(f"--out {err}")
    args._parser = p
    return args


def run(args: argparse.Namespace) -> dict:
    """Encode (or read back) every set's features and write the tables.

    In a job of several processes (``args.processes``, joined by :func:`main`) every
    process encodes its share of each folder (:func:`features_of`), and process 0, which
    then holds every feature, computes the metrics and writes the tables -- the same files
    as a one-process run; the others return them once written.
    """
    procs = getattr(args, "processes", None) or processes.SINGLE
    out = Path(args.out)
    results: dict = {
        "settings": {"images": [str(s.folder) for s in args.sets],
                     "reference": None if args.ref_set is None else str(args.ref_set.folder),
                     "encoders": {e: str(Path(getattr(args, e)).resolve())
                                  for e in args.encoder_list},
                     "bootstrap": args.bootstrap, "seed": args.seed, "prdc_k": args.prdc_k},
        "notes": {"vendi": "cosine kernel, q = 1, per prompt; vendi_all over all images",
                  "ci95": "percentile bootstrap over prompts of the per-prompt mean",
                  "kid": "unbiased cubic-polynomial MMD^2, subsets of min(n, n_ref, 1000); "
                         "two independent samples of one distribution give 0 on average, a "
                         "set against itself a negative value of order 1 / n",
                  "cmmd": "CLIP features, RBF sigma 10, x1000 (biased)",
                  "prdc": f"k = {args.prdc_k}, reference = real"},
        "sets": {},
    }  # fmt: skip
    rows = []
    text = None
    if args.clip_text is not None and procs.lead:
        prompts = sorted({p for s in args.sets for p in s.prompts if p is not None})
        if not prompts:
            raise EvaluateError("--clip-text: no folder records its prompts (metadata.json)")
        text = dict(zip(prompts, load_text_embedder(args.clip_text)(prompts)))
        results["settings"]["clip_text"] = str(Path(args.clip_text).resolve())
    for e in args.encoder_list:
        encoder = load_encoder(e, getattr(args, e), args.batch_size)
        reference = None
        if args.ref_set is not None:
            reference, _ = features_of(args.ref_set, encoder, out, args.batch_size,
                                       args.save_every, procs)  # fmt: skip
        for s in args.sets:
            feats, computed = features_of(s, encoder, out, args.batch_size, args.save_every,
                                          procs)  # fmt: skip
            log(f"{s.name} / {e}: {len(feats)} features ({computed} encoded, "
                f"{len(feats) - computed} from the cache)")  # fmt: skip
            if not procs.lead:
                continue
            if text is not None and e == "clip":
                width = len(next(iter(text.values())))
                if feats.shape[1] != width:
                    raise EvaluateError(f"--clip-text gives {width}-wide text embeddings but "
                                        f"the --clip image features are {feats.shape[1]} wide: "
                                        "use the two towers of one CLIP model")  # fmt: skip
            m = set_metrics(feats, s.prompts, reference, e, args.bootstrap, args.seed,
                            text if e == "clip" else None, prdc_k=args.prdc_k)  # fmt: skip
            entry = results["sets"].setdefault(s.name, {"folder": str(s.folder),
                                                        "method": s.method, "knobs": s.knobs,
                                                        "encoders": {}})  # fmt: skip
            entry["encoders"][e] = m
            if "prdc_skipped" in m["pooled"]:
                log(f"{s.name} / {e}: {m['pooled']['prdc_skipped']}")
            rows.append({"set": s.name, "method": s.method, "encoder": e, **m["pooled"]})
    if not procs.lead:
        processes.barrier(procs, "jaxdiv-evaluate-written")
        return json.loads((out / "results.json").read_text())
    _remove_stale_figures(out, results)
    run_folder.write_json(out / "results.json", results)
    write_tables(out, rows)
    log(f"wrote {out / 'results.json'}, table.md, table.csv")
    processes.barrier(procs, "jaxdiv-evaluate-written")
    return results


# what an evaluation (and jaxdiv plot) writes into --out besides results.json
FIGURES = ("pareto_*.png", "grid_p*.png")
RUN_FILES = ("table.md", "table.csv", "features", *FIGURES)


def _remove_stale_figures(out: Path, results: dict) -> None:
    """``jaxdiv plot``'s figures drawn from an earlier ``results.json`` that differs from
    the new one (other settings, other images) would no longer match it: they are removed
    (the feature cache stays); a rerun with the same results keeps them."""
    try:
        old = (out / "results.json").read_bytes()
    except OSError:
        return
    if old == json.dumps(results, indent=1, default=float).encode("utf-8"):
        return
    stale = sorted(p for pat in FIGURES for p in out.glob(pat))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} figures drawn from the earlier results.json, which this "
            "run changed; jaxdiv plot draws them again")  # fmt: skip


def main(argv=None, prog: str = "python -m experiments.evaluate") -> int:
    """Run the command line: 0 on success, exit 2 for a refused input, 1 for a failure."""
    args = parse_args(argv, prog)
    procs = args.processes
    try:
        processes.initialize(procs)
    except ValueError as err:
        args._parser.error(str(err))
    lock, failure = processes.lock_output(args.out, procs)
    job = {k: getattr(args, k) for k in ("encoder_list", "clip", "dinov2", "clip_text",
                                         "batch_size", "save_every", "bootstrap", "seed",
                                         "prdc_k")}
    job.update(images=[str(s.folder) for s in args.sets], out=str(Path(args.out).resolve()),
               reference=None if args.ref_set is None else str(args.ref_set.folder))  # fmt: skip
    if failure is None:
        try:  # not into a model folder, an image folder or another command's output
            run_folder.refuse_foreign(args.out, "results.json", RUN_FILES, "evaluate")
        except run_folder.FolderError as err:
            failure = f"--out {err}"
    reason = processes.agree(procs, failure is None, processes.fingerprint(job))
    if failure is not None or reason is not None:
        lock.release()
        return _fail(args, failure or reason, 2)
    if procs.multi:
        _PREFIX[0] = f"evaluate {procs.index}/{procs.num}"
    try:
        with quiet(getattr(args, "quiet", False)):
            run(args)
    except EvaluateError as err:
        lock.release()
        return _fail(args, str(err), 1)
    finally:
        _PREFIX[0] = "evaluate"
        lock.release()
    return 0


def _fail(args, message: str, code: int) -> int:
    return processes.fail(args.processes, args._parser, message, code)


if __name__ == "__main__":
    sys.exit(main())
