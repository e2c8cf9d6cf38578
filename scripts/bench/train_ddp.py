#!/usr/bin/env python3
"""Baseline for Ringleader's data-parallel training: PyTorch DDP (Gloo) on the
reference CNN and Fashion-MNIST, with the settings of Ringleader's test
(batch 64 per rank, SGD lr 0.05 momentum 0.9, normalize 0.2860/0.3530, one
thread per process, DistributedSampler shuffling).

--model mlp-wide trains Ringleader's `mlp` with hidden = [4096, 4096]
(784→4096→4096→10, ReLU) instead: 80 MB of gradients a step.
--compression bf16|f16 registers DDP's bf16_compress_hook / fp16_compress_hook
(gradients cast to 16 bits, divided by the world, all-reduced, cast back),
the counterpart of Ringleader's `gradient_compression`; like Ringleader, only
when there is more than one rank.

Prints one JSON line: {"world", "model", "compression", "samples_per_sec",
"epoch_seconds", "test_accuracy"} for the last epoch; samples_per_sec counts
every rank's training samples over the training wall time (evaluation
excluded), as Ringleader's `samples_per_sec` metric does.

Usage: train_ddp.py [--world 2] [--epochs 1] [--limit N] [--data DIR]
                    [--model cnn|mlp-wide] [--compression none|bf16|f16]
"""
import argparse
import gzip
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from ddp_common import MODELS, free_port

MEAN, STD = 0.2860, 0.3530


def read_idx(path):
    """An IDX file of unsigned bytes (gzip) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndims = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndims).reshape(dims)


def load(data_dir, split, limit):
    images = read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1) - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))


HOOKS = {"bf16": default_hooks.bf16_compress_hook, "f16": default_hooks.fp16_compress_hook}


def rank_main(rank, args, port, results):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    train_x, train_y = load(args.data, "train", args.limit)
    test_x, test_y = load(args.data, "t10k", 0)
    model = nn.parallel.DistributedDataParallel(MODELS[args.model]())
    if args.compression != "none" and args.world > 1:
        model.register_comm_hook(dist.group.WORLD, HOOKS[args.compression])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = torch.utils.data.DistributedSampler(
        torch.utils.data.TensorDataset(train_x, train_y), num_replicas=args.world, rank=rank, seed=0)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        model.train()
        dist.barrier()
        start = time.perf_counter()
        for batch in order.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
        train_seconds = time.perf_counter() - start
        # Evaluation, sharded contiguously like Ringleader's.
        model.eval()
        n = len(test_y)
        lo, hi = n * rank // args.world, n * (rank + 1) // args.world
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum())
                          for x, y in zip(test_x[lo:hi].split(1000), test_y[lo:hi].split(1000)))
        epoch_seconds = time.perf_counter() - start
        sums = torch.tensor([len(order), correct, hi - lo], dtype=torch.float64)
        times = torch.tensor([train_seconds, epoch_seconds], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        results.put({
            "world": args.world,
            "model": args.model,
            "compression": args.compression,
            "samples_per_sec": round(sums[0].item() / times[0].item(), 1),
            "epoch_seconds": round(times[1].item(), 2),
            "test_accuracy": round(sums[1].item() / sums[2].item(), 4),
        })
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=0, help="first N training examples (0: all)")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--compression", choices=["none", *sorted(HOOKS)], default="none",
                        help="DDP's 16-bit gradient compression hook")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(rank_main, args=(args, free_port(), results), nprocs=args.world, join=True)
    print(json.dumps(results.get()), flush=True)


if __name__ == "__main__":
    main()
