"""Training on every GPU of a machine from inside one process: ``train.processes`` > 1 runs
``dedt.diffusion.train.train`` under ``torchrun`` (DDP) and waits for it.

The caller's arrays and options go to a temp folder; ``python -m dedt.diffusion.launch --processes N
FOLDER`` runs torchrun (``--standalone --nproc_per_node N -m dedt.diffusion.launch FOLDER``), whose N
processes each load them and call ``train`` into the same run folder, so checkpoints, resume and the
run log are those of a torchrun script. The DDP run draws the global batch's samples, timesteps and noise as one process does, so
the number of processes changes neither the fingerprint nor, up to the all-reduce's rounding, the
losses; a checkpoint records its world size and resumes only with as many processes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dedt
from dedt.diffusion.options import TrainOptions
from dedt.errors import DedtError
from dedt.progress import ProgressFn
from dedt.store import atomic_write_text

# Lines of the children's log a failure quotes: our choice, room for a traceback from each of two
# processes (interleaved) and torchrun's lines after them.
LOG_TAIL_LINES = 60
# Our choice: progress reports arrive every 10 s at most (dedt.progress), so a poll every 0.5 s adds
# no visible lag and costs nothing.
POLL_S = 0.5


def resolve_processes(processes: int | str) -> int:
    """``train.processes`` as a count: 'auto' = the visible CUDA GPUs, 1 when there are none."""
    if processes == "auto":
        return max(1, torch.cuda.device_count())
    return int(processes)


def launch_train(
    images: np.ndarray,
    labels: np.ndarray,
    options: TrainOptions,
    run_dir: Path,
    *,
    num_classes: int,
    class_weights: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
    anneal_data: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """``train`` on ``options.processes`` processes: in this process for 1, under torchrun otherwise.

    Same arguments and result as ``dedt.diffusion.train.train``. A child's DedtError is raised here
    with its message; any other failure is a DedtError quoting the end of the children's log.
    """
    from dedt.diffusion.train import train  # here: the torchrun agent imports this module without training

    processes = resolve_processes(options.processes)
    if processes == 1:
        return train(
            images,
            labels,
            options,
            run_dir,
            num_classes=num_classes,
            class_weights=class_weights,
            seed=seed,
            progress=progress,
            on_progress=on_progress,
            anneal_data=anneal_data,
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DedtError(
            f"train.processes {options.processes!r} starts torchrun itself, but this process already "
            "runs under torchrun; set train.processes: 1 or start it without torchrun"
        )
    if options.batch_size % processes:
        raise DedtError(
            f"train.batch_size {options.batch_size} is not divisible by train.processes ({processes}); "
            f"use a multiple of {processes}"
        )
    with tempfile.TemporaryDirectory(prefix="dedt-launch-") as folder:
        job = Path(folder)
        np.save(job / "images.npy", images, allow_pickle=False)
        np.save(job / "labels.npy", np.asarray(labels), allow_pickle=False)
        if class_weights is not None:
            np.save(job / "class_weights.npy", np.asarray(class_weights), allow_pickle=False)
        if anneal_data is not None:
            np.save(job / "anneal_images.npy", anneal_data[0], allow_pickle=False)
            np.save(job / "anneal_labels.npy", np.asarray(anneal_data[1]), allow_pickle=False)
        spec = {
            "options": options.model_dump(mode="json"),
            "run_dir": str(Path(run_dir).resolve()),
            "num_classes": num_classes,
            "seed": seed,
        }
        atomic_write_text(job / "job.json", json.dumps(spec, indent=2, sort_keys=True))
        _run_torchrun(job, processes, on_progress)
        return json.loads((job / "result.json").read_text())


def _run_torchrun(job: Path, processes: int, on_progress: ProgressFn | None) -> None:
    """Start torchrun on ``job``, forward its progress reports, and turn a failure into a DedtError."""
    command = [sys.executable, "-m", "dedt.diffusion.launch", "--processes", str(processes), str(job)]
    package_root = str(Path(dedt.__file__).resolve().parents[1])  # the children import this dedt
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    log_path, reports = job / "torchrun.log", job / "progress.jsonl"
    forwarded = 0
    with log_path.open("wb") as log:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while child.poll() is None:
                time.sleep(POLL_S)
                forwarded = _forward(reports, forwarded, on_progress)
        finally:
            if child.poll() is None:  # this process is being stopped: stop the training with it
                child.terminate()
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
    _forward(reports, forwarded, on_progress)
    if child.returncode == 0 and (job / "result.json").exists():
        return
    errors = sorted(job.glob("error-*.txt"))
    if errors:
        raise DedtError(errors[0].read_text())
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    raise DedtError(
        f"training under torchrun ({processes} processes) failed with exit status {child.returncode}; "
        f"the end of its log:\n{tail}"
    )


def _forward(reports: Path, done: int, on_progress: ProgressFn | None) -> int:
    """Pass the progress lines after the first ``done`` to ``on_progress``; returns how many were passed."""
    if on_progress is None or not reports.exists():
        return done
    text = reports.read_text()
    complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # a line being written waits
    for line in complete[done:]:
        nimg, total, info = json.loads(line)
        on_progress(nimg, total, info)
    return max(done, len(complete))


def _agent(processes: int, job: Path) -> None:
    """The torchrun agent, stopped (SIGTERM, which it passes to its workers) when the launching process
    dies, even by SIGKILL, so no orphaned training keeps writing into a run folder a re-run resumes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (prctl(2))
        if os.getppid() == 1:  # the launcher died before the signal was armed
            raise SystemExit(1)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc_per_node={processes}", "-m", "dedt.diffusion.launch", str(job)]))
    except ChildFailedError:  # its report would push the workers' tracebacks out of the log's tail
        print(f"torchrun: a training process of {processes} failed; its traceback is above", flush=True)
        raise SystemExit(1) from None


