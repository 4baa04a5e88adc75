"""The dispatcher's feature sets: the routing and queue features against their definitions,
and files of each set (and of the older format) loading where they fit and refused where
not."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from autofab.agents.policies import self_labeling
from autofab.agents.policies.artifacts import PolicyLoadError, load_policy
from autofab.agents.policies.dispatcher import (
    N_FEATURES,
    N_QUEUE,
    N_ROUTING,
    DispatcherLoadError,
    DispatcherPolicy,
    feature_lineage,
    job_features,
    load_dispatcher,
    n_features,
    save_dispatcher,
)
from autofab.envs.batch import BatchJobShop
from autofab.envs.instances import load_instance, random_instance
from autofab.envs.jobshop import JobShopEnv, observation_blocks


def _routing_by_definition(sim: BatchJobShop, copy: int) -> np.ndarray:
    """The routing features of one copy, job by job, from the simulator's own state."""
    inst = sim.instance
    n_jobs, n_machines = inst.n_jobs, inst.n_machines
    big_t = inst.max_duration
    big_w = float(inst.job_total_work.max())
    load = float(inst.machine_load.max())
    now = sim.now[copy]
    machine_of = np.argmax(inst.eligible, axis=1)
    duration = inst.min_duration
    nxt = sim._next[copy]
    done = nxt == inst.n_ops
    machine = np.where(done, -1, machine_of[np.minimum(nxt, inst.n_ops - 1)])
    ready = np.maximum(sim._ready[copy], now) - now
    work = sim._work[copy]
    op_time = np.where(done, 0.0, duration[np.minimum(nxt, inst.n_ops - 1)])
    bound = float((ready + work).max())
    out = np.zeros((n_jobs, N_ROUTING))
    for j in range(n_jobs):
        if done[j]:
            out[j, 7] = max(-bound / big_t, -1.0)  # no rivals: their bound is 0
            continue
        m = machine[j]
        out[j, 0] = sim._machine_work[copy, m] / load
        second = nxt[j] + 1
        if second < inst.job_offsets[j + 1]:
            m2 = machine_of[second]
            out[j, 1] = duration[second] / big_t
            out[j, 2] = min(max(sim._free[copy, m2] - now, 0.0) / big_t, 1.0)
            out[j, 3] = sim._machine_work[copy, m2] / load
        rivals = [k for k in range(n_jobs) if k != j and not done[k] and machine[k] == m]
        out[j, 4] = len(rivals) / n_jobs
        out[j, 5] = sum(bool(sim.mask[copy, k]) for k in rivals) / n_jobs
        end = op_time[j]
        rivals_bound = max([max(ready[k], end) + work[k] for k in rivals], default=0.0)
        out[j, 6] = min(rivals_bound / (big_t + big_w), 1.0)
        out[j, 7] = np.clip((rivals_bound - bound) / big_t, -1.0, 1.0)
        delay = sum(max(end - ready[k], 0.0) for k in rivals)
        out[j, 8] = min(delay / (4.0 * big_t), 1.0)
    assert n_machines == sim._free.shape[1] - 1
    return out


@pytest.mark.parametrize("instance", ["ft06", "ta01", "random"])
def test_routing_features_match_their_definition_along_random_schedules(instance: str) -> None:
    rng = np.random.default_rng(3)
    inst = random_instance(9, 5, rng) if instance == "random" else load_instance(instance)
    sim = BatchJobShop(inst, 3)
    while not sim.done:
        obs = sim.observe()
        blocks = observation_blocks(obs, inst.n_jobs, inst.n_machines)
        feats = job_features(obs, inst.n_jobs, "routing")
        for copy in range(3):
            expected = _routing_by_definition(sim, copy)
            own = feats[copy, :, N_FEATURES : N_FEATURES + N_ROUTING]
            np.testing.assert_allclose(own, expected, atol=2e-5)
            np.testing.assert_allclose(
                feats[copy, :, N_FEATURES + N_ROUTING : N_FEATURES + 2 * N_ROUTING],
                np.broadcast_to(own.mean(axis=0), own.shape),
                rtol=1e-6,
            )
            np.testing.assert_array_equal(
                feats[copy, :, N_FEATURES + 2 * N_ROUTING :],
                np.broadcast_to(own.max(axis=0), own.shape),
            )
        np.testing.assert_array_equal(
            feats[:, :, :N_FEATURES], job_features(obs, inst.n_jobs, "basic")
        )
        assert blocks["job_next_machine"].shape == (3, inst.n_jobs)
        picks = [rng.choice(np.flatnonzero(row)) for row in sim.mask]
        sim.step(np.asarray(picks))


