"""``experiments.evaluate``: image folders -> CLIP / DINOv2 features -> metric tables.

Tiny random encoders (saved by transformers) and small image folders in
``experiments.generate``'s layout; the numbers are meaningless, the tests prove the
machinery and the metrics' defining properties: the CLIP preprocessing equals
transformers' ``CLIPImageProcessor``; a set evaluated against itself has FD, CMMD ~ 0 and
the KID its unbiased estimator gives for identical sets (a closed form, negative); a
planted mode collapse lowers Vendi and raises MSS; the feature cache is reused,
an edited image alone is encoded again, and a run killed mid-way resumes to the same
tables byte for byte.
"""

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from experiments import evaluate  # noqa: E402
from experiments.generate import image_name  # noqa: E402

PROMPTS = ("a cat", "a dog")
N = 4  # images per prompt
SIZE = (24, 20)  # height, width of the test images


def _png(path, pixels):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _generate_like(folder, pixels, method="spell"):
    """A folder as ``experiments.generate`` leaves it: images/ and metadata.json."""
    entries = []
    for j, prompt in enumerate(PROMPTS):
        for i in range(N):
            _png(folder / "images" / image_name(j, i), pixels[j * N + i])
            entries.append({"file": f"images/{image_name(j, i)}", "prompt_index": j,
                            "prompt": prompt, "image_index": i})  # fmt: skip
    meta = {"settings": {"method": method, "method_knobs": {"overcompensation": 1.6}},
            "images": entries}  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    import torch
    import transformers

    from jaxdiv.testing import TINY_VISION

    torch.manual_seed(0)
    clip = tmp_path_factory.mktemp("clip_vision")
    config = transformers.CLIPVisionConfig(**TINY_VISION)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(clip)
    dino = tmp_path_factory.mktemp("dinov2")
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       patch_size=16, image_size=32)  # fmt: skip
    transformers.Dinov2Model(config).save_pretrained(dino)
    return clip, dino


@pytest.fixture(scope="module")
def clip_text(tmp_path_factory):
    """The text tower of the tiny CLIP (projection width 16, as the vision tower's) with a
    tokenizer."""
    import transformers

    from jaxdiv.testing import TINY_TEXT, write_tiny_vocab

    folder = tmp_path_factory.mktemp("clip_text")
    bos, eos = write_tiny_vocab(folder)
    config = transformers.CLIPTextConfig(**TINY_TEXT, vocab_size=eos + 1, bos_token_id=bos,
                                         eos_token_id=eos)  # fmt: skip
    transformers.CLIPTextModelWithProjection(config).save_pretrained(folder)
    return folder


def test_clip_score_and_spp_match_their_definitions(encoders, folders, clip_text, tmp_path):
    """With ``--clip-text``: per prompt, CLIP score = mean of 100 max(cos(image, text), 0)
    computed here in NumPy from the cached image features and transformers' own text
    embedding; SPP is present and finite."""
    import torch
    import transformers

    out = tmp_path / "eval"
    argv = ["--images", str(folders[0]), "--encoders", "clip", "--clip", str(encoders[0]),
            "--clip-text", str(clip_text), "--out", str(out), "--bootstrap", "50"]  # fmt: skip
    assert evaluate.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    (cache,) = (out / "features").glob("diverse-*/clip-*.npz")
    with np.load(cache) as f:
        feats = dict(zip(f["files"], f["features"].astype(np.float64)))
    model = transformers.CLIPTextModelWithProjection.from_pretrained(clip_text).eval()
    tok = transformers.CLIPTokenizer(str(clip_text / "vocab.json"), str(clip_text / "merges.txt"))
    per = res["sets"]["diverse"]["encoders"]["clip"]["per_prompt"]
    for j, row in enumerate(per):
        ids = tok([row["prompt"]], padding="max_length", max_length=16, return_tensors="pt")
        with torch.no_grad():
            t = model(input_ids=ids.input_ids).text_embeds[0].double().numpy()
        x = np.stack([feats[f"images/{image_name(j, i)}"] for i in range(N)])
        cos = x @ t / (np.linalg.norm(x, axis=1) * np.linalg.norm(t))
        assert row["clip_score"] == pytest.approx(np.mean(100 * np.maximum(cos, 0)), abs=1e-3)
        assert np.isfinite(row["spp"]) and row["spp"] >= 0
    pooled = res["sets"]["diverse"]["encoders"]["clip"]["pooled"]
    assert pooled["clip_score_mean"] == pytest.approx(np.mean([r["clip_score"] for r in per]))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_sets")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (len(PROMPTS) * N, *SIZE, 3), dtype=np.uint8)
    diverse = _generate_like(root / "diverse", pixels)
    collapsed = pixels.copy()
    collapsed[1::2] = collapsed[0::2]  # half the images duplicate their neighbour
    collapsed = _generate_like(root / "collapsed", collapsed, method="none")
    return diverse, collapsed


