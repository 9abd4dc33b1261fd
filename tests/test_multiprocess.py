"""Jobs of several processes (``jax.distributed``): ``experiments.generate`` / ``evaluate``
with ``--coordinator/--num-processes/--process-id``.

Two processes with 4 host CPU devices each, on localhost (gloo CPU collectives), with the
tiny random SD pipeline (16x16, 2 DDIM steps), compared byte for byte with a
one-process run made in this process:

* one process SIGKILL-ed mid-run (and the job with it, as a launcher would), then the
  job rerun with the same flags: each process regenerates only the missing part of its
  own share, and the union of the two processes' images, the grid and the settings equal
  the one-process run's;
* evaluate over two processes writes the same results.json, table.md and table.csv (and
  feature cache) as one process;
* bad values of the flags (and of their environment variables) are refused in one line
  before anything loads; processes started with different settings all stop in one line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import evaluate, generate, processes

pytest.importorskip("diffusers")  # the random folder is built by diffusers / transformers

REPO = Path(__file__).resolve().parents[1]
ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
    HF_HUB_OFFLINE="1",
    OPENBLAS_NUM_THREADS="1",
    OMP_NUM_THREADS="1",
    PYTHONPATH=str(REPO),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # the subprocesses share their compiles
)
for _name in ("JAXDIV_COORDINATOR", "JAXDIV_NUM_PROCESSES", "JAXDIV_PROCESS_ID",
              "SLURM_NTASKS", "SLURM_PROCID"):  # fmt: skip
    ENV.pop(_name, None)
PROMPTS = ("a cat", "a dog")
N, BS = 8, 2  # images per prompt, batch size: 4 batches per prompt, 8 jobs, 4 per process


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    ENV["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxdiv.testing import save_random_pipeline

    folder = tmp_path_factory.mktemp("sd_tiny_multiprocess")
    save_random_pipeline(folder, seed=0, image_encoder=True)
    return folder


def gen_argv(model, out, method="none"):
    return ["--model", str(model), "--prompt", *PROMPTS, "--sampler", "ddim", "--steps", "2",
            "--cfg", "3", "--batch-size", str(BS), "--n", str(N), "--seed", "0",
            "--method", method, "--out", str(out)]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(module, args, num=2):
    """``num`` processes of ``python -m module args`` joined on a free local port."""
    port = free_port()
    procs = []
    for i in range(num):
        cmd = [sys.executable, "-m", module, *args, "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(num), "--process-id", str(i)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def finish(procs, timeout=300):
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def images(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted((Path(out) / "images").glob("*.png"))}


def clean(out) -> bool:
    """No temp file, lock or progress file left behind."""
    out = Path(out)
    return not (list(out.rglob("*.tmp")) or list(out.glob(".run.lock*"))
                or (out / generate.PROGRESS_DIR).exists())  # fmt: skip


def share_of(index, num=2) -> set:
    """The image names process ``index`` of ``num`` generates (batches k % num == index)."""
    jobs = [(j, b) for j in range(len(PROMPTS)) for b in range(N // BS)]
    return {generate.image_name(j, i) for j, b in processes.share(jobs, processes.Processes(
        "h:1", num, index)) for i in range(b * BS, (b + 1) * BS)}  # fmt: skip


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """A one-process run in this process: its folder."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert generate.main(gen_argv(model, out)) == 0
    return out


def test_killed_process_resumes_its_own_share(model, reference, tmp_path):
    out = tmp_path / "killed"
    job = start_job("experiments.generate", gen_argv(model, out))
    mine = share_of(1)
    deadline = time.monotonic() + 300
    while not mine & {p.name for p in (out / "images").glob("p*.png")}:
        assert job[1].poll() is None and time.monotonic() < deadline, job[1].communicate()
        time.sleep(0.002)
    job[1].send_signal(signal.SIGKILL)  # process 1 dies after its first batch ...
    job[0].send_signal(signal.SIGKILL)  # ... and the launcher stops the job
    finish(job)
    first = set(images(out))
    assert 1 <= len(first & mine) < len(mine), "process 1 was not killed mid-way"
    ref = images(reference)
    assert all(ref[k] == v for k, v in images(out).items())  # whole files only

    results = finish(start_job("experiments.generate", gen_argv(model, out)))
    for code, _, err in results:
        assert code == 0, err
    # the union of the two shares is the one-process run: images, grid and settings
    assert images(out) == ref
    assert (out / "grid.png").read_bytes() == (reference / "grid.png").read_bytes()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["settings"] == json.loads((reference / "metadata.json").read_text())["settings"]
    runs = meta["processes"]["runs"]
    assert [r["process_id"] for r in runs] == [0, 1] and len(meta["images"]) == 2 * N
    for i, r in enumerate(runs):
        left = share_of(i) - first  # what process i had still to do: that, and no more
        assert r["generated_this_run"] == len(left), (i, r)
        assert r["skipped_this_run"] == len(share_of(i)) - len(left)
    assert meta["generated_this_run"] == 2 * N - len(first)
    assert "[generate 1/2] " in results[1][1] and "[generate 0/2] " in results[0][1]
    assert "resuming: " in results[1][1] and "of this process's 8 images" in results[1][1]
    assert "took over the lock of an earlier run" in results[1][1]
    assert clean(out)