def _queues_by_definition(sim: BatchJobShop, copy: int) -> np.ndarray:
    """The queue features of one copy, job by job, from the simulator's own state."""
    inst = sim.instance
    n_jobs = inst.n_jobs
    big_t = inst.max_duration
    now = sim.now[copy]
    machine_of = np.argmax(inst.eligible, axis=1)
    duration = inst.min_duration
    nxt = sim._next[copy]
    done = nxt == inst.n_ops
    machine = [None if done[j] else int(machine_of[nxt[j]]) for j in range(n_jobs)]
    has_after = [not done[j] and nxt[j] + 1 < inst.job_offsets[j + 1] for j in range(n_jobs)]
    after = [int(machine_of[nxt[j] + 1]) if has_after[j] else None for j in range(n_jobs)]
    work = sim._machine_work[copy, : inst.n_machines]
    out = np.zeros((n_jobs, N_QUEUE))
    for j in range(n_jobs):
        m1, m2 = machine[j], after[j]
        if m1 is not None:
            out[j, 3] = work[m1] / work.max()
        if m2 is None:
            continue
        queue = [k for k in range(n_jobs) if machine[k] == m2]
        out[j, 0] = len(queue) / n_jobs
        out[j, 1] = sum(duration[nxt[k]] for k in queue) / big_t / 4.0
        wait = min(max(sim._ready[copy, j] - now, 0.0) / big_t, 1.0)
        m2_wait = min(max(sim._free[copy, m2] - now, 0.0) / big_t, 1.0)
        idle = float(np.clip(wait + duration[nxt[j]] / big_t - m2_wait, -1.0, 1.0))
        out[j, 2] = idle if not queue else 0.0
        out[j, 4] = work[m2] / work.max()
        out[j, 5] = idle
    return out


@pytest.mark.parametrize(("instance", "delay"), [("ft06", None), ("la01", 0.4), ("random", 0.7)])
def test_queue_features_match_their_definition_along_random_schedules(
    instance: str, delay: float | None
) -> None:
    rng = np.random.default_rng(5)
    inst = random_instance(9, 5, rng) if instance == "random" else load_instance(instance)
    sim = BatchJobShop(inst, 3, delay)
    while not sim.done:
        obs = sim.observe()
        feats = job_features(obs, inst.n_jobs, "queues")
        assert feats.shape == (3, inst.n_jobs, n_features("queues"))
        np.testing.assert_array_equal(
            feats[..., : n_features("routing")], job_features(obs, inst.n_jobs, "routing")
        )
        for copy in range(3):
            np.testing.assert_allclose(
                feats[copy, :, n_features("routing") :],
                _queues_by_definition(sim, copy),
                atol=3e-5,
                err_msg=f"decision {sim.n_started}, copy {copy}",
            )
        picks = [rng.choice(np.flatnonzero(row)) for row in sim.mask]
        sim.step(np.asarray(picks))


def _basic_policy(seed: int = 0, hidden: int = 8) -> DispatcherPolicy:
    rng = np.random.default_rng(seed)
    sizes = [N_FEATURES, hidden, hidden, 1]
    return DispatcherPolicy(
        [
            (rng.normal(size=(a, b)).astype(np.float32), rng.normal(size=b).astype(np.float32))
            for a, b in itertools.pairwise(sizes)
        ]
    )