def _worker(job: Path) -> None:
    """One torchrun process: ``train`` on the job's arrays and options; rank 0 writes result.json."""
    from dedt.diffusion.train import train

    spec = json.loads((job / "job.json").read_text())
    rank = int(os.environ.get("RANK", "0"))
    weights = job / "class_weights.npy"
    anneal = None
    if (job / "anneal_images.npy").exists():  # prune then anneal: the full train split
        anneal = (np.load(job / "anneal_images.npy"), np.load(job / "anneal_labels.npy"))
    reports = job / "progress.jsonl"

    def report(nimg: int, total: int, info: dict[str, Any]) -> None:
        with reports.open("a") as out:
            out.write(json.dumps([nimg, total, info]) + "\n")

    try:
        result = train(
            np.load(job / "images.npy"),
            np.load(job / "labels.npy"),
            TrainOptions(**spec["options"]),
            Path(spec["run_dir"]),
            num_classes=spec["num_classes"],
            class_weights=np.load(weights) if weights.exists() else None,
            seed=spec["seed"],
            progress=False,
            on_progress=report,  # called on rank 0 only
            anneal_data=anneal,
        )
    except DedtError as exc:
        atomic_write_text(job / f"error-{rank}.txt", str(exc))
        raise SystemExit(1) from None
    if rank == 0:
        atomic_write_text(job / "result.json", json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    """``--processes N JOB``: the torchrun agent; ``JOB``: one of its workers."""
    parser = argparse.ArgumentParser(prog="python -m dedt.diffusion.launch", description=main.__doc__)
    parser.add_argument("--processes", type=int, help="start torchrun with this many processes")
    parser.add_argument("job", type=Path, help="the folder launch_train wrote")
    args = parser.parse_args(argv)
    if args.processes is None:
        _worker(args.job)
    else:
        _agent(args.processes, args.job)


if __name__ == "__main__":
    main()