def test_evaluate_over_two_processes_writes_the_tables_of_one(model, reference, tmp_path):
    args = ["--images", str(reference), "--reference", str(reference), "--encoders", "clip",
            "--clip", str(model / "image_encoder"), "--bootstrap", "50", "--batch-size", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert evaluate.main([*args, "--out", str(one)]) == 0
    results = finish(start_job("experiments.evaluate", [*args, "--out", str(two)]))
    for code, _, err in results:
        assert code == 0, err
    for name in ("results.json", "table.md", "table.csv"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    caches = sorted(p.relative_to(two) for p in (two / "features").rglob("*.npz"))
    assert caches == sorted(p.relative_to(one) for p in (one / "features").rglob("*.npz"))
    for c in caches:  # merged, the parts removed
        assert (two / c).read_bytes() == (one / c).read_bytes()
    assert "[evaluate 1/2]" in results[1][1] and not list(two.glob(".run.lock*"))


@pytest.mark.parametrize(
    "flags,env,message",
    [
        (["--num-processes", "0"], {}, "--num-processes must be an integer >= 1, got 0"),
        (["--num-processes", "2", "--process-id", "0"], {},
         "--num-processes 2 needs --coordinator HOST:PORT"),
        (["--num-processes", "2", "--coordinator", "127.0.0.1:1"], {},
         "--num-processes 2 needs --process-id"),
        (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], {},
         "--process-id must be in [0, 2) for 2 processes, got 2"),
        (["--coordinator", "no-port", "--num-processes", "2", "--process-id", "0"], {},
         "--coordinator must be HOST:PORT (a port in 1..65535), got 'no-port'"),
        (["--coordinator", "h:70000"], {}, "--coordinator must be HOST:PORT"),
        ([], {"JAXDIV_NUM_PROCESSES": "two"},
         "$JAXDIV_NUM_PROCESSES must be an integer >= 1, got 'two'"),
        ([], {"JAXDIV_COORDINATOR": "h:1", "SLURM_NTASKS": "4", "SLURM_PROCID": "7"},
         "$SLURM_PROCID must be in [0, 4) for 4 processes, got 7"),
    ],
    ids=["zero", "no-coordinator", "no-id", "id-too-large", "no-port", "port-range", "env",
         "slurm"],
)  # fmt: skip
def test_bad_flags_are_refused_in_one_line(model, tmp_path, capsys, monkeypatch, flags, env,
                                           message):  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for module, argv in [(generate, gen_argv(model, tmp_path / "g")),
                         (evaluate, ["--images", str(model / "image_encoder"), "--out",
                                     str(tmp_path / "e")])]:  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            module.parse_args([*argv, *flags])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err
        assert message in err, err


def test_flags_and_environment():
    from argparse import ArgumentParser

    p = ArgumentParser()
    processes.add_flags(p)
    env = {"JAXDIV_COORDINATOR": "10.1.2.3:1234", "JAXDIV_NUM_PROCESSES": "3",
           "JAXDIV_PROCESS_ID": "2", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}  # fmt: skip
    assert processes.from_args(p.parse_args([]), environ=env) == ("10.1.2.3:1234", 3, 2)
    assert processes.from_args(p.parse_args(["--process-id", "1"]), environ=env).index == 1
    slurm = {"JAXDIV_COORDINATOR": "h:9", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
    assert processes.from_args(p.parse_args([]), environ=slurm) == ("h:9", 8, 5)
    # without a coordinator a launcher's variables are not a job of several processes
    assert processes.from_args(p.parse_args([]), environ={"SLURM_NTASKS": "8",
                                                         "SLURM_PROCID": "5"}) == processes.SINGLE
    assert processes.lock_name(processes.SINGLE) == ".run.lock"
    assert processes.lock_name(processes.Processes("h:1", 2, 1)) == ".run.lock.1"


def test_processes_with_other_settings_all_stop_in_one_line(model, tmp_path):
    out = tmp_path / "mixed"
    port = free_port()
    procs = []
    for i, seed in enumerate(("0", "1")):
        argv = [*gen_argv(model, out), "--seed", seed, "--coordinator", f"127.0.0.1:{port}",
                "--num-processes", "2", "--process-id", str(i)]  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "experiments.generate", *argv],
                                      cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    for code, _, err in finish(procs):
        lines = [ln for ln in err.splitlines() if "error:" in ln]
        assert code == 2 and len(lines) == 1, err
        assert "process 1 was started with other settings than process 0" in lines[0]
    assert not (out / "metadata.json").exists() and not list(out.glob(".run.lock*"))
