#!/usr/bin/env python3
"""Sweep throughput baselines for scripts/bench/sweep.sh: the same Hartmann-6
objective and random search as the Ringleader run, 4 trials at a time, on

  optuna-journal  Optuna, JournalStorage on a JournalFileBackend, n_jobs=4
  optuna-sqlite   Optuna, SQLite RDB storage, n_jobs=4
  ray-tune        Ray Tune, Tuner(num_samples=N, max_concurrent_trials=4),
                  ray.init(num_cpus=4), no dashboard

Every system keeps its trial state durable (a journal file, a database, Ray's
experiment directory). The clock covers the optimisation only: from
study.optimize / Tuner.fit to its return, as Ringleader's figure covers sweep
submission to the sweep's finish (not cluster start-up). One JSON line per
system: {"system", "trials", "seconds", "rate", "best", "note"}.

Usage: sweep_baselines.py --dir TMP [--trials 2000] [--ray-trials 200]
                          [--systems optuna-journal,optuna-sqlite,ray-tune]
"""

import argparse
import json
import os
import sys
import time

from hartmann6 import hartmann6  # scripts/bench/hartmann6.py

NAMES = [f"x{j}" for j in range(1, 7)]
WORKERS = 4


def journal_storage(path):
    """JournalStorage on a file, under whichever name this Optuna uses
    (JournalFileBackend since 4.0; JournalFileStorage before)."""
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend as Backend
    except ImportError:  # Optuna < 4.0
        from optuna.storages import JournalFileStorage as Backend
    return JournalStorage(Backend(path))


def run_optuna(storage, trials, seed=1):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="bench-hartmann6",
        storage=storage,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=seed),
    )

    def objective(trial):
        return hartmann6([trial.suggest_float(n, 0.0, 1.0) for n in NAMES])

    start = time.perf_counter()
    study.optimize(objective, n_trials=trials, n_jobs=WORKERS)
    seconds = time.perf_counter() - start
    done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    return done, seconds, study.best_value


def run_ray(trials, workdir):
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import shutil
    import tempfile

    import ray
    from ray import tune

    # Ray's session dir holds AF_UNIX sockets (paths of at most 107 bytes), so
    # it gets a short path of its own rather than one under `workdir`.
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=WORKERS,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        _temp_dir=ray_tmp,
    )

    def trainable(config):
        tune.report({"objective": hartmann6([config[n] for n in NAMES])})

    tuner = tune.Tuner(
        trainable,
        param_space={n: tune.uniform(0.0, 1.0) for n in NAMES},
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="min",
            num_samples=trials,
            max_concurrent_trials=WORKERS,
        ),
        run_config=tune.RunConfig(
            name="bench-hartmann6",
            storage_path=os.path.join(workdir, "ray-results"),
            verbose=0,
        ),
    )
    start = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - start
    done = sum(1 for r in results if r.error is None and r.metrics)
    best = results.get_best_result().metrics["objective"]
    ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return done, seconds, best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="scratch directory for the stores")
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--ray-trials", type=int, default=200)
    ap.add_argument("--systems", default="optuna-journal,optuna-sqlite,ray-tune")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    for system in args.systems.split(","):
        note = ""
        if system == "optuna-journal":
            path = os.path.join(args.dir, "optuna.journal")
            done, seconds, best = run_optuna(journal_storage(path), args.trials)
        elif system == "optuna-sqlite":
            path = os.path.join(args.dir, "optuna.sqlite3")
            done, seconds, best = run_optuna(f"sqlite:///{path}", args.trials)
        elif system == "ray-tune":
            done, seconds, best = run_ray(args.ray_trials, args.dir)
            if args.ray_trials != args.trials:
                note = f"{args.ray_trials} trials, not {args.trials}: rate extrapolated"
        else:
            sys.exit(f"unknown system {system!r}")
        print(
            json.dumps(
                {
                    "system": system,
                    "trials": done,
                    "seconds": seconds,
                    "rate": done / seconds if seconds > 0 else float("nan"),
                    "best": best,
                    "note": note,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
