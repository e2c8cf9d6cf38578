#!/usr/bin/env python3
"""All-reduce benchmark: Ringleader's ring vs torch.distributed (Gloo), same
machine, same run, plus the loopback TCP ceiling (iperf3).

Prints, per world size, a table of median time, algorithm bandwidth S/t and
bus bandwidth 2(n-1)/n * S/t (the nccl-tests definitions) for f32 buffers.
The ring runs as a worker runs it: mutual TLS with worker certificates from
`ringleader certs init` and a ring secret (`--ring tls`), and, with
`--ring tls,plain`, also with ring encryption off (`--insecure`: plaintext,
the ring proof only), so the cost of encryption shows in the same run.

Usage: allreduce.py BIN_DIR [--worlds 2,4] [--iterations 10] [--sizes 67108864]
                            [--ring tls,plain] [--rounds 1] [--no-gloo]
Also the Gloo worker itself: allreduce.py --gloo-rank R ...
"""
import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RING_MODES = {"tls": "TLS", "plain": "encryption off", "unix": "Unix sockets"}


def gloo_rank(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                            world_size=args.world, rank=args.gloo_rank)
    for size in [int(x) for x in args.sizes.split(",")]:
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


def ring_security(bin_dir, work):
    """Certificates (`ringleader certs init`) and a ring secret file under
    `work`: what every rank of a benchmark ring shares."""
    certs = os.path.join(work, "certs")
    subprocess.run([os.path.join(bin_dir, "ringleader"), "certs", "init", "--dir", certs],
                   check=True, stdout=subprocess.DEVNULL)
    secret = os.path.join(work, "ring.secret")
    with open(secret, "w") as f:
        f.write(secrets.token_hex(32))
    return {"tls_dir": os.path.join(certs, "worker"), "secret": secret}


def ringleader(bin_dir, world, iterations, sizes, mode, security):
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(world))
    transport = ["--insecure"] if mode == "plain" else [f"--tls-dir={security['tls_dir']}"]
    sizes = ",".join(str(s) for s in sizes)
    with tempfile.TemporaryDirectory(prefix="ringleader-sockets-") as sockets:
        local = [f"--unix-socket-dir={sockets}"] if mode == "unix" else []
        return run_ranks([[os.path.join(bin_dir, "ringleader-ring"), "--mode=bench", f"--rank={r}",
                           f"--peers={peers}", f"--sizes={sizes}", f"--iterations={iterations}",
                           f"--ring-secret-file={security['secret']}"] + transport + local
                          for r in range(world)])


def gloo(world, iterations, sizes):
    port = free_port()
    sizes = ",".join(str(s) for s in sizes)
    return run_ranks([[sys.executable, __file__, "--gloo-rank", str(r), "--world", str(world),
                       "--port", str(port), "--iterations", str(iterations), "--sizes", sizes]
                      for r in range(world)])


def medians(runs):
    """{bytes: median over rounds of each round's median time}."""
    out = {}
    for run in runs:
        for r in run:
            out.setdefault(r["bytes"], []).append(r["median_s"])
    return {size: statistics.median(times) for size, times in out.items()}


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
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                        help="buffer sizes in bytes, comma-separated")
    parser.add_argument("--ring", default="tls",
                        help="ring transports to time, comma-separated: tls (mutual TLS, "
                             "what workers on different machines run), plain (ring encryption "
                             "off), unix (ranks on one machine: Unix sockets, as workers pick)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of each configuration, interleaved; the table shows the "
                             "median of their medians")
    parser.add_argument("--no-gloo", action="store_true", help="skip the Gloo comparison")
    parser.add_argument("--no-iperf", action="store_true", help="skip the iperf3 ceiling")
    parser.add_argument("--gloo-rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.gloo_rank is not None:
        return gloo_rank(args)
    sizes = [int(x) for x in args.sizes.split(",")]
    modes = args.ring.split(",")
    for mode in modes:
        if mode not in RING_MODES:
            sys.exit(f"--ring: unknown transport {mode!r} (known: {', '.join(RING_MODES)})")
    if not args.no_iperf:
        print(f"loopback TCP ceiling (iperf3, one stream): {iperf3():.2f} GB/s\n")
    with tempfile.TemporaryDirectory(prefix="ringleader-bench-") as work:
        security = ring_security(args.bin_dir, work)
        for world in [int(w) for w in args.worlds.split(",")]:
            runs = {m: [] for m in modes}
            gloo_runs = []
            for _ in range(args.rounds):
                for mode in modes:
                    runs[mode].append(ringleader(args.bin_dir, world, args.iterations, sizes, mode,
                                                 security))
                if not args.no_gloo:
                    gloo_runs.append(gloo(world, args.iterations, sizes))
            for mode in modes:
                spread = {human(size): [f"{r[size] * 1e3:.1f}" for r in (
                    {x["bytes"]: x["median_s"] for x in run} for run in runs[mode])] for size in sizes}
                print(f"  (world {world}, {RING_MODES[mode]}: each round's median, ms: {spread})",
                      file=sys.stderr)
            ours = {m: medians(runs[m]) for m in modes}
            theirs = medians(gloo_runs) if gloo_runs else None
            factor = 2 * (world - 1) / world
            rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
            print(f"world {world}, f32, median of {args.iterations}{rounds}")
            header = ["size"]
            for mode in modes:
                name = f"Ringleader ({RING_MODES[mode]})"
                header += [f"{name} time", "algbw GB/s", "busbw GB/s"]
            if theirs:
                header += ["Gloo time", "algbw GB/s", "busbw GB/s"]
                header += [f"busbw ratio ({RING_MODES[m]} / Gloo)" for m in modes]
            if "tls" in modes and "plain" in modes:
                header += ["TLS / encryption off busbw"]
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for size in sizes:
                row = [human(size)]
                for mode in modes:
                    a = ours[mode][size]
                    row += [f"{a * 1e3:.3f} ms", f"{size / a / 1e9:.2f}", f"{factor * size / a / 1e9:.2f}"]
                if theirs:
                    b = theirs[size]
                    row += [f"{b * 1e3:.3f} ms", f"{size / b / 1e9:.2f}", f"{factor * size / b / 1e9:.2f}"]
                    row += [f"{b / ours[m][size]:.2f}x" for m in modes]
                if "tls" in modes and "plain" in modes:
                    row += [f"{ours['plain'][size] / ours['tls'][size]:.2f}x"]
                print("| " + " | ".join(row) + " |")
            print(flush=True)


if __name__ == "__main__":
    main()
