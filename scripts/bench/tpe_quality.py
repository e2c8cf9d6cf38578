#!/usr/bin/env python3
"""TPE quality, Optuna's side: the best value of a test function after
--trials sequential trials of optuna.samplers.TPESampler(seed=s), for each
seed of --seeds FIRST..LAST, and the median.

Two settings, both with n_startup_trials=10 (Optuna's default and ours):
  default      TPESampler(seed=s) as shipped (Optuna >= 5 models the
               parameters jointly: multivariate TPE)
  independent  multivariate=False, the per-parameter TPE of Bergstra et al.

Usage: tpe_quality.py [--trials 100] [--seeds 1..5] [--function hartmann6|branin] [--json]
"""

import argparse
import json
import statistics
import time

import optuna

from hartmann6 import branin, hartmann6  # scripts/bench/hartmann6.py

FUNCTIONS = {
    # name: (parameter bounds, objective of the suggested values, optimum)
    "hartmann6": ([(f"x{j}", 0.0, 1.0) for j in range(1, 7)], hartmann6, -3.32237),
    "branin": ([("x1", -5.0, 10.0), ("x2", 0.0, 15.0)], lambda x: branin(*x), 0.397887),
}

SETTINGS = {
    "default": {},
    "independent": {"multivariate": False},
}


def best_of(function, seed, trials, extra):
    bounds, value, _ = FUNCTIONS[function]

    def objective(trial):
        return value([trial.suggest_float(name, low, high) for name, low, high in bounds])

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, **extra)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    study.optimize(objective, n_trials=trials)
    return study.best_value


def seed_range(text):
    first, last = (int(s) for s in text.split(".."))
    return list(range(first, last + 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seeds", type=seed_range, default=seed_range("1..5"))
    ap.add_argument("--function", choices=sorted(FUNCTIONS), default="hartmann6")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = []
    for name, extra in SETTINGS.items():
        start = time.perf_counter()
        best = [best_of(args.function, s, args.trials, extra) for s in args.seeds]
        results.append(
            {
                "system": f"optuna-tpe-{name}",
                "optuna": optuna.__version__,
                "function": args.function,
                "trials": args.trials,
                "seeds": args.seeds,
                "best": best,
                "median": statistics.median(best),
                "optimum": FUNCTIONS[args.function][2],
                "seconds": time.perf_counter() - start,
            }
        )
    if args.json:
        for r in results:
            print(json.dumps(r))
        return
    for r in results:
        print(f"Optuna {r['optuna']} TPE ({r['system']}), {r['function']}, {r['trials']} trials")
        for s, b in zip(r["seeds"], r["best"]):
            print(f"  seed {s}: best {b:.5f}")
        print(f"  median: {r['median']:.5f}")


if __name__ == "__main__":
    main()