def _cached(out, name, encoder):
    """The features ``experiments.evaluate`` cached for set ``name``, float64."""
    (cache,) = (out / "features").glob(f"{name}-*/{encoder}-*.npz")
    with np.load(cache) as f:
        return f["features"].astype(np.float64)


def _argv(encoders, folders, out, *extra):
    clip, dino = encoders
    diverse, collapsed = folders
    return ["--images", str(diverse), str(collapsed), "--reference", str(diverse),
            "--encoders", "clip,dinov2", "--clip", str(clip), "--dinov2", str(dino),
            "--out", str(out), "--batch-size", "3", "--bootstrap", "200", *extra]  # fmt: skip


def test_cmmd_is_computed_on_unit_embeddings():
    """CLIP's image embeddings are not normalised; CMMD's reference (google-research/cmmd,
    embedding.py) divides each by its norm before its RBF MMD (distance.py: sigma 10, x
    1000, the biased estimator). On raw embeddings of norm ~5-30 evaluate's figure was
    tens of times the reference's."""
    from experiments.evaluate import set_metrics

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 16)) * 5 + 1.0
    ref = rng.normal(size=(30, 16)) * 20

    def reference_cmmd(x, y):
        x, y = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (x, y))
        k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * 10.0**2))  # noqa: E731
        return 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())

    got = set_metrics(feats.astype(np.float32), ["a"] * 40, ref.astype(np.float32), "clip",
                      bootstrap=0, seed=0)["pooled"]["cmmd"]  # fmt: skip
    assert got == pytest.approx(reference_cmmd(feats, ref), rel=1e-3)


def test_spp_of_a_prompt_does_not_depend_on_its_place_in_the_folder():
    """SPP's random u_ind search was keyed by the prompt's index in the folder: the same
    images in another order scored otherwise (1.31 against 1.01 in the audit's repro).
    Also: each pooled mean says how many prompts it covers (one-image prompts have no
    Vendi / MSS / SPP)."""
    from experiments.evaluate import set_metrics

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(9, 16)).astype(np.float32)
    prompts = ["a"] * 4 + ["b"] * 4 + ["c"]
    text = {p: rng.normal(size=16).astype(np.float32) for p in "abc"}
    order = [4, 5, 6, 7, 0, 1, 2, 3, 8]  # prompt b first
    runs = [set_metrics(f, p, None, "clip", bootstrap=0, seed=0, text=text)
            for f, p in ((feats, prompts), (feats[order], [prompts[i] for i in order]))]
    spp = [{r["prompt"]: r.get("spp") for r in run["per_prompt"]} for run in runs]
    assert spp[0] == spp[1] and spp[0]["c"] is None
    pooled = runs[0]["pooled"]
    assert (pooled["vendi_prompts"], pooled["spp_prompts"], pooled["clip_score_prompts"]) == (
        2, 2, 3)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG reads as its 8-bit version (PIL's convert("RGB") clipped it:
    every pixel above 255 of 65535 turned white); 32-bit float images are refused."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    got = evaluate.load_rgb(tmp_path / "g16.png")
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, -1))
    assert np.mean(got == 255) < 0.01  # the clipped read had 99.6% white
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(evaluate.EvaluateError, match="32-bit float image: it has no defined"):
        evaluate.load_rgb(tmp_path / "f.tiff")


def test_clip_preprocessing_is_the_clip_image_processor():
    """``dinov2_preprocess`` at CLIP's size, mean and std is ``CLIPImageProcessor``
    (PIL backend: bicubic short side to 224, centre crop, rescale, normalise)."""
    import transformers

    from jaxdiv.models.dinov2 import dinov2_preprocess

    processor = transformers.CLIPImageProcessor()
    rng = np.random.default_rng(1)
    for h, w in ((300, 400), (257, 224), (500, 333)):
        images = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        want = processor(list(images), return_tensors="np")["pixel_values"]  # NCHW
        got = dinov2_preprocess(images, size=224, crop_size=224, **evaluate.CLIP_PROCESSOR)
        np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=0,
                                   atol=1e-6)  # fmt: skip


