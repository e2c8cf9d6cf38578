"""optuna-dashboard under the load bench-dashboard puts on Ringleader's.

A finished study of 200 trials (TPE on Branin, each trial reporting an
intermediate value per epoch for up to 9 epochs, pruned by successive
halving, like the ASHA sweep on Ringleader's side) in SQLite, served by
`optuna-dashboard` (its default server: wsgiref, threaded), then N
simulated browsers polling the study's page every 2 s, measured in windows
like Ringleader's: the server's CPU time from /proc/PID/stat as a share of
one core, and the median GET.

  full         GET /api/studies/ID?after=0: every trial with its
               intermediate values, what Ringleader's two GETs return
  incremental  GET /api/studies/ID?after=200: what optuna-dashboard's own
               page asks once it has the trials (nothing new)

Usage: python dashboard_optuna.py [BROWSERS] [SECONDS]
"""

import http.client
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import optuna

TRIALS = 200
POLL = 2.0


def branin(x1, x2):
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5 / math.pi
    r, s, t = 6.0, 10.0, 1 / (8 * math.pi)
    return a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


def objective(trial):
    x1 = trial.suggest_float("x1", -5, 10)
    x2 = trial.suggest_float("x2", 0, 15)
    value = branin(x1, x2)
    for epoch in range(1, 10):
        reported = value * (1 + 1 / epoch)
        trial.report(reported, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser(port, path, until, latencies):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < until:
        started = time.monotonic()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        latencies.append(time.monotonic() - started)
        if response.getheader("connection", "").lower() == "close" or response.version == 10:
            connection.close()
        time.sleep(max(0.0, started + POLL - time.monotonic()))


def main():
    browsers = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/study.db"
        study = optuna.create_study(
            study_name="branin-asha",
            storage=url,
            sampler=optuna.samplers.TPESampler(seed=3),
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
        )
        study.optimize(objective, n_trials=TRIALS)
        study_id = study._study_id
        port = free_port()
        server = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "optuna-dashboard"), url,
             "--host", "127.0.0.1", "--port", str(port), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("optuna-dashboard did not start")
                    time.sleep(0.1)
            print(f"optuna {optuna.__version__}, optuna-dashboard (wsgiref) pid {server.pid}; "
                  f"study {study_id} ({TRIALS} trials, finished, SQLite); {browsers} browsers every {POLL:g} s; "
                  f"windows of {seconds:g} s")
            print(f"{'scenario':<12} {'server CPU':>12} {'% of core':>10} {'GETs':>14} {'median GET':>14}")
            for name, path, count in [
                ("idle", None, 0),
                ("full", f"/api/studies/{study_id}?after=0", browsers),
                ("incremental", f"/api/studies/{study_id}?after={TRIALS}", browsers),
            ]:
                until = time.monotonic() + seconds
                before, started = cpu_seconds(server.pid), time.monotonic()
                latencies = []
                threads = [threading.Thread(target=browser, args=(port, path, until, latencies))
                           for _ in range(count)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if count == 0:
                    time.sleep(max(0.0, until - time.monotonic()))
                wall = time.monotonic() - started
                used = cpu_seconds(server.pid) - before
                median = statistics.median(latencies) * 1000 if latencies else 0.0
                print(f"{name:<12} {used:>10.2f} s {100 * used / wall:>9.2f}% {len(latencies):>14} {median:>11.1f} ms")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
