"""Training throughput: environment steps per second while SB3 trains on ``JobShop-v0``.

The issue's yardstick is SB3 on CartPole ("about 3,700 steps/s here"), so the peer is
exactly that, measured in the same run: PPO with SB3's defaults on ``CartPole-v1``. Ours
are MaskablePPO (sb3-contrib) with the same defaults on ``autofab/JobShop-v0`` with random
15x15 Taillard-style instances, the researchers' setting, and the self-labeling trainer of
the shipped dispatcher (``autofab train --algo self_labeling``, the config's settings but
15x15 instances only, once with each feature set), which samples its schedules on the
lockstep ``BatchJobShop``. All train single-process with one torch thread; only training
is timed (construction is not). Steps/s therefore include the network updates, as a
researcher experiences them.

    python benchmarks/training_speed.py                 # 3 repeats of 8192 steps each
    python benchmarks/training_speed.py --steps 20000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import gymnasium as gym
import torch
from common import environment_info, header, markdown_table, spread
from sb3_contrib import MaskablePPO
from stable_baselines3 import PPO

import autofab.envs  # noqa: F401  (registers autofab/JobShop-v0)

SIZE = {"jobs": 15, "machines": 15}
OURS, PEER = "autofab JobShop-v0 (MaskablePPO)", "CartPole-v1 (PPO)"
#: Self-labeling runs: name -> the dispatcher feature set they train and the schedules'
#: ``delay`` (the shipped file reads ``queues`` on delay 0.4 schedules; its earlier stages
#: read ``basic`` and ``routing`` on non-delay ones).
SELF_LABELING: dict[str, tuple[str, float | None]] = {
    "autofab JobShop-v0 (self-labeling, basic features)": ("basic", None),
    "autofab JobShop-v0 (self-labeling, routing features)": ("routing", None),
    "autofab JobShop-v0 (self-labeling, queue features, delay 0.4: shipped)": ("queues", 0.4),
}


def time_learn(make: Callable[[], object], steps: int) -> float:
    """Steps per second of one ``learn(steps)`` call (model built outside the timer)."""
    model = make()
    start = time.perf_counter()
    model.learn(steps)  # type: ignore[attr-defined]
    return steps / (time.perf_counter() - start)


def time_self_labeling(steps: int, features: str, delay: float | None) -> float:
    """Environment steps per second of self-labeling training for about ``steps`` steps,
    training a dispatcher that reads the feature set ``features`` on ``delay`` schedules."""
    from autofab.agents.policies.self_labeling import train_self_labeling

    start = time.perf_counter()
    policy = train_self_labeling(
        iterations=10**9,
        sizes=[(SIZE["jobs"], SIZE["machines"])],
        imitation_instances=0,
        validation_instances_per_size=0,
        max_env_steps=steps,
        features=features,
        delay=delay,
    )
    return int(policy.meta["env_steps"]) / (time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8192, help="environment steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per side")
    args = parser.parse_args(argv)
    if args.steps < 2048 or args.repeats < 1:
        parser.error("--steps must be >= 2048 (one PPO rollout) and --repeats >= 1")
    torch.set_num_threads(1)
    print(header(environment_info("gymnasium", "stable-baselines3", "sb3-contrib", "torch")))
    print(
        "ours: MaskablePPO('MlpPolicy', JobShop-v0 random 15x15), SB3 defaults, 1 env; "
        "self-labeling (64 samples x 4 instances per step, 10x the steps); "
        "peer: PPO('MlpPolicy', CartPole-v1), SB3 defaults, 1 env; 1 torch thread"
    )

    def ours() -> object:
        env = gym.make("autofab/JobShop-v0", instance=SIZE)
        return MaskablePPO("MlpPolicy", env, seed=0, device="cpu")

    def peer() -> object:
        return PPO("MlpPolicy", gym.make("CartPole-v1"), seed=0, device="cpu")

    rates: dict[str, list[float]] = {OURS: [], **{name: [] for name in SELF_LABELING}, PEER: []}
    for _ in range(args.repeats):
        # Alternate them so that load on a shared machine hits all alike.
        rates[PEER].append(time_learn(peer, args.steps))
        rates[OURS].append(time_learn(ours, args.steps))
        for name, (features, delay) in SELF_LABELING.items():
            rates[name].append(time_self_labeling(args.steps * 10, features, delay))
    ours_median = statistics.median(rates[OURS])
    peer_median = statistics.median(rates[PEER])
    rows = [
        [name, spread(values), f"{statistics.median(values) / peer_median:.2f}x"]
        for name, values in rates.items()
    ]
    print(f"\ntraining steps/s, median [min-max] over {args.repeats} repeats of {args.steps} steps")
    print(markdown_table(["run", "steps/s", "ratio to CartPole"], rows, left=1))
    print(f"ratio (MaskablePPO on JobShop-v0 / CartPole): {ours_median / peer_median:.2f}")
    for name, (features, delay) in SELF_LABELING.items():
        ratio = statistics.median(rates[name]) / peer_median
        scheme = "non-delay" if delay is None else f"delay {delay:g}"
        print(
            f"ratio (self-labeling, feature set {features}, {scheme}, on JobShop-v0 / CartPole): "
            f"{ratio:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