def test_evaluate_tables_caching_and_planted_collapse(encoders, folders, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(_argv(encoders, folders, out)) == 0
    res = json.loads((out / "results.json").read_text())
    first = {f: (out / f).read_bytes() for f in ("results.json", "table.md", "table.csv")}
    assert evaluate.main(_argv(encoders, folders, tmp_path / "k1", "--prdc-k", "1")) == 0
    one = json.loads((tmp_path / "k1" / "results.json").read_text())
    assert one["settings"]["prdc_k"] == 1 and res["settings"]["prdc_k"] == 5
    for enc in ("clip", "dinov2"):
        d = res["sets"]["diverse"]["encoders"][enc]["pooled"]
        c = res["sets"]["collapsed"]["encoders"][enc]["pooled"]
        # against itself: FD vanishes; KID's unbiased estimator does not: with every
        # subset the whole set (m = 8) it is 2 (S / m - D) / (m (m - 1)) < 0 exactly, S the
        # sum and D the trace of the cubic kernel matrix (x.y / dim + 1)^3
        assert abs(d["fd"]) < 1e-3
        x = _cached(out, "diverse", enc)
        k = (x @ x.T / x.shape[1] + 1.0) ** 3
        m = len(x)
        want = 2 * (k.sum() / m - np.trace(k)) / (m * (m - 1))
        assert want < 0 and d["kid_mean"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        # subsets differ only in order: the std is fp32 rounding of sums whose terms are
        # ~1 while their result cancels to ~3e-3 (1.1e-4 |want| on an AMD EPYC host), not
        # sampling spread, which would be of the order of |want|
        assert d["kid_std"] < 1e-3 * abs(want)
        assert d["precision"] == d["recall"] == d["coverage"] == 1.0
        # the planted collapse: fewer effective samples, more self-similar
        # (random tiny encoders map noise images to nearly parallel features, so the sizes
        # of the changes are small; their signs are the property)
        assert c["vendi_mean"] < d["vendi_mean"] and c["mss_mean"] > d["mss_mean"]
        lo, hi = d["vendi_ci95"]
        assert lo <= d["vendi_mean"] <= hi
        per = res["sets"]["collapsed"]["encoders"][enc]["per_prompt"]
        assert [p["prompt"] for p in per] == list(PROMPTS) and all(p["n"] == N for p in per)
        assert all(p["vendi"] <= N / 2 + 1e-3 for p in per)  # two distinct images of four
        # the recall / coverage of the collapse, exactly, with --prdc-k 1 (below): every
        # collapsed image's ball has radius 0 (its duplicate), so no real image lies
        # strictly inside one (recall 0); the real images it copies contain their copy, and
        # no other real ball reaches strictly past its own nearest neighbour (coverage 1/2)
        d1 = one["sets"]["diverse"]["encoders"][enc]["pooled"]
        c1 = one["sets"]["collapsed"]["encoders"][enc]["pooled"]
        assert (d1["recall"], d1["coverage"], d1["precision"]) == (1.0, 1.0, 1.0)
        assert (c1["recall"], c1["coverage"], c1["precision"]) == (0.0, 0.5, 1.0)
    assert abs(res["sets"]["diverse"]["encoders"]["clip"]["pooled"]["cmmd"]) < 1e-3
    # FD with 8 images in more dimensions (rank-deficient covariances) equals NumPy's
    # float64 closed form tr(S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))
    for enc in ("clip", "dinov2"):
        x, r = (_cached(out, name, enc) for name in ("collapsed", "diverse"))
        assert x.shape[0] < x.shape[1], x.shape
        (m1, s1), (m2, s2) = [(f.mean(0), np.cov(f, rowvar=False)) for f in (x, r)]
        w, v = np.linalg.eigh(s1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        lam = np.linalg.eigvalsh(root @ s2 @ root)
        want = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum()
        got = res["sets"]["collapsed"]["encoders"][enc]["pooled"]["fd"]
        assert got == pytest.approx(want, rel=1e-6), (enc, got, want)
    assert res["sets"]["collapsed"]["method"] == "none"
    assert "prdc_skipped" not in res["sets"]["collapsed"]["encoders"]["clip"]["pooled"]
    assert "| collapsed | none | dinov2 |" in first["table.md"].decode()
    log = capsys.readouterr().out
    assert "diverse / clip: 8/8 images encoded" in log  # as the reference, first
    assert "diverse / clip: 8 features (0 encoded, 8 from the cache)" in log

    # the figures: the diverse folder (FD ~ 0, higher Vendi) alone is on the front
    from PIL import Image

    from experiments import plot_eval, sd_methods

    assert plot_eval.main([str(out), "--images", "3"]) == 0
    log = capsys.readouterr().out
    assert log.count("(front: diverse (spell))") == 2
    for name in ("pareto_clip.png", "pareto_dinov2.png", "grid_p000.png", "grid_p001.png"):
        with Image.open(out / name) as im:
            im.load()
            if name.startswith("grid"):  # a row per folder, three images of the prompt
                assert im.size == (sd_methods.LABEL_WIDTH + 3 * SIZE[1], 2 * SIZE[0])
    for bad in ("nonsense", "n"):  # n counts the images: not a metric to plot
        with pytest.raises(SystemExit):
            plot_eval.main([str(out), "--x", bad])
        assert "--x must be one of" in capsys.readouterr().err
    # metrics without a bootstrap interval on either axis (was a TypeError on --y fd)
    assert plot_eval.main([str(out), "--x", "kid_mean", "--y", "fd", "--images", "1"]) == 0
    log = capsys.readouterr().out
    assert log.count("(front: diverse (spell))") == 2
    # a pair of metrics this evaluation lacks (no --clip-text): said why; the grids drawn
    (out / "grid_p000.png").unlink()
    assert plot_eval.main([str(out), "--x", "clip_score_mean", "--y", "vendi_mean"]) == 0
    log = capsys.readouterr().out
    assert ("no pareto_clip.png: no folder has both clip_score_mean and vendi_mean for encoder "
            "clip (clip_score_mean needs evaluate --clip-text (CLIP only))") in log, log
    assert "wrote 2 prompt grids" in log and (out / "grid_p000.png").is_file()
    # an evaluation (or another plot) writing there holds the folder
    from experiments import run_folder

    with run_folder.FolderLock(out), pytest.raises(SystemExit):
        plot_eval.main([str(out)])
    assert "is in use by another run" in capsys.readouterr().err

    # the same command again: every feature from the cache, the same tables and figures
    assert evaluate.main(_argv(encoders, folders, out)) == 0
    log = capsys.readouterr().out
    assert "(0 encoded, 8 from the cache)" in log and " encoded, 0 from" not in log
    assert {f: (out / f).read_bytes() for f in first} == first
    assert (out / "pareto_clip.png").is_file() and "removed" not in log

    # an edited image is encoded again, alone
    edited = folders[1] / "images" / image_name(1, 3)
    original = edited.read_bytes()
    try:
        _png(edited, np.full((*SIZE, 3), 7, np.uint8))
        assert evaluate.main(_argv(encoders, folders, out)) == 0
        log = capsys.readouterr().out
        assert "collapsed / clip: 8 features (1 encoded, 7 from the cache)" in log
        # the figures of the earlier results no longer match them: removed, not mixed
        assert "removed 4 figures drawn from the earlier results.json" in log, log
        assert not list(out.glob("pareto_*.png")) and not list(out.glob("grid_p*.png"))
    finally:
        edited.write_bytes(original)
    # with k as large as a set, no ball has k other points: PRDC is null, with the reason
    capsys.readouterr()
    assert evaluate.main(_argv(encoders, folders, tmp_path / "k8", "--prdc-k", str(N * 2))) == 0
    big = json.loads((tmp_path / "k8" / "results.json").read_text())
    pooled = big["sets"]["collapsed"]["encoders"]["clip"]["pooled"]
    assert pooled["precision"] is pooled["coverage"] is None and pooled["fd"] is not None
    why = f"PRDC needs more than --prdc-k {N * 2} images in both sets; this set has {N * 2}"
    assert pooled["prdc_skipped"].startswith(why)
    assert why in capsys.readouterr().out


def test_plain_image_folders_are_evaluated_and_drawn(encoders, folders, tmp_path, capsys):
    """Folders of bare images (no metadata.json: no prompts) are one set each, pooled; the
    figures give them one grid together, their first images row by row (they had none)."""
    from PIL import Image

    from experiments import plot_eval, sd_methods

    rng = np.random.default_rng(3)
    plain = []
    for name in ("photos_a", "photos_b"):
        plain.append(tmp_path / name)
        for i in range(5):
            _png(plain[-1] / f"{i:02d}.png", rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8))
    out = tmp_path / "eval"
    argv = ["--images", *map(str, plain), "--reference", str(folders[0]), "--encoders", "clip",
            "--clip", str(encoders[0]), "--out", str(out), "--bootstrap", "50"]  # fmt: skip
    assert evaluate.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    per = res["sets"]["photos_a"]["encoders"]["clip"]["per_prompt"]
    assert [(p["prompt"], p["n"]) for p in per] == [(None, 5)]
    assert plot_eval.main([str(out), "--images", "4"]) == 0
    assert "wrote 1 prompt grids" in capsys.readouterr().out
    with Image.open(out / "grid_p000.png") as im:
        assert im.size == (sd_methods.LABEL_WIDTH + 4 * SIZE[1], 2 * SIZE[0])
        grid = np.asarray(im.convert("RGB"))
    with Image.open(plain[1] / "03.png") as im:  # the second row's fourth tile
        want = np.asarray(im.convert("RGB"))
    left = sd_methods.LABEL_WIDTH + 3 * SIZE[1]
    np.testing.assert_array_equal(grid[SIZE[0]:, left:], want)


def test_a_run_killed_mid_way_resumes_to_the_same_tables(encoders, folders, tmp_path,
                                                         monkeypatch, capsys):  # fmt: skip
    clean = tmp_path / "clean"
    argv = ["--encoders", "clip"]
    assert evaluate.main(_argv(encoders, folders, clean, "--save-every", "1") + argv) == 0
    want = {f: (clean / f).read_bytes() for f in ("table.md", "table.csv")}

    real = evaluate.load_encoder
    calls = {"n": 0}

    def dying(*a, **k):
        enc = real(*a, **k)

        def encode(images):
            calls["n"] += 1
            if calls["n"] > 2:
                raise KeyboardInterrupt  # killed after two batches were cached
            return enc.encode(images)

        return enc._replace(encode=encode)

    out = tmp_path / "killed"
    monkeypatch.setattr(evaluate, "load_encoder", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(_argv(encoders, folders, out, "--save-every", "1") + argv)
    assert not (out / "table.md").exists()
    monkeypatch.setattr(evaluate, "load_encoder", real)
    capsys.readouterr()
    assert evaluate.main(_argv(encoders, folders, out, "--save-every", "1") + argv) == 0
    # two batches of three were cached before the kill: the last two images remain
    assert "diverse / clip: 2/2 images encoded" in capsys.readouterr().out
    assert {f: (out / f).read_bytes() for f in want} == want


@pytest.mark.parametrize("change, message", [
    (["--encoders", "clip,inception"], "--encoders: unknown inception"),
    (["--encoders", "dinov2", "--dinov2", "/nonexistent"], "is not a model folder"),
    # another kind of model: refused before any image is encoded, in one line
    (["--encoders", "clip,dinov2", "--dinov2", "{clip}"],
     "holds a 'clip_vision_model' model (config.json's model_type); --dinov2 needs one of "
     "('dinov2',)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--bootstrap", "-1"], "--bootstrap must be >= 0"),
    (["--images", "{empty}"], "holds no metadata.json and no PNG / JPEG images"),
    (["--images", "{broken}"], "images listed in metadata.json are missing"),
    (["--encoders", "dinov2", "--dinov2", "{dinov2}", "--clip-text", "{clip}"],
     "--clip-text needs --encoders clip"),
    (["--clip-text", "{clip}"], "holds no tokenizer files (vocab.json and merges.txt, or "
                                "tokenizer.json; in the folder or its tokenizer/)"),
    (["--prdc-k", "3"], "--prdc-k needs --reference"),  # it could never take effect
    # a folder of something else (a model's): never written into
    (["--out", "{clip}"], "holds files that evaluate did not write (config.json, "
                          "model.safetensors) and no results.json; choose a new or empty "
                          "folder"),
    # a run's images/ alone would lose their prompts (one pooled set); as --reference fine
    (["--images", "{images}"], "images/ folder of an experiments.generate run: pass the run "
                               "folder"),
])  # fmt: skip
def test_bad_inputs_are_refused_in_one_line(encoders, folders, tmp_path, capsys, change,
                                            message):  # fmt: skip
    clip, dinov2 = encoders
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text(json.dumps(
        {"images": [{"file": "images/x.png", "prompt": "a cat"}]}))  # fmt: skip
    change = [c.replace("{empty}", str(empty)).replace("{broken}", str(broken))
              .replace("{clip}", str(clip)).replace("{dinov2}", str(dinov2))
              .replace("{images}", str(folders[0] / "images"))
              for c in change]  # fmt: skip
    argv = ["--images", str(folders[0]), "--clip", str(clip), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        evaluate.main(argv + change)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
