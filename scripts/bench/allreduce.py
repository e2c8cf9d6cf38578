#!/usr/bin/env python3
"""All-reduce benchmark: Ringleader's ring vs torch.distributed (Gloo), same
machine, same run, plus the loopback TCP ceiling (iperf3).

Prints, per world size, a table of median time, algorithm bandwidth S/t and
bus bandwidth 2(n-1)/n * S/t (the nccl-tests definitions) for f32 buffers.

Usage: allreduce.py BIN_DIR [--worlds 2,4] [--iterations 10]
Also the Gloo worker itself: allreduce.py --gloo-rank R ...
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_rank(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                            world_size=args.world, rank=args.gloo_rank)
    for size in SIZES:
        t = torch.ones(size // 4, dtype=torch.float32)
        dist.all_reduce(t)  # warm-up
        times = []
        for _ in range(args.iterations):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        if args.gloo_rank == 0:
            print(json.dumps({"bytes": size, "median_s": statistics.median(times)}), flush=True)
    dist.destroy_process_group()


def run_ranks(commands):
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            sys.exit(f"rank failed ({' '.join(commands[0][:2])}): {err[-2000:]}")
        outs.append(out)
    return [json.loads(line) for line in outs[0].splitlines() if line.startswith("{")]


def ringleader(bin_dir, world, iterations):
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(world))
    sizes = ",".join(str(s) for s in SIZES)
    return run_ranks([[os.path.join(bin_dir, "ringleader-ring"), "--mode=bench", f"--rank={r}",
                       f"--peers={peers}", f"--sizes={sizes}", f"--iterations={iterations}"]
                      for r in range(world)])


def gloo(world, iterations):
    port = free_port()
    return run_ranks([[sys.executable, __file__, "--gloo-rank", str(r), "--world", str(world),
                       "--port", str(port), "--iterations", str(iterations)] for r in range(world)])


def iperf3():
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # iperf3 has no readiness signal; a refused connect is retried below
    for _ in range(20):
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "3", "-J"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            break
        time.sleep(0.25)
    server.wait(timeout=10)
    result = json.loads(out.stdout)
    return result["end"]["sum_received"]["bits_per_second"] / 8 / 1e9


def human(size):
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bin_dir", nargs="?")
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--gloo-rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.gloo_rank is not None:
        return gloo_rank(args)
    print(f"loopback TCP ceiling (iperf3, one stream): {iperf3():.2f} GB/s\n")
    for world in [int(w) for w in args.worlds.split(",")]:
        ours = {r["bytes"]: r["median_s"] for r in ringleader(args.bin_dir, world, args.iterations)}
        theirs = {r["bytes"]: r["median_s"] for r in gloo(world, args.iterations)}
        factor = 2 * (world - 1) / world
        print(f"world {world}, f32, median of {args.iterations}")
        print("| size | Ringleader time | algbw GB/s | busbw GB/s | Gloo time | algbw GB/s | busbw GB/s | busbw ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for size in SIZES:
            a, b = ours[size], theirs[size]
            print(f"| {human(size)} | {a * 1e3:.3f} ms | {size / a / 1e9:.2f} | {factor * size / a / 1e9:.2f} "
                  f"| {b * 1e3:.3f} ms | {size / b / 1e9:.2f} | {factor * size / b / 1e9:.2f} | {b / a:.2f}x |")
        print(flush=True)


if __name__ == "__main__":
    main()
