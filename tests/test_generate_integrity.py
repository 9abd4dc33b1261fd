"""Integrity of long runs: ``experiments.generate`` and :mod:`experiments.run_folder`.

On a tiny random Stable Diffusion folder (16x16 images, 2 DDIM steps), each test attacks
one promise of the README's "Guarantees" and compares the images byte for byte with an
uninterrupted run (made in this process; the subprocesses must produce the same bytes):

* two runs started together into one folder: one wins, the other fails naming the owner,
  the folder holds the winner's images only; a lock left by a dead run is taken over;
* SIGKILL mid-run, then the same command: resumes and ends byte-identical;
* a full disk (the writer raises ENOSPC at the k-th file, settings or image) and a rerun;
* zero-byte, truncated, non-PNG and wrong-size images are found and regenerated;
* NaN / inf (a huge --cfg, NaN weights in the UNet, text encoder or VAE): no image
  written, the error names the images, the step and the cause;
* files take their mode from the umask;
* bad option values and output folders fail before the model loads, in one line.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import generate, run_folder
from jaxdiv.pipelines import stable_diffusion

pytest.importorskip("diffusers")  # the random folder is built by diffusers / transformers

REPO = Path(__file__).resolve().parents[1]
ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    HF_HUB_OFFLINE="1",
    OPENBLAS_NUM_THREADS="1",
    OMP_NUM_THREADS="1",
    PYTHONPATH=str(REPO),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # the subprocesses share their compiles
)


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxdiv.testing import save_random_pipeline

    folder = tmp_path_factory.mktemp("sd_tiny_integrity")
    save_random_pipeline(folder, seed=0)
    return folder


def argv(model, out, n=4, seed=0, cfg="3"):
    return [
        "--model",
        str(model),
        "--prompt",
        "a cat",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--cfg",
        cfg,
        "--batch-size",
        "1",
        "--n",
        str(n),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def images(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "images").glob("*.png"))}


def clean(out) -> bool:
    """No temp file and no lock left behind."""
    return not list(Path(out).rglob("*.tmp")) and not (Path(out) / run_folder.LOCK_NAME).exists()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """Bytes of an uninterrupted in-process run, by seed (n = 24, a superset of every test)."""
    cache = {}

    def get(seed=0):
        if seed not in cache:
            out = tmp_path_factory.mktemp(f"reference{seed}")
            assert generate.main(argv(model, out, n=24, seed=seed)) == 0
            cache[seed] = images(out)
        return cache[seed]

    return get


def matches(out, ref, n):
    got = images(out)
    assert sorted(got) == [generate.image_name(0, i) for i in range(n)]
    return all(got[k] == ref[k] for k in got)


def popen(args):
    cmd = [sys.executable, "-m", "experiments.generate", *args]
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=pipe, stderr=pipe, text=True)


# -- locking ---------------------------------------------------------------------------


def test_two_runs_started_together_never_share_a_folder(model, reference, tmp_path, capsys):
    out = tmp_path / "shared"
    runs = {seed: popen(argv(model, out, n=8, seed=seed)) for seed in (0, 1)}
    deadline = time.monotonic() + 600
    while all(p.poll() is None for p in runs.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    first = next(seed for seed, p in runs.items() if p.poll() is not None)
    winner = 1 - first
    if runs[winner].poll() is None:  # a third run, in this process, while the winner runs
        try:
            code = generate.main(argv(model, out, n=8, seed=winner))
        except SystemExit as exit_info:
            code = exit_info.code
        err = capsys.readouterr().err
        assert code in (0, 2)  # 0: the winner had just finished, this run found all done
        if code == 2:
            assert f"is in use by another run (pid {runs[winner].pid} on host" in err
    results = {seed: (p.wait(timeout=600), *p.communicate()) for seed, p in runs.items()}
    assert results[winner][0] == 0, results[winner][2]
    code, _, err = results[first]
    assert code == 2 and err.count("\n") == 1, err
    host = socket.gethostname()
    # (on a machine so loaded that the loser reached the folder only after the winner
    # finished, the settings check refuses it instead)
    assert (
        f"is in use by another run (pid {runs[winner].pid} on host {host}" in err
        or f"different settings (seed: {winner} -> {first})" in err
    ), err
    assert json.loads((out / "metadata.json").read_text())["settings"]["seed"] == winner
    assert matches(out, reference(winner), 8) and clean(out)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize(
    "content",
    [
        lambda: {"pid": dead_pid(), "host": socket.gethostname(), "started": time.time() - 60},
        lambda: "not json {",
        lambda: "",
    ],
    ids=["dead-pid", "garbage", "empty"],
)
def test_stale_lock_is_taken_over(model, reference, tmp_path, capsys, content):
    out = tmp_path / "stale"
    out.mkdir()
    c = content()
    (out / run_folder.LOCK_NAME).write_text(c if isinstance(c, str) else json.dumps(c))
    assert generate.main(argv(model, out, n=2)) == 0
    log = capsys.readouterr().out
    assert ("took over the lock of an earlier run" in log) == (c != "")
    if isinstance(c, dict):
        assert f"pid {c['pid']} on {c['host']}" in log
    assert matches(out, reference(), 2) and clean(out)


def test_a_killed_jobs_process_locks_are_taken_over_and_a_live_one_refused(
    model, reference, tmp_path, capsys
):
    """A one-process rerun of a two-process job's folder: process 1's lock file, left by
    the killed job, is deleted (this run covers its share; it stayed in the folder); while
    a live process holds it, the folder is in use."""
    out = tmp_path / "job"
    out.mkdir()
    other = out / f"{run_folder.LOCK_NAME}.1"
    with run_folder.FolderLock(out, other.name):  # a live process 1 of another job
        with pytest.raises(SystemExit) as info:
            generate.main(argv(model, out, n=2))
        assert info.value.code == 2 and "is in use by another run" in capsys.readouterr().err
        assert not (out / run_folder.LOCK_NAME).exists()  # the refused run's lock released
    other.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    assert generate.main(argv(model, out, n=2)) == 0
    assert not other.exists() and matches(out, reference(), 2) and clean(out)


def test_lock_without_flock_decides_by_pid_and_host(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owners = [
        ({"pid": sleeper.pid, "host": host}, True),
        ({"pid": 1, "host": "elsewhere"}, True),
        ({"pid": dead_pid(), "host": host}, False),
    ]
    try:
        for k, (owner, live) in enumerate(owners):
            folder = tmp_path / str(k)
            folder.mkdir()
            (folder / run_folder.LOCK_NAME).write_text(json.dumps(owner))
            if live:
                expected = f"in use by another run \\(pid {owner['pid']} on host {owner['host']}"
                with pytest.raises(run_folder.FolderError, match=expected):
                    run_folder.FolderLock(folder).acquire()
            else:
                with run_folder.FolderLock(folder) as lock:
                    assert lock.stale_owner == owner
                    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
                assert not lock.path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_is_exclusive_within_one_process(tmp_path):
    with run_folder.FolderLock(tmp_path) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        for _ in range(2):
            with pytest.raises(run_folder.FolderError, match=f"pid {os.getpid()} on host"):
                run_folder.FolderLock(tmp_path).acquire()
    with run_folder.FolderLock(tmp_path):
        pass


# -- crashes: SIGKILL, full disk -------------------------------------------------------


def test_sigkill_mid_run_then_rerun_resumes_byte_identical(model, reference, tmp_path, capsys):
    ref = reference()
    out = tmp_path / "killed"
    proc = popen(argv(model, out, n=24))
    deadline = time.monotonic() + 600
    while not list((out / "images").glob("p*.png")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.communicate()
    written = images(out)
    assert 1 <= len(written) < 24, "the run was not killed mid-way"
    assert (out / "metadata.json").is_file()  # settings written before the first image
    assert all(ref[k] == v for k, v in written.items() if v)  # atomic: whole files only
    assert generate.main(argv(model, out, n=24)) == 0
    log = capsys.readouterr().out
    assert f"took over the lock of an earlier run that is gone (pid {proc.pid} on" in log
    assert "resuming" in log
    assert matches(out, ref, 24) and clean(out)


# the writes are: settings, image 0, metadata, image 1, ...; the disk fills up at write k
@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_full_disk_then_rerun_resumes_byte_identical(
    model, reference, tmp_path, monkeypatch, capsys, fail_at
):
    ref = reference()
    out = tmp_path / "full"
    real = run_folder.atomic_write
    calls = []

    def disk_full_after(path, data):
        calls.append(Path(path).name)
        if len(calls) > fail_at:  # what a dying writer leaves: a partial temp file
            (Path(path).parent / f".{Path(path).name}.x1y2.tmp").write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, f"cannot write {str(path)!r}: No space left on device")
        real(path, data)

    monkeypatch.setattr(run_folder, "atomic_write", disk_full_after)
    assert generate.main(argv(model, out, n=4)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and calls[-1] in err
    assert calls[0] == "metadata.json"  # the settings come first
    assert len(images(out)) == fail_at // 2
    monkeypatch.setattr(run_folder, "atomic_write", real)
    assert generate.main(argv(model, out, n=4)) == 0
    assert matches(out, ref, 4) and clean(out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["images_done"] == 4 and meta["generated_this_run"] == 4 - fail_at // 2


def test_a_run_stopped_before_its_final_metadata_is_finished_by_a_rerun(
    model, reference, tmp_path, monkeypatch, capsys
):
    """Every image written, then the final metadata.json (image list, grid) lost: a rerun
    has nothing to generate and must still finish the folder, or ``evaluate`` refuses it
    for good (the rerun used to exit 0 leaving it unfinished)."""
    from experiments import evaluate

    ref = reference()
    out = tmp_path / "last_write"
    real = run_folder.atomic_write

    def fail_final(path, data):
        if Path(path).name == "metadata.json" and b'"grid"' in data:
            raise OSError(errno.ENOSPC, f"cannot write {str(path)!r}: No space left on device")
        real(path, data)

    monkeypatch.setattr(run_folder, "atomic_write", fail_final)
    assert generate.main(argv(model, out, n=4)) == 1
    capsys.readouterr()
    assert matches(out, ref, 4)
    assert "images" not in json.loads((out / "metadata.json").read_text())
    with pytest.raises(evaluate.EvaluateError, match="not a finished"):
        evaluate.read_image_set(out)
    monkeypatch.setattr(run_folder, "atomic_write", real)
    assert generate.main(argv(model, out, n=4)) == 0
    assert "already in" in capsys.readouterr().out
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["images_done"] == 4 and meta["grid"] == "grid.png"
    assert [m["file"] for m in meta["images"]] == [
        f"images/{generate.image_name(0, i)}" for i in range(4)
    ]
    assert (meta["generated_this_run"], meta["skipped_this_run"]) == (0, 4)
    assert len(evaluate.read_image_set(out).files) == 4 and clean(out)


def test_a_rerun_with_a_smaller_n_is_refused(model, tmp_path, capsys):
    """A larger --n adds images (tests/test_pipeline_sd.py); a smaller one used to exit 0
    rewriting the grid with fewer images while metadata.json kept listing them all (and
    after a damaged image, the opposite: a short list beside images on disk). Now it is
    refused before the model loads, naming both values, and the folder is untouched."""
    out = tmp_path / "fewer"
    assert generate.main(argv(model, out, n=2)) == 0
    capsys.readouterr()
    kept = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["n"] == 2 and len(meta["images"]) == 2

    def refused(expected_n):
        with pytest.raises(SystemExit) as info:
            generate.main(argv(model, out, n=1))
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1, err
        assert f"holds a run with --n {expected_n}, got --n 1" in err, err
        assert f"rerun with --n {expected_n} or more, or choose another --out" in err, err

    refused(2)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    # a folder written before n was recorded: its finished image list says how many
    del meta["n"]
    (out / "metadata.json").write_text(json.dumps(meta))
    refused(2)
    assert len(images(out)) == 2 and clean(out)


# -- damaged images --------------------------------------------------------------------


def test_damaged_images_are_regenerated(model, reference, tmp_path, capsys):
    from PIL import Image

    ref = reference()
    out = tmp_path / "damaged"
    assert generate.main(argv(model, out, n=5)) == 0
    d = out / "images"
    names = [generate.image_name(0, i) for i in range(5)]
    (d / names[0]).write_bytes(b"")
    (d / names[1]).write_bytes(ref[names[1]][: len(ref[names[1]]) // 2])
    (d / names[2]).write_bytes(ref[names[2]][:-1])  # only the last CRC byte missing
    (d / names[3]).write_bytes(b"GIF89a not a png at all")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / names[4])  # wrong size
    capsys.readouterr()
    assert generate.main(argv(model, out, n=5)) == 0
    log = capsys.readouterr().out
    assert "5 damaged images, generating them again" in log
    for name, why in zip(
        names,
        ["empty (0 bytes)", "truncated", "truncated", "not a PNG", "size 8x8, expected 16x16"],
        strict=True,
    ):
        assert f"images/{name} ({why}" in log
    assert matches(out, ref, 5) and clean(out)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["generated_this_run"] == 5 and meta["grid"] == "grid.png"


# -- non-finite values -----------------------------------------------------------------


def poisoned_pipe(component):
    """The loaded tiny pipeline with one weight of ``component`` set to NaN (the compiled
    programs are reused: weights are traced arguments)."""
    pipe = next(iter(generate._LOADED.values()))
    flat, tree = jax.tree_util.tree_flatten_with_path(getattr(pipe, component))
    leaves = [leaf for _, leaf in flat]
    k = next(i for i, (path, _) in enumerate(flat) if "params" in jax.tree_util.keystr(path))
    leaves[k] = leaves[k].at[(0,) * leaves[k].ndim].set(np.nan)
    return pipe._replace(**{component: jax.tree_util.tree_unflatten(tree, leaves)})


@pytest.mark.parametrize(
    "case, where, cause",
    [
        # where the overflow first shows depends on whether a * b + c is one fused multiply-add
        pytest.param("cfg", r"in the guided prediction x0_hat at step \d/2",
                     r"--cfg 1e\+38 is so large", marks=pytest.mark.exact_codegen),
        ("denoiser", r"in the guided prediction x0_hat at step 1/2", r"non-finite weights .*unet"),
        (
            "encode_prompt",
            r"in the text encoder's embedding of --prompt 'a cat'",
            r"non-finite weights .*text_encoder",
        ),
        (
            "decode",
            r"in the VAE decoder \(the final latents are finite\)",
            r"non-finite weights .*vae",
        ),
    ],
)
def test_non_finite_values_never_become_images(
    model, reference, tmp_path, monkeypatch, capsys, case, where, cause
):
    reference()  # the tiny pipeline is loaded in this process
    cfg = "1e38" if case == "cfg" else "3"
    if case != "cfg":
        bad = poisoned_pipe(case)
        monkeypatch.setattr(generate, "_LOADED", {})
        monkeypatch.setattr(stable_diffusion, "load", lambda *a, **k: bad)
    out = tmp_path / case
    assert generate.main(argv(model, out, n=2, cfg=cfg)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    if case != "encode_prompt":
        assert "non-finite values (NaN or inf) in images/p000_i0000.png, not written" in err
    assert re.search(where, err) and re.search(cause, err), err
    assert not images(out) and not (out / "grid.png").exists()
    if case != "encode_prompt":  # the prompt is checked before the settings are written
        assert json.loads((out / "metadata.json").read_text())["images_done"] == 0
    assert clean(out)


# -- file modes ------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_respect_the_umask(model, reference, tmp_path, umask):
    reference()
    old = os.umask(umask)
    try:
        out = tmp_path / "modes"
        assert generate.main(argv(model, out, n=1)) == 0
    finally:
        os.umask(old)
    for f in [out / "metadata.json", out / "grid.png", out / "images" / "p000_i0000.png"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    for d in [out, out / "images"]:
        assert d.stat().st_mode & 0o777 == 0o777 & ~umask, d


# -- bad values fail before the model loads --------------------------------------------


def _writable(folder) -> bool:
    """Whether a file can be created in ``folder`` (``os.access`` says yes to root)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _readonly_folder(tmp, monkeypatch):
    folder = tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if _writable(folder):  # root writes anyway: make the write probe fail as it would
        real = run_folder.tempfile.mkstemp

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(run_folder.tempfile, "mkstemp", refuse)
    return folder


