"""Train one shared MaskablePPO policy for every machine on ``factory_parallel_v0`` and
compare it with dispatching baselines on the same seeds.

The policy is trained by :func:`autofab.agents.policies.shared_training.train_shared_policy`
(parameter sharing: all machines' experience trains one network) and evaluated by
:func:`~autofab.agents.policies.shared_training.evaluate_shared_policy` against MWKR and
the first candidate (earliest due date), both at nominal speed without maintenance and
run through the same environment. Evaluation seeds default to 1000 and up, apart from
the training shifts (seeded from ``--seed``).

Run from the repository root::

    python benchmarks/parallel_training.py                       # 200k agent steps, 8 h shifts
    python benchmarks/parallel_training.py -n 20000 --horizon 2h --eval-seeds 1000,1001
    python benchmarks/parallel_training.py -f runs/              # keep model, config, results

With ``-f DIR`` the run folder ``DIR/factory_parallel_v0__shared_maskable_ppo__SEED__TIME``
keeps ``model.zip``, ``config.yml`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import yaml

from autofab.agents.policies.shared_training import evaluate_shared_policy, train_shared_policy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--n-timesteps", type=int, default=200_000, help="agent steps")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--plant", default="demo", help="shipped plant name or YAML path")
    parser.add_argument("--horizon", default=None, help="shift length, e.g. 8h (default: plant)")
    parser.add_argument("--n-envs", type=int, default=1, help="factories stepped side by side")
    parser.add_argument("--n-steps", type=int, default=256, help="rollout steps per agent")
    parser.add_argument(
        "--eval-seeds", default="1000,1001,1002,1003,1004", help="comma-separated seeds"
    )
    parser.add_argument("-f", "--log-folder", type=Path, default=None, help="save the run here")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]

    start = time.perf_counter()
    model = train_shared_policy(
        plant=args.plant,
        total_timesteps=args.n_timesteps,
        seed=args.seed,
        horizon=args.horizon,
        n_envs=args.n_envs,
        n_steps=args.n_steps,
        progress_bar=args.progress,
    )
    train_s = time.perf_counter() - start
    table = evaluate_shared_policy(model, plant=args.plant, seeds=seeds, horizon=args.horizon)

    print(f"command: {shlex.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}")
    print(f"trained {args.n_timesteps} agent steps in {train_s:.0f} s; eval seeds {seeds}")
    kpis = list(next(iter(table.values())))
    print(f"{'policy':<8} " + " ".join(f"{k:>15}" for k in kpis))
    for name, row in table.items():
        print(f"{name:<8} " + " ".join(f"{row[k]:>15.3f}" for k in kpis))

    if args.log_folder is not None:
        run = args.log_folder / (
            f"factory_parallel_v0__shared_maskable_ppo__{args.seed}__{int(time.time())}"
        )
        run.mkdir(parents=True, exist_ok=True)
        model.save(run / "model.zip")
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (run / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        (run / "results.json").write_text(json.dumps(table, indent=2))
        print(f"saved to {run}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
