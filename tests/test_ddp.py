"""Distributed training. ``torchrun --nproc_per_node=2 train_mnist.py`` on the CPU with
gloo: both ranks end with identical weights, and those weights are what averaging the two
ranks' shard gradients gives (so each rank really trained on its own shard and DDP
synchronised them). The step vote: all ranks stop at one step without a collective and a
host wait at every step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from capsnet.datasets import ImageSet, ShiftedImages
from capsnet.training.distributed import DistributedContext, StepVote
from capsnet.training.interrupt import StopRequest
from capsnet.training.loop import EpochSettings, RunPosition, train_epoch
from capsnet.training.metrics import MetricSums, StepLog
from capsnet.training.objective import StepLoss

from capsnet.datasets import epoch_order, load_mnist, random_shift, shard, step_generator
from capsnet.losses import capsnet_loss
from capsnet.model import CapsNet, CapsNetConfig
from mnist_testing import REPO, mnist_root

ROUTING = "fused"
WORLD_SIZE = 2
NUM_TRAIN = 64
BATCH_SIZE = 8  # per rank: 64 images / 2 ranks / 8 = 4 steps
SEED = 0

# Runs under torchrun: trains through train_mnist.py's own entry point, then every rank
# saves the weights it ended with.
WORKER = """
import importlib.util, os, sys
import torch
spec = importlib.util.spec_from_file_location("train_mnist", sys.argv[1])
train_mnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_mnist)
train_mnist.configure_logging(rank=int(os.environ["RANK"]))
result = train_mnist.run_training(sys.argv[3:])
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