def test_a_basic_init_starts_a_routing_network_as_the_same_function() -> None:
    basic = _basic_policy()
    routing = self_labeling.train_self_labeling(
        iterations=0, init=basic, hidden=8, features="routing", validation_instances_per_size=0
    )
    assert routing.features == "routing"
    assert routing.layers[0][0].shape == (n_features("routing"), 8)
    env = JobShopEnv("ta01")
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(
        routing.scores(job_features(obs, 15, "routing")),
        basic.scores(job_features(obs, 15, "basic")),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="init weights read the 'routing' features"):
        self_labeling.train_self_labeling(iterations=0, init=routing, hidden=8, features="basic")
    again = self_labeling.train_self_labeling(
        iterations=0, init=routing, hidden=8, validation_instances_per_size=0
    )
    assert again.features == "routing"  # an init's feature set is the default


def test_an_init_of_any_set_a_set_extends_starts_it_as_the_same_function() -> None:
    assert feature_lineage("queues") == ["basic", "routing", "queues"]
    basic = _basic_policy(seed=1)
    env = JobShopEnv("ta01", delay=0.4)
    obs, _ = env.reset(seed=0)
    expected = basic.scores(job_features(obs, 15, "basic"))
    for init in (basic, _widened(basic, "routing")):
        queues = _widened(init, "queues")
        assert queues.layers[0][0].shape == (n_features("queues"), 8)
        np.testing.assert_allclose(
            queues.scores(job_features(obs, 15, "queues")), expected, atol=1e-5
        )
    with pytest.raises(ValueError, match="'basic', 'routing'"):
        self_labeling.train_self_labeling(iterations=0, init=queues, hidden=8, features="routing")


def _widened(policy: DispatcherPolicy, features: str) -> DispatcherPolicy:
    """``policy`` as a network of the larger set ``features`` (the same function)."""
    return self_labeling.train_self_labeling(
        iterations=0, init=policy, hidden=8, features=features, validation_instances_per_size=0
    )
    with pytest.raises(ValueError, match="features="):
        self_labeling.train_self_labeling(iterations=0, features="graph")


def test_files_of_either_set_and_the_older_format_load_where_they_fit(tmp_path: Path) -> None:
    env = JobShopEnv("ft06")
    obs, _ = env.reset(seed=0)
    mask = env.action_masks()
    routing = self_labeling.train_self_labeling(
        iterations=0,
        init=_basic_policy(),
        hidden=8,
        features="routing",
        validation_instances_per_size=0,
    )
    path = save_dispatcher(routing, tmp_path / "routing.npz")
    again = load_policy(path, env)
    assert isinstance(again, DispatcherPolicy)
    assert again.features == "routing"
    assert again(obs, mask) == routing(obs, mask)

    # Format 2 (before feature sets): basic features, a layout without the routing blocks.
    basic = _basic_policy()
    with np.load(save_dispatcher(basic, tmp_path / "basic.npz")) as data:
        arrays = dict(data)
    old_layout = [n for n in arrays["layout"] if "next2" not in n and "next_machine" not in n]
    old_layout.remove("op_time_to_work")
    v2 = {**arrays, "format_version": np.asarray(2), "layout": np.asarray(old_layout)}
    del v2["features"]
    np.savez(tmp_path / "v2.npz", **v2)
    loaded = load_policy(tmp_path / "v2.npz", env)
    assert isinstance(loaded, DispatcherPolicy)
    assert loaded.features == "basic"
    assert loaded(obs, mask) == basic(obs, mask)

    # A routing file whose layout lacked a block it reads, a basic one that lacks one,
    # and a feature set this autofab does not know are refused by name.
    with np.load(path) as data:
        arrays = dict(data)
    np.savez(tmp_path / "lacks.npz", **{**arrays, "layout": np.asarray(old_layout)})
    with pytest.raises(DispatcherLoadError, match=r"reads observation block\(s\) \['job_next"):
        load_dispatcher(tmp_path / "lacks.npz")
    no_time = [n for n in old_layout if n != "time"]
    np.savez(tmp_path / "no_time.npz", **{**v2, "layout": np.asarray(no_time)})
    with pytest.raises(PolicyLoadError, match=r"\['time'\] that the layout it was trained on"):
        load_policy(tmp_path / "no_time.npz", env)
    np.savez(tmp_path / "graph.npz", **{**arrays, "features": np.asarray("graph")})
    with pytest.raises(DispatcherLoadError, match="feature set 'graph'"):
        load_dispatcher(tmp_path / "graph.npz")
