#!/usr/bin/env python3
"""TPE quality, Optuna's side: the best Hartmann-6 value after 100 sequential
trials of optuna.samplers.TPESampler(seed=s) for seeds 1..5, and the median.

Two settings, both with n_startup_trials=10 (Optuna's default and ours):
  default      TPESampler(seed=s) as shipped (Optuna >= 5 models the
               parameters jointly: multivariate TPE)
  independent  multivariate=False, the per-parameter TPE of Bergstra et al.
               that Ringleader implements

Usage: tpe_quality.py [--trials 100] [--seeds 5] [--json]
"""

import argparse
import json
import statistics
import time

import optuna

from hartmann6 import hartmann6  # scripts/bench/hartmann6.py

OPTIMUM = -3.32237


def objective(trial):
    return hartmann6([trial.suggest_float(f"x{j}", 0.0, 1.0) for j in range(1, 7)])


SETTINGS = {
    "default": {},
    "independent": {"multivariate": False},
}


def best_of(seed, trials, extra):
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, **extra)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(objective, n_trials=trials)
    return study.best_value


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seeds = list(range(1, args.seeds + 1))
    results = []
    for name, extra in SETTINGS.items():
        start = time.perf_counter()
        best = [best_of(s, args.trials, extra) for s in seeds]
        results.append(
            {
                "system": f"optuna-tpe-{name}",
                "optuna": optuna.__version__,
                "trials": args.trials,
                "seeds": seeds,
                "best": best,
                "median": statistics.median(best),
                "optimum": OPTIMUM,
                "seconds": time.perf_counter() - start,
            }
        )
    if args.json:
        for r in results:
            print(json.dumps(r))
        return
    for r in results:
        print(f"Optuna {r['optuna']} TPE ({r['system']}), Hartmann-6, {r['trials']} trials")
        for s, b in zip(r["seeds"], r["best"]):
            print(f"  seed {s}: best {b:.5f}")
        print(f"  median: {r['median']:.5f}")


if __name__ == "__main__":
    main()
