"""Feature extraction speed of ``experiments.evaluate``'s encoders vs transformers.

For each encoder a random transformers model of the released shape is built
(``torch.manual_seed``), saved with ``save_pretrained`` and loaded back by
:func:`experiments.evaluate.load_encoder`, so both sides hold the same weights. One batch
of ``--batch`` random uint8 images of ``--image`` px is encoded by

* jaxdiv: ``load_encoder(...).encode`` -- the processor's steps in JAX (PIL-exact bicubic
  resize, centre crop, normalise) and the Flax tower, one jitted program;
* transformers: the image processor (PIL backend) and the PyTorch tower under
  ``torch.no_grad``;

their features are compared, then the two alternate A B A B over ``--rounds`` rounds
(:func:`benchmarks.timing.interleaved`). The JSON reports seconds per batch (median
[min-max]) and the implied seconds per 1,000 images.

Configs (``--configs``, comma-separated):
  * ``tiny``: the test suite's tiny towers (seconds);
  * ``clip-vit-l14``: CLIP ViT-L/14's vision tower with projection (304M parameters);
  * ``dinov2-base``: ``facebook/dinov2-base``'s shape (86M parameters, patch 14).

Run (CPU):
    JAX_PLATFORMS=cpu python -m benchmarks.evaluate_encoders --configs clip-vit-l14,dinov2-base \\
        --batch 8 --rounds 3

Writes ``results/benchmarks/evaluate_encoders.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.sd3_step import peak_rss_gb
from benchmarks.timing import interleaved, round_ratio_range, version

CLIP_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                hidden_act="quick_gelu")  # fmt: skip
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                   image_size=518, mlp_ratio=4, layer_norm_eps=1e-6)  # fmt: skip
TINY_DINOV2 = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                   image_size=32)  # fmt: skip


def _configs() -> dict[str, tuple[str, dict]]:
    from jaxdiv.testing import TINY_VISION

    return {
        "tiny": ("clip", TINY_VISION),
        "tiny-dinov2": ("dinov2", TINY_DINOV2),
        "clip-vit-l14": ("clip", CLIP_L14),
        "dinov2-base": ("dinov2", DINOV2_BASE),
    }


def measure(name: str, *, batch: int, image: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Build, compare and time one encoder config; returns a result row."""
    import jax
    import torch
    import transformers

    from experiments.evaluate import load_encoder

    kind, config = _configs()[name]
    torch.manual_seed(seed)
    if kind == "clip":
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config))
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": config["image_size"]},
            crop_size={"height": config["image_size"], "width": config["image_size"]})
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**config))
        processor = transformers.BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
            do_convert_rgb=True)  # facebook/dinov2-*'s preprocessor_config.json
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        encoder = load_encoder(kind, folder, batch)
    images = np.random.default_rng(seed).integers(0, 256, (batch, image, image, 3), np.uint8)

    def run_jax():
        return encoder.encode(images)

    def run_torch():
        with torch.no_grad():
            x = processor(list(images), return_tensors="pt")["pixel_values"]
            out = model(pixel_values=x)
            return (out.image_embeds if kind == "clip" else out.pooler_output).numpy()

    ours, ref = run_jax(), run_torch()
    diff = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    timed = interleaved({"jax": run_jax, "torch": run_torch}, rounds)  # A B A B
    jax_s, torch_s = timed["jax"]["median_s"], timed["torch"]["median_s"]
    return dict(
        config=name, encoder=kind, model_config=config, params=int(params), batch=batch,
        image_px=image, rounds=rounds, jax_s=jax_s, torch_s=torch_s,
        jax_min_max_s=[timed["jax"]["min_s"], timed["jax"]["max_s"]],
        torch_min_max_s=[timed["torch"]["min_s"], timed["torch"]["max_s"]],
        jax_runs_s=timed["jax"]["runs_s"], torch_runs_s=timed["torch"]["runs_s"],
        jax_s_per_1000_images=jax_s * 1000 / batch,
        torch_s_per_1000_images=torch_s * 1000 / batch,
        ratio_torch_over_jax=torch_s / jax_s,
        ratio_min_max=round_ratio_range(timed, "torch", "jax"),
        max_abs_diff=diff, max_abs_output=scale,
        timing="interleaved A B A B after one warm-up each, median [min-max]; both include "
        "preprocessing from uint8 images",
        devices=[str(d) for d in jax.devices()],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, write the JSON; returns the written dict."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate_encoders",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--configs", default="tiny", help=",".join(_configs()))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=256, help="side of the input images (px)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/benchmarks/evaluate_encoders.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in _configs()]
    if unknown or not names:
        parser.error(f"--configs: unknown {', '.join(unknown) or '(empty)'}; choose from "
                     f"{', '.join(_configs())}")  # fmt: skip
    for flag, value in (("--batch", args.batch), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.image < 32:
        parser.error(f"--image must be >= 32 px, got {args.image}")
    rows = []
    for name in names:
        row = measure(name, batch=args.batch, image=args.image, rounds=args.rounds,
                      seed=args.seed)  # fmt: skip
        rows.append(row)
        print(f"evaluate_encoders {name} ({row['params'] / 1e6:.4g}M params, batch "
              f"{row['batch']}, {row['image_px']} px): jaxdiv {row['jax_s']:.3f} s/batch "
              f"({row['jax_s_per_1000_images']:.0f} s per 1000 images), transformers "
              f"{row['torch_s']:.3f} s/batch, transformers/jaxdiv "
              f"{row['ratio_torch_over_jax']:.2f}x, max|diff| {row['max_abs_diff']:.1e}",
              flush=True)  # fmt: skip
    import jax
    import transformers

    result = dict(
        benchmark="experiments.evaluate encoders: uint8 images -> features, jaxdiv vs "
                  "transformers (processor + PyTorch tower), fp32",
        command=" ".join(["python -m benchmarks.evaluate_encoders"]
                         + list(sys.argv[1:] if argv is None else argv)),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions=dict(jax=jax.__version__, jaxlib=version("jaxlib"), flax=version("flax"),
                      torch=torch.__version__, transformers=transformers.__version__,
                      numpy=np.__version__, python=platform.python_version()),
        threads=dict(torch_threads=torch.get_num_threads(),
                     env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS",
                                                         "JAX_PLATFORMS")},
                     cpu_affinity=sorted(os.sched_getaffinity(0)), cpu_count=os.cpu_count()),
        load_average=list(os.getloadavg()),
        peak_rss_gb=peak_rss_gb(),
        rows=rows,
    )  # fmt: skip
    from experiments.common import write_json

    write_json(Path(args.out), result)
    print(f"wrote {args.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
