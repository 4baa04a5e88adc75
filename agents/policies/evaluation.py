"""Evaluate a policy against dispatching rules and CP-SAT on benchmark instances.

:func:`evaluate` runs every method on every instance and returns the ``results.json``
document that ``autofab evaluate`` writes::

    {"settings": {"time_limit_s": 10, "cpsat_workers": 16, "cpu_count": 16, ...},
     "instances": {"ta01": {"best_known": 1231, "optimal": true,
                            "methods": {"policy": {"makespan": 1402, "gap": 0.139,
                                                   "seconds": 0.21, "decision_ms_p99": 0.9},
                                        "cpsat": {..., "status": "FEASIBLE"}}}},
     "mean_gap": {"policy": 0.139, "cpsat": 0.004}}

``improve`` is CP-SAT seeded with the best schedule the policy (when there is one) and the
dispatching rules found: that schedule is CP-SAT's first incumbent and its makespan an
upper bound, so ``improve`` is never worse than its seed, and its entry names the seed.

Gap is a fraction of the best-known makespan (0.12 = 12 %). Policies and rules run on the
same ``JobShopEnv``, so their numbers compare directly; CP-SAT solves the same instance
with the stated time limit and worker count. Every schedule is validated before it counts.
A dispatcher trained on delay schedules (``JobShop-v0``'s ``delay``, recorded in its file)
runs on an env with that ``delay`` on classic shops (:func:`policy_delay`): the same
instance and spaces, built by the scheme it was trained for; rules run non-delay.

:func:`expand_instances` turns the ``--instances`` text (``"ta01-ta10,ft10"``) into names.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from autofab.agents.policies.cpsat import RANDOM_SEED, CpSatError, available_cpus, solve_cpsat
from autofab.agents.policies.dispatcher import DispatcherPolicy, sample_schedule
from autofab.envs.instances import (
    Instance,
    InstanceError,
    benchmark_names,
    load_benchmark,
    random_instance,
)
from autofab.envs.jobshop import JobShopEnv
from autofab.envs.rules import RULES, RulePolicy
from autofab.envs.validate import validate_schedule

__all__ = [
    "CPSAT",
    "IMPROVE",
    "POLICY",
    "SAMPLED",
    "MethodResult",
    "PolicyFn",
    "evaluate",
    "expand_instances",
    "improve_schedule",
    "load_instance_by_name",
    "mean_gaps",
    "parse_methods",
    "policy_delay",
    "policy_delays",
    "run_policy",
    "run_sampled",
]

#: Method name of the CP-SAT reference solver.
CPSAT = "cpsat"
#: Method name of CP-SAT seeded with the best policy or rule schedule.
IMPROVE = "improve"
#: Method name under which the evaluated policy is reported.
POLICY = "policy"
#: Method name of the best of several schedules sampled from the policy.
SAMPLED = "sampled"
#: Seed the environments are reset with (JobShop-v0 on a fixed instance is deterministic).
EPISODE_SEED = 0

#: A policy as evaluation sees it: observation and action mask in, job index out.
PolicyFn = Callable[[NDArray[np.float32], NDArray[np.bool_]], int | np.integer[Any]]

_NAME = re.compile(r"([a-z]+)(\d+)")


# --------------------------------------------------------------------------- instances


_RANDOM_NAME = re.compile(r"random-(\d+)x(\d+)-s(\d+)")
_RANDOM_SET = re.compile(r"random:(\d+)x(\d+):(\d+)")


def load_instance_by_name(name: str) -> Instance:
    """A benchmark by name, or a seeded random instance named ``random-JxM-sSEED``
    (Taillard-style, the same instance on every machine)."""
    match = _RANDOM_NAME.fullmatch(name)
    if match:
        jobs, machines, seed = (int(g) for g in match.groups())
        return random_instance(jobs, machines, seed)
    return load_benchmark(name)


def expand_instances(text: str) -> list[str]:
    """Instance names from a comma list of names and ranges: ``"ta01-ta10,ft10"``.

    A range ``ta01-ta10`` stays within one family (same letters on both ends) and keeps
    the zero padding of its first name. ``random:20x20:5`` stands for five seeded random
    Taillard-style instances, ``random-20x20-s0`` to ``random-20x20-s4`` (they have no
    best-known makespan, so methods are compared by makespan). Names are
    case-insensitive; duplicates are dropped, first occurrence kept.

    Raises:
        InstanceError: A token is empty or malformed, a range is reversed or mixes
            families, or a name (also one inside a range) is not a benchmark. The message
            quotes the token at fault.
    """
    known = set(benchmark_names())
    names: list[str] = []
    tokens = [t.strip().lower() for t in text.split(",")]
    if not text.strip():
        raise InstanceError("--instances is empty; give names or ranges like ta01-ta10,ft10")
    for token in tokens:
        if not token:
            raise InstanceError(
                f"--instances {text!r} has an empty entry; separate names and ranges with "
                "single commas, e.g. ta01-ta10,ft10"
            )
        random_set = _RANDOM_SET.fullmatch(token)
        if random_set:
            jobs, machines, count = (int(g) for g in random_set.groups())
            if min(jobs, machines, count) < 1:
                raise InstanceError(
                    f"random instance set {token!r} needs jobs, machines and count >= 1"
                )
            names.extend(f"random-{jobs}x{machines}-s{seed}" for seed in range(count))
            continue
        if _RANDOM_NAME.fullmatch(token):
            names.append(token)
            continue
        expanded = _expand_range(token) if "-" in token else [token]
        for name in expanded:
            if name not in known:
                raise InstanceError(_unknown(name, token, known))
        names.extend(expanded)
    return list(dict.fromkeys(names))


def _expand_range(token: str) -> list[str]:
    parts = [p.strip() for p in token.split("-")]
    matches = [_NAME.fullmatch(p) for p in parts]
    if len(parts) != 2 or not all(matches):
        raise InstanceError(
            f"malformed instance range {token!r}: expected FIRST-LAST within one family, "
            "e.g. ta01-ta10"
        )
    (first, last) = (m for m in matches if m is not None)
    if first[1] != last[1]:
        raise InstanceError(
            f"instance range {token!r} mixes families {first[1]!r} and {last[1]!r}; a range "
            "stays within one family, e.g. ta01-ta10"
        )
    lo, hi = int(first[2]), int(last[2])
    if lo > hi:
        raise InstanceError(
            f"instance range {token!r} is reversed; write it low to high, "
            f"e.g. {first[1]}{last[2]}-{first[1]}{first[2]}"
        )
    width = len(first[2])
    return [f"{first[1]}{i:0{width}d}" for i in range(lo, hi + 1)]


def _unknown(name: str, token: str, known: set[str]) -> str:
    where = f"unknown benchmark instance {name!r}"
    if name != token:
        where += f" in range {token!r}"
    match = _NAME.fullmatch(name)
    if match:
        family = sorted(
            (int(m[2]), n) for n in known if (m := _NAME.fullmatch(n)) and m[1] == match[1]
        )
        if family:
            return f"{where}; the {match[1]} family is {family[0][1]}..{family[-1][1]}"
    return f"{where}; run 'autofab instances' to list them all"


def parse_methods(text: str) -> list[str]:
    """Baseline names from a comma list (``"spt,mwkr,cpsat"``), in order, duplicates dropped.

    Raises:
        ValueError: An entry is empty or names neither a rule of
            :data:`~autofab.envs.rules.RULES` nor ``cpsat`` nor ``improve``.
    """
    names = [p.strip().lower() for p in text.split(",")]
    choices = [*RULES, CPSAT, IMPROVE]
    for name in names:
        if not name:
            raise ValueError(
                f"--baselines {text!r} has an empty entry; give names separated by commas "
                f"({', '.join(choices)})"
            )
        if name not in choices:
            raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class MethodResult:
    """One method on one instance. ``summary()`` is its ``results.json`` entry."""

    instance: str
    method: str
    makespan: float
    gap: float | None
    seconds: float
    decision_ms_p99: float | None
    schedule: list[dict[str, Any]] = field(repr=False)
    status: str | None = None
    #: For ``improve``: the method whose schedule seeded the search, and its makespan.
    seed: str | None = None
    seed_makespan: float | None = None
    #: For ``sampled``: schedules built, and p99 of one lockstep step of all of them, ms.
    samples: int | None = None
    step_ms_p99: float | None = None
    #: For a policy run on delay schedules: ``JobShop-v0``'s ``delay`` it ran with.
    delay: float | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "makespan": self.makespan,
            "gap": self.gap,
            "seconds": self.seconds,
            "decision_ms_p99": self.decision_ms_p99,
        }
        if self.status is not None:
            out["status"] = self.status
        if self.seed is not None:
            out["seed"] = self.seed
            out["seed_makespan"] = self.seed_makespan
        if self.samples is not None:
            out["samples"] = self.samples
            out["step_ms_p99"] = self.step_ms_p99
        if self.delay is not None:
            out["delay"] = self.delay
        return out


def _gap(makespan: float, instance: Instance) -> float | None:
    return None if not instance.best_known else makespan / instance.best_known - 1.0


def run_policy(
    instance: Instance, policy: PolicyFn, method: str = POLICY, env: JobShopEnv | None = None
) -> MethodResult:
    """One episode of ``policy`` on ``instance``, timing every decision.

    The latency measured is the policy call alone (observation and mask in, action out),
    the number that matters when it dispatches a live plant.

    Raises:
        InvalidActionError: The policy picked an action the mask forbids.
        ScheduleError: The schedule breaks a hard invariant (a bug in the environment).
    """
    env = env if env is not None else JobShopEnv(instance)
    started = time.perf_counter()
    obs, _ = env.reset(seed=EPISODE_SEED)
    latencies: list[int] = []
    while True:
        mask = env.action_masks()
        t0 = time.perf_counter_ns()
        action = policy(obs, mask)
        latencies.append(time.perf_counter_ns() - t0)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    result = _episode_result(instance, method, info, time.perf_counter() - started, latencies)
    return result if env.delay is None else dataclasses.replace(result, delay=env.delay)


def policy_delay(policy: PolicyFn, instance: Instance) -> float | None:
    """The ``JobShop-v0`` ``delay`` to run ``policy`` with on ``instance``: the schedule-
    generation scheme it was trained on (a dispatcher's own; for an SB3 run, its
    ``--env-kwargs`` ``delay``), on classic shops; else None (non-delay, as rules run)."""
    if instance.is_flexible:
        return None
    if isinstance(policy, DispatcherPolicy):
        return policy.delay
    meta = getattr(policy, "meta", None)  # an SB3 run's policy.json (LoadedPolicy.meta)
    env_kwargs = meta.get("env_kwargs") if isinstance(meta, dict) else None
    delay = env_kwargs.get("delay") if isinstance(env_kwargs, dict) else None
    return float(delay) if isinstance(delay, int | float) and not isinstance(delay, bool) else None


def policy_delays(doc: Mapping[str, Any]) -> list[float]:
    """The delays the policy ran with across a results document (empty: non-delay)."""
    found = {
        entry["methods"][POLICY].get("delay")
        for entry in doc["instances"].values()
        if POLICY in entry["methods"]
    }
    return sorted(d for d in found if d is not None)


def _run_rule(instance: Instance, rule: str) -> MethodResult:
    env = JobShopEnv(instance)
    policy = RulePolicy(rule)
    started = time.perf_counter()
    env.reset(seed=EPISODE_SEED)
    latencies: list[int] = []
    while True:
        t0 = time.perf_counter_ns()
        action = policy(env)
        latencies.append(time.perf_counter_ns() - t0)
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return _episode_result(instance, rule, info, time.perf_counter() - started, latencies)


def _episode_result(
    instance: Instance, method: str, info: dict[str, Any], seconds: float, latencies: list[int]
) -> MethodResult:
    schedule = info["schedule"]
    validate_schedule(instance, schedule)
    makespan = float(info["makespan"])
    return MethodResult(
        instance=instance.name,
        method=method,
        makespan=makespan,
        gap=_gap(makespan, instance),
        seconds=seconds,
        decision_ms_p99=float(np.percentile(latencies, 99)) / 1e6,
        schedule=schedule,
    )


def run_sampled(instance: Instance, policy: PolicyFn, samples: int) -> MethodResult:
    """The best of ``samples`` schedules of a dispatcher (greedy one included).

    Raises:
        ValueError: ``policy`` is not a :class:`DispatcherPolicy` (sampling needs its
            scores), or the instance is flexible.
    """
    if not isinstance(policy, DispatcherPolicy):
        raise ValueError(
            f"sampling needs a self-labeling dispatcher (its job scores); got "
            f"{type(policy).__name__}"
        )
    result = sample_schedule(policy, instance, samples, seed=EPISODE_SEED)
    validate_schedule(instance, result.schedule)
    return MethodResult(
        instance=instance.name,
        method=SAMPLED,
        makespan=result.makespan,
        gap=_gap(result.makespan, instance),
        seconds=result.seconds,
        decision_ms_p99=None,
        schedule=result.schedule,
        samples=samples,
        step_ms_p99=result.step_ms_p99,
        delay=policy.delay,
    )


def _run_cpsat(instance: Instance, time_limit_s: float, workers: int) -> MethodResult:
    result = solve_cpsat(instance, time_limit_s, workers=workers)
    return MethodResult(
        instance=instance.name,
        method=CPSAT,
        makespan=result.makespan,
        gap=_gap(result.makespan, instance),
        seconds=result.seconds,
        decision_ms_p99=None,
        schedule=result.schedule,
        status=result.status,
    )


def improve_schedule(
    instance: Instance, seeds: Sequence[MethodResult], time_limit_s: float, workers: int
) -> MethodResult:
    """CP-SAT for ``time_limit_s`` seconds, started from the best of ``seeds``.

    The seed is the schedule with the lowest makespan (ties to the earlier seed). It goes
    to :func:`~autofab.agents.policies.cpsat.solve_cpsat` as a complete hint, so it is the
    search's first incumbent. Should CP-SAT still come back empty-handed or worse (it
    cannot, short of a solver bug), the seed itself is reported: improvement mode is
    never worse than its seed. ``seconds`` counts the solve only; the seeds' own time is
    in their entries.

    Raises:
        ValueError: ``seeds`` is empty.
    """
    if not seeds:
        raise ValueError("improve needs at least one seed schedule (a policy's or a rule's)")
    best = min(seeds, key=lambda r: r.makespan)
    started = time.perf_counter()
    try:
        solved = solve_cpsat(instance, time_limit_s, workers=workers, hint=best.schedule)
        makespan, schedule, status = solved.makespan, solved.schedule, solved.status
    except CpSatError:
        makespan, schedule, status = best.makespan, best.schedule, "SEED"
    if makespan > best.makespan:
        makespan, schedule, status = best.makespan, best.schedule, "SEED"
    return MethodResult(
        instance=instance.name,
        method=IMPROVE,
        makespan=makespan,
        gap=_gap(makespan, instance),
        seconds=time.perf_counter() - started,
        decision_ms_p99=None,
        schedule=schedule,
        status=status,
        seed=best.method,
        seed_makespan=best.makespan,
    )


def evaluate(
    instances: Sequence[str],
    methods: Sequence[str],
    time_limit_s: float,
    policy: PolicyFn | None = None,
    *,
    policy_factory: Callable[[JobShopEnv], PolicyFn] | None = None,
    workers: int | None = None,
    on_result: Callable[[MethodResult], None] | None = None,
    improve_s: float | None = None,
    samples: int | None = None,
) -> dict[str, Any]:
    """Run ``policy`` (if any) and every method on every instance; the results document.

    Args:
        instances: Benchmark or ``random-JxM-sSEED`` names (see :func:`expand_instances`).
        methods: Rule names from :data:`~autofab.envs.rules.RULES`, ``"cpsat"`` and/or
            ``"improve"``.
        time_limit_s: CP-SAT's time limit per instance, in seconds (> 0).
        policy: A callable ``(obs, mask) -> action`` run on ``JobShopEnv``, reported as
            ``"policy"``.
        policy_factory: Instead of ``policy``: builds the policy for each instance's
            environment, for policies that must see the environment's spaces (a trained
            model loaded per observation size).
        workers: CP-SAT workers; default every CPU this process may use.
        on_result: Called after each method finishes on an instance (progress bars, and
            callers that want the schedules, which the document leaves out).
        improve_s: Run ``"improve"`` with this CP-SAT budget per instance (adds it to
            ``methods`` if missing). Default: ``time_limit_s`` when ``"improve"`` is in
            ``methods``, so it has the same budget as ``"cpsat"``. Its seeds are the
            policy's schedule (and the sampled one) and every rule's, listed or not.
        samples: Also run ``"sampled"``: the best of this many schedules of the policy,
            which must be a :class:`DispatcherPolicy` (greedy one included).

    Returns:
        ``{"settings": ..., "instances": {name: {"best_known", "optimal", "methods"}},
        "mean_gap": {method: mean gap over instances with a best known, or None}}``.

    Raises:
        ValueError: An unknown method, a bad time limit, or both ``policy`` and
            ``policy_factory``; ``InstanceError`` for an unknown instance.
        CpSatError: CP-SAT found no schedule in time.
    """
    if policy is not None and policy_factory is not None:
        raise ValueError("give either policy or policy_factory, not both")
    if not time_limit_s > 0:
        raise ValueError(f"time limit must be > 0 seconds, got {time_limit_s}")
    if improve_s is not None and not improve_s > 0:
        raise ValueError(f"improve time limit must be > 0 seconds, got {improve_s}")
    methods = parse_methods(",".join(methods)) if methods else []
    if improve_s is not None and IMPROVE not in methods:
        methods.append(IMPROVE)
    improve_limit = time_limit_s if improve_s is None else improve_s
    n_workers = available_cpus() if workers is None else workers
    make_policy = policy_factory
    if policy is not None:

        def make_policy(env: JobShopEnv, fn: PolicyFn = policy) -> PolicyFn:
            return fn

    if samples is not None and (make_policy is None or samples < 1):
        raise ValueError(f"samples needs a dispatcher policy and a count >= 1, got {samples}")
    policy_methods = [POLICY] + ([SAMPLED] if samples is not None else [])
    names = [*policy_methods, *methods] if make_policy is not None else list(methods)
    loaded = [load_instance_by_name(name) for name in dict.fromkeys(instances)]
    doc: dict[str, Any] = {
        "settings": {
            "time_limit_s": time_limit_s,
            "improve_s": improve_limit if IMPROVE in methods else None,
            "cpsat_workers": n_workers,
            "cpu_count": available_cpus(),
            "cpsat_random_seed": RANDOM_SEED,
            "episode_seed": EPISODE_SEED,
            "methods": names,
            "samples": samples,
        },
        "instances": {},
    }
    for inst in loaded:
        results: dict[str, Any] = {}
        done: dict[str, MethodResult] = {}
        acting: PolicyFn | None = None
        for method in names:
            if method == POLICY and make_policy is not None:
                env = JobShopEnv(inst)
                acting = make_policy(env)
                delay = policy_delay(acting, inst)
                if delay is not None:  # the same spaces, the schedules it was trained on
                    env = JobShopEnv(inst, delay=delay)
                result = run_policy(inst, acting, env=env)
            elif method == SAMPLED and acting is not None and samples is not None:
                result = run_sampled(inst, acting, samples)
            elif method == CPSAT:
                result = _run_cpsat(inst, time_limit_s, n_workers)
            elif method == IMPROVE:
                seeds = [done[m] for m in policy_methods if m in done]
                seeds += [done[r] if r in done else _run_rule(inst, r) for r in RULES]
                result = improve_schedule(inst, seeds, improve_limit, n_workers)
            else:
                result = _run_rule(inst, method)
            done[method] = result
            results[method] = result.summary()
            if on_result is not None:
                on_result(result)
        doc["instances"][inst.name] = {
            "best_known": _plain(inst.best_known),
            "optimal": inst.optimal,
            "methods": results,
        }
    doc["mean_gap"] = mean_gaps(doc)
    return doc


def mean_gaps(doc: dict[str, Any]) -> dict[str, float | None]:
    """Mean gap per method over the instances that have a best-known makespan."""
    out: dict[str, float | None] = {}
    for method in doc["settings"]["methods"]:
        gaps = [
            entry["methods"][method]["gap"]
            for entry in doc["instances"].values()
            if entry["methods"][method]["gap"] is not None
        ]
        out[method] = float(np.mean(gaps)) if gaps else None
    return out


def _plain(x: float | None) -> int | float | None:
    return None if x is None else int(x) if float(x).is_integer() else x
