#!/usr/bin/env python3
"""PyTorch DDP leg of scripts/gpu-check.sh: the reference CNN (or the wide
MLP) on Fashion-MNIST, WORLD processes on ONE device, with the settings of
scripts/bench/train_ddp.py (batch 64 per rank, SGD lr 0.05 momentum 0.9,
normalize 0.2860/0.3530, DistributedSampler shuffling, N threads a process).

Differences from train_ddp.py, all for the GPU check:
  * --device cuda puts the model, the data and the gradients on cuda:0 in
    every rank (two ranks share the one GPU) and synchronises the device
    before reading a clock;
  * the process group backend is --backend (default gloo). NCCL refuses two
    ranks on the same GPU ("Duplicate GPU detected"), so with one GPU the
    honest baseline is Gloo reducing CUDA tensors (it stages them through
    host memory, as Ringleader's worker does);
  * no numpy: the GPU machine's system Python may have torch only;
  * --limit-test N evaluates on the first N test examples (0: all).

Prints one JSON line: {"world", "model", "device", "backend",
"samples_per_sec", "train_seconds", "epoch_seconds", "test_accuracy",
"train_loss"} for the last epoch; samples_per_sec counts every rank's
training samples over the training wall time (evaluation excluded), as
Ringleader's `samples_per_sec` metric does.
"""
import argparse
import gzip
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
from ddp_common import MODELS, free_port  # noqa: E402

MEAN, STD = 0.2860, 0.3530


def read_idx(path):
    """An IDX file of unsigned bytes (gzip) as a uint8 tensor."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndims = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndims)]
    flat = torch.frombuffer(bytearray(data[4 + 4 * ndims:]), dtype=torch.uint8)
    return flat.reshape(dims)


def load(data_dir, split, limit):
    images = read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = (images.to(torch.float32).div(255.0).unsqueeze(1) - MEAN) / STD
    return x, labels.to(torch.int64)


def rank_main(rank, args, port, results):
    torch.set_num_threads(args.threads)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    device = torch.device("cuda:0" if cuda else "cpu")
    dist.init_process_group(args.backend, rank=rank, world_size=args.world)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    train_x, train_y = (t.to(device) for t in load(args.data, "train", args.limit))
    test_x, test_y = (t.to(device) for t in load(args.data, "t10k", args.limit_test))
    module = MODELS[args.model]().to(device)
    model = nn.parallel.DistributedDataParallel(module, device_ids=[0] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = torch.utils.data.DistributedSampler(
        torch.utils.data.TensorDataset(train_x, train_y), num_replicas=args.world, rank=rank, seed=0)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        dist.barrier()
        sync()
        start = time.perf_counter()
        for batch in order.split(64):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        sync()
        train_seconds = time.perf_counter() - start
        # Evaluation, sharded contiguously like Ringleader's.
        model.eval()
        n = len(test_y)
        lo, hi = n * rank // args.world, n * (rank + 1) // args.world
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum())
                          for x, y in zip(test_x[lo:hi].split(1000), test_y[lo:hi].split(1000)))
        sync()
        epoch_seconds = time.perf_counter() - start
        # Gloo reduces CPU tensors too; NCCL only device ones.
        where = device if args.backend == "nccl" else "cpu"
        sums = torch.tensor([len(order), correct, hi - lo, loss_sum.item(), steps],
                            dtype=torch.float64, device=where)
        times = torch.tensor([train_seconds, epoch_seconds], dtype=torch.float64, device=where)
        dist.all_reduce(sums)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        sums, times = sums.cpu(), times.cpu()
        results.put({
            "world": args.world,
            "model": args.model,
            "device": str(device),
            "backend": args.backend,
            "samples_per_sec": round(sums[0].item() / times[0].item(), 1),
            "train_seconds": round(times[0].item(), 3),
            "epoch_seconds": round(times[1].item(), 3),
            "test_accuracy": round(sums[1].item() / max(sums[2].item(), 1), 4),
            "train_loss": round(sums[3].item() / max(sums[4].item(), 1), 4),
        })
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="first N training examples (0: all)")
    parser.add_argument("--limit-test", type=int, default=0, help="first N test examples (0: all)")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(3, "gpu_check_ddp.py: --device cuda, but torch.cuda.is_available() is False\n")
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(rank_main, args=(args, free_port(), results), nprocs=args.world, join=True)
    print(json.dumps(results.get()), flush=True)


if __name__ == "__main__":
    main()