def emulate_ddp(shards_per_step: int) -> dict[str, torch.Tensor]:
    """One epoch as DDP computes it, in one process: average the gradients of
    ``shards_per_step`` ranks' batches (rank r's shard, rank r's shifts), then step Adam.
    With ``shards_per_step=1`` only rank 0's data is used: what an unsynchronised rank
    would compute."""
    train_set = load_mnist(mnist_root(), train=True).head(NUM_TRAIN)
    torch.manual_seed(SEED)
    model = CapsNet(CapsNetConfig(), routing_backend=ROUTING)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = epoch_order(NUM_TRAIN, SEED, 0)
    for step in range(NUM_TRAIN // WORLD_SIZE // BATCH_SIZE):
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(shards_per_step):
            indices = shard(order, rank, WORLD_SIZE)[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
            images, labels = train_set.batch(indices)
            images = random_shift(
                images, 2, step_generator(torch.device("cpu"), SEED, 0, step, rank)
            )
            model.zero_grad()
            capsnet_loss(model(images, labels), images, labels).total.backward()
            for total, p in zip(grads, model.parameters(), strict=True):
                total += p.grad / shards_per_step
        for total, p in zip(grads, model.parameters(), strict=True):
            p.grad = total
        optimizer.step()
    return model.state_dict()


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_processes_train_identical_replicas_on_their_own_shards(tmp_path):
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(WORKER)
    dump_dir = tmp_path / "weights"
    dump_dir.mkdir()
    out_dir = tmp_path / "run"
    train_args = [
        "--device", "cpu",
        "--routing", ROUTING,
        "--data-dir", str(mnist_root()),
        "--limit-train", str(NUM_TRAIN),
        "--limit-test", "32",
        "--batch-size", str(BATCH_SIZE),
        "--epochs", "1",
        "--seed", str(SEED),
        "--num-reconstructions", "2",
        "--no-progress",
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",  # two processes on a small machine
    }
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={WORLD_SIZE}",
        str(worker), str(REPO / "train_mnist.py"), str(dump_dir), *train_args,
    ]  # fmt: skip
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540
    )
    assert completed.returncode == 0, f"torchrun failed:\n{completed.stdout}\n{completed.stderr}"

    rank0 = torch.load(dump_dir / "rank0.pt", weights_only=True)
    rank1 = torch.load(dump_dir / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"

    # Only rank 0 logs and writes.
    assert (
        completed.stdout.count("CapsNet on mnist:") == 1 and f"x {WORLD_SIZE} processes" in completed.stdout
    )
    assert len((out_dir / "metrics.csv").read_text().splitlines()) == 2
    assert (out_dir / "last.pt").is_file()

    # The replicas equal DDP's arithmetic (mean of both shards' gradients) up to rounding
    # (thread counts differ), and are far from a rank that trained on its shard alone.
    synchronised = emulate_ddp(shards_per_step=WORLD_SIZE)
    alone = emulate_ddp(shards_per_step=1)
    to_synchronised, to_alone = distance(rank0, synchronised), distance(rank0, alone)
    assert to_synchronised < 1e-4, to_synchronised
    assert to_alone > 100 * to_synchronised + 1e-5, (to_alone, to_synchronised)


# --- the step vote --------------------------------------------------------------------------------


@pytest.fixture
def one_process_group():
    """A real gloo process group of one process: the collectives run, on one rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_epoch(context, steps: int, log_every: int, stop_at: int | None = None, nan_at: int | None = None):
    """``steps`` steps of a tiny linear model; returns the vote, the position and the
    number of all-reduces issued."""
    torch.manual_seed(0)
    model = nn.Linear(4, 10)
    images = ImageSet(torch.randint(0, 255, (steps * 2 * 4, 1, 2, 2), dtype=torch.uint8),
                      torch.arange(steps * 2 * 4) % 10)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stop = StopRequest()
    position = RunPosition()

    def step_loss(images, labels):
        loss = nn.functional.cross_entropy(model(images.flatten(1)), labels)
        if nan_at is not None and position.global_step + 1 == nan_at:
            loss = loss * float("nan")
        return StepLoss(loss, loss.detach().reshape(1), (labels == labels).sum())

    def on_step(position):
        if stop_at is not None and position.global_step == stop_at:
            stop.request("test")

    vote = StepVote.for_context(context, every=log_every)
    vote = train_epoch(
        step_loss=step_loss, parameters_owner=model, optimizer=optimizer,
        scaler=torch.amp.GradScaler("cpu", enabled=False), train_set=ShiftedImages(images, 0),
        settings=EpochSettings(seed=0, batch_size=4, epochs=1, amp=False, progress=False,
                               log_every=log_every),
        context=context, position=position, sums=MetricSums(("loss",), context.device),
        step_log=StepLog(("loss",), context.device), vote=vote, stop=stop, on_step=on_step,
    )  # fmt: skip
    return vote, position


def test_the_vote_is_one_collective_per_log_every_steps(one_process_group, monkeypatch):
    # A 2-process run's vote logic on a 1-process group: the collectives really run.
    context = DistributedContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    calls = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(
        dist, "all_reduce", lambda *a, **k: calls.append(k.get("async_op")) or real_all_reduce(*a, **k)
    )
    vote, position = run_epoch(context, steps=12, log_every=4)
    assert (vote.stop, vote.diverged, position.batch_in_epoch) == (False, False, 12)
    assert calls == [True, True, True]  # steps 4, 8, 12; asynchronous, read a step later

    calls.clear()
    vote, position = run_epoch(context, steps=12, log_every=4, stop_at=5)
    # Asked after step 5: voted on at step 8, read after step 9; every rank stops there.
    assert vote.stop and position.batch_in_epoch == 9
    assert calls == [True, True]

    calls.clear()
    vote, position = run_epoch(context, steps=12, log_every=4, nan_at=2)
    assert vote.diverged and position.batch_in_epoch == 5


def test_one_cpu_process_checks_every_step_without_collectives(monkeypatch):
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("no collective alone"))
    vote, position = run_epoch(context, steps=12, log_every=4, stop_at=5)
    assert vote.stop and position.batch_in_epoch == 5  # right after the step it was asked in
    vote, position = run_epoch(context, steps=12, log_every=4, nan_at=3)
    assert vote.diverged and position.batch_in_epoch == 3