BAD = {
    "eta-nan": (["--eta", "nan"], "--eta must be a finite number, got nan"),
    "eta-inf": (["--eta", "inf"], "--eta must be a finite number, got inf"),
    "eta-negative": (["--eta", "-0.5"], "--eta must be >= 0, got -0.5"),
    "s-churn-negative": (["--sampler", "edm", "--s-churn", "-1"], "--s-churn must be >= 0, got -1"),
    "eta-above-1": (["--eta", "1.5"], "--eta must be <= 1 (above 1 DDIM's step noise"),
    "cfg-nan": (["--cfg", "nan"], "--cfg must be a finite number, got nan"),
    "cfg-inf": (["--cfg=-inf"], "--cfg must be a finite number, got -inf"),
    "s-churn-nan": (["--sampler", "edm", "--s-churn", "nan"], "--s-churn must be a finite number"),
    # a sampler's own flag with another sampler, a negative prompt without a negative
    # branch: settings that could never take effect
    "eta-with-edm": (["--sampler", "edm", "--eta", "0.5"],
                     "--eta applies to --sampler ddim only, not to --sampler edm"),
    "s-churn-with-ddim": (["--s-churn", "1"], "--s-churn applies to --sampler edm only"),
    "karras-with-ddim": (["--no-karras"], "--karras / --no-karras applies to --sampler "
                                          "dpmpp_2m / dpmpp_2m_sde / dpmpp_3m_sde / euler only"),
    "karras-with-euler-ancestral": (["--sampler", "euler_ancestral", "--karras"],
                                    "not to --sampler euler_ancestral"),
    "clean-endpoint-with-dpmpp": (["--sampler", "dpmpp_2m", "--clean-endpoint"],
                                  "--clean-endpoint applies to --sampler ddim only"),
    "negative-prompt-cfg-1": (["--cfg", "1", "--negative-prompt", "blurry"],
                              "--negative-prompt has no effect with --cfg 1"),
    "interval-cfg-1": (["--cfg", "1", "--method", "interval"],
                       "--method interval with --cfg 1 guides nowhere"),
    "negative-prompt-tpso": (["--method", "tpso", "--tpso-projection", "none",
                              "--negative-prompt", "blurry"],
                             "--negative-prompt does not apply to --method tpso"),
    "steps-beyond": (["--steps", "2000"], "--steps 2000 is beyond the model's schedule (1000"),
    "steps-zero": (["--steps", "0"], "--steps must be >= 1, got 0"),
    "clip-skip-beyond": (["--clip-skip", "2"], "--clip-skip must be < 2, the text encoder's "
                                               "number of layers (its config.json), got 2"),
    "seed-float": (["--seed", "1e20"], "argument --seed: invalid int value: '1e20'"),
    "seed-huge": (["--seed", str(2**64)], "--seed must be an integer in [0, 2**63)"),
    "seed-negative": (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    "n-negative": (["--n", "-3"], "--n must be >= 1, got -3"),
    "n-zero": (["--n", "0"], "--n must be >= 1, got 0"),
    "batch-size-zero": (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    "height-negative": (["--height", "-16"], "--height must be >= 1, got -16"),
    "width-zero": (["--width", "0"], "--width must be >= 1, got 0"),
    # read from the UNet and VAE configs, before the weights load
    "height-not-a-multiple": (["--height", "18"], "--height must be a positive multiple of 4, "
                                                  "got 18 (the multiple comes from this model's "
                                                  "UNet and VAE configs)"),
    "image-encoder-unused": (["--image-encoder", "{file}"],
                             "--image-encoder applies to --method gass only, not to --method "
                             "none"),
    "image-encoder-not-a-model": (["--method", "gass", "--image-encoder", "{file}"],
                                  "is not a model folder (no config.json)"),
    "out-file": (["--out", "{file}"], "is a file, not a folder"),
    "out-under-file": (["--out", "{file}/sub"], "cannot create it (Not a directory)"),
    "out-readonly": (["--out", "{readonly}"], "not writable (Permission denied)"),
    "out-sysfs": (["--out", "/sys/fs"], "not writable"),
    # a folder of something else (here the model's own): never written into
    "out-model-folder": (["--out", "{model}"], "holds files that generate did not write "
                                               "(model_index.json, scheduler, text_encoder, "
                                               "tokenizer, unet and 1 more) and no "
                                               "metadata.json; choose a new or empty folder"),
}


@pytest.mark.parametrize("flags, message", [
    (["--gass-num-active", "3"], "--gass-num-active 3 exceeds --steps 2: GASS acts at most "
                                 "once per step, so the setting could never take effect; "
                                 "pass --gass-num-active 2 or fewer"),
    (["--gass-num-active", "20"], "--gass-num-active 20 exceeds --steps 2"),
])  # fmt: skip
def test_gass_num_active_beyond_steps_fails_before_the_model_loads(
    model, tmp_path, monkeypatch, capsys, flags, message
):
    """More GASS steps than sampler steps, asked for (it used to run every step, as
    --gass-num-active 2 would): refused with the other option checks, not after the model
    load. Left at its default, the paper's 20, it means every step (guidance.gass's
    default)."""
    for name, arch in (("clip_text", "CLIPTextModelWithProjection"),
                       ("clip_vision", "CLIPVisionModelWithProjection")):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"architectures": [arch]}))

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stable_diffusion, "load", no_load)
    monkeypatch.setattr(generate, "_LOADED", {})
    out = tmp_path / "never"
    base = argv(model, out, n=2)
    base[base.index("--batch-size") + 1] = "2"  # a coupled method needs two images a batch
    gass = ["--method", "gass", "--image-encoder", str(tmp_path / "clip_vision"),
            "--clip-projection", str(tmp_path / "clip_text")]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        generate.main(base + gass + flags)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()
    # the boundary and the default pass the option checks
    args = generate.parse_args(base + gass + ["--gass-num-active", "2"])
    assert args.method_knobs["num_active"] == 2
    assert generate.parse_args(base + gass).method_knobs["num_active"] == 20


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_fail_before_the_model_loads(model, tmp_path, monkeypatch, capsys, case):
    extra, message = BAD[case]
    if "{readonly}" in extra[-1]:
        extra = [extra[0], str(_readonly_folder(tmp_path, monkeypatch))]
    # a real read-only mount where the machine has one; the "readonly" case checks the
    # same refusal everywhere (with the write probe failing when root could write)
    if extra[-1] == "/sys/fs" and (not Path("/sys/fs").is_dir() or _writable("/sys/fs")):
        pytest.skip("no read-only /sys/fs here")
    file = tmp_path / "a_file"
    file.write_text("x")
    extra = [e.replace("{file}", str(file)).replace("{model}", str(model)) for e in extra]
    before = sorted(p.name for p in Path(model).iterdir())
    out = tmp_path / "never"

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stable_diffusion, "load", no_load)
    monkeypatch.setattr(generate, "_LOADED", {})
    with pytest.raises(SystemExit) as exit_info:
        generate.main(argv(model, out, n=2) + extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists() and file.read_text() == "x"
    assert sorted(p.name for p in Path(model).iterdir()) == before


def test_bad_values_from_the_shell_give_one_line_and_no_traceback(model, tmp_path):
    for extra in (["--eta", "nan"], ["--seed", "1e20"], ["--steps", "2000"]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.generate",
                *argv(model, tmp_path / "x", n=2),
                *extra,
            ],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("python -m experiments.generate: error: ")
    assert not (tmp_path / "x").exists()
