"""Soak: a run killed with SIGKILL at random moments (training, evaluation, checkpoint and log
writes) and resumed each time ends as the uninterrupted run: the same log (but its times),
model, optimizer state and summary, a valid log, no stray file.

A few kills by default; ``MEPROP_SOAK=20`` (kills) for the long version."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

RUNNER = """
import hashlib, sys
from pathlib import Path
from meprop.experiments.data import DATASETS
from meprop.experiments.data.download import Dataset, RemoteFile
from meprop.experiments.tasks.mnist import MnistTask
folder = Path(sys.argv[1]) / "mnist"
files = {p.name: RemoteFile(hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
         for p in folder.iterdir()}
DATASETS["mnist"] = Dataset("mnist", "http://127.0.0.1:9/", files)
MnistTask.dev_size = 50
from meprop.experiments.cli import main
sys.exit(main(sys.argv[2:]))
"""
ARGS = ["--method", "mesimp", "--k", "8", "--hidden", "32", "--batch-size", "20"]
ARGS += ["--prune-interval", "3", "--dropout", "0.1", "--eval-every", "2", "--epochs", "25"]
ARGS += ["--no-progress"]


def start(root, out, resume):
    cmd = [sys.executable, "-c", RUNNER, str(root), "train", "mnist", "--data-dir", str(root)]
    cmd += ["--out", str(out), *ARGS, *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.readline()  # "run directory: ...": imports done, the run begins
    return p


def records(out):
    lines = (out / "log.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines]  # every line valid JSON
    steps = [r["step"] for r in out]
    assert steps == sorted(set(steps)), steps  # no record twice
    return [{k: v for k, v in r.items() if k != "times"} for r in out]


def test_killed_at_random_moments_and_resumed_equals_uninterrupted(tiny_mnist, tmp_path):
    kills = int(os.environ.get("MEPROP_SOAK", "3"))
    a = start(tiny_mnist, tmp_path / "a", False)
    t0 = time.monotonic()
    while not (tmp_path / "a" / "log.jsonl").exists() and a.poll() is None:
        time.sleep(0.01)
    setup = time.monotonic() - t0  # data, model, warm-up: before the first evaluation
    _, err = a.communicate(timeout=300)
    assert a.returncode == 0, err.decode()
    duration = time.monotonic() - t0 - setup  # training, evaluations, checkpoints
    rng = random.Random(int(os.environ.get("MEPROP_SOAK_SEED", "0")))
    total = len((tmp_path / "a" / "log.jsonl").read_text().splitlines())
    per_record = duration / total  # seconds between evaluations (and checkpoints)
    # Kill points by progress, not by the clock (a busy machine would shift them): when the
    # log reaches a random length, after a random part of the next interval.
    targets = sorted(rng.sample(range(total - 2), kills))
    b, killed, attempts = tmp_path / "b", 0, 0
    log = b / "log.jsonl"
    while True:
        attempts += 1
        assert attempts < 10 * kills + 20, "the run never finished"
        p = start(tiny_mnist, b, (b / "config.json").exists())
        while killed < kills and p.poll() is None:
            if log.exists() and len(log.read_bytes().splitlines()) >= targets[killed]:
                time.sleep(rng.uniform(0.0, 1.0) * per_record)
                p.send_signal(signal.SIGKILL)
                p.communicate()
                killed += 1
                print(  # where it was (pytest -s shows it)
                    f"kill {killed} at log length >= {targets[killed - 1]} of {total}: log "
                    f"{len(log.read_bytes().splitlines())} lines, temporary files "
                    f"{[q.name for q in b.glob('.*.tmp')]}"
                )
                break
            time.sleep(0.005)
        if p.returncode is not None and p.returncode < 0:
            continue  # killed: resume
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        break
    assert killed == kills
    assert records(b) == records(tmp_path / "a")
    la = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    lb = torch.load(b / "last.pt", weights_only=True)
    for key in ("model", "optimizer"):
        sa, sb = la[key], lb[key]
        flat_a = [t for t in _tensors(sa)]
        flat_b = [t for t in _tensors(sb)]
        assert len(flat_a) == len(flat_b)
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True)), key
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    for key in ("best_epoch", "dev_accuracy", "test_accuracy", "steps", "final_widths"):
        assert sa[key] == sb[key], key
    assert sorted(p.name for p in b.iterdir()) == sorted(
        ["config.json", "log.jsonl", "last.pt", "best.pt", "summary.json", ".lock"]
    )


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for k in value:
            yield from _tensors(value[k])
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
