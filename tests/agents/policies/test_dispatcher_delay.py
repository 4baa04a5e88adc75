"""A dispatcher trained on delay schedules (JobShop-v0's ``delay``): training, its file,
and evaluation on the schedules it was trained for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autofab.agents.policies import self_labeling
from autofab.agents.policies.dispatcher import (
    DispatcherLoadError,
    DispatcherPolicy,
    greedy_picker,
    load_dispatcher,
    rollout,
    sample_schedule,
    save_dispatcher,
)
from autofab.agents.policies.evaluation import evaluate, policy_delay
from autofab.envs.instances import Instance, load_instance

DELAY = 0.5


@pytest.fixture(scope="module")
def delayed() -> DispatcherPolicy:
    return self_labeling.train_self_labeling(
        iterations=2,
        samples=3,
        batch=2,
        sizes=[(4, 3)],
        imitation_instances=1,
        validation_instances_per_size=1,
        validate_every=1,
        delay=DELAY,
    )


def greedy_makespan(policy: DispatcherPolicy, inst: Instance, delay: float | None) -> float:
    return float(rollout(inst, 1, greedy_picker(policy, inst.n_jobs), delay=delay).makespans[0])


def test_training_builds_and_validates_on_delay_schedules(delayed: DispatcherPolicy) -> None:
    assert delayed.delay == DELAY
    assert delayed.meta["settings"]["delay"] == DELAY
    validation = self_labeling.validation_instances(1)
    ratios = [
        greedy_makespan(delayed, v, DELAY) / max(v.job_total_work.max(), v.machine_load.max())
        for v in validation
    ]
    assert delayed.meta["validation_makespan_over_lb"] == pytest.approx(np.mean(ratios), abs=1e-4)
    # Fine-tuning keeps the init's scheme unless told otherwise.
    tuned = self_labeling.train_self_labeling(
        iterations=0, init=delayed, validation_instances_per_size=0
    )
    assert tuned.delay == DELAY
    other = self_labeling.train_self_labeling(
        iterations=0, init=delayed, delay=0.0, validation_instances_per_size=0
    )
    assert other.delay == 0.0


def test_the_file_keeps_the_delay_and_older_files_are_non_delay(
    delayed: DispatcherPolicy, tmp_path: Path
) -> None:
    path = save_dispatcher(delayed, tmp_path / "d.npz")
    assert load_dispatcher(path).delay == DELAY
    plain = DispatcherPolicy(delayed.layers, features=delayed.features)
    assert load_dispatcher(save_dispatcher(plain, tmp_path / "plain.npz")).delay is None
    with np.load(path) as data:
        arrays = dict(data)
    v3 = {**arrays, "format_version": np.asarray(3)}
    del v3["delay"]
    np.savez(tmp_path / "v3.npz", **v3)
    assert load_dispatcher(tmp_path / "v3.npz").delay is None
    np.savez(tmp_path / "bad.npz", **{**arrays, "delay": np.asarray(2.0)})
    with pytest.raises(DispatcherLoadError, match=r"delay is None or a number in \[0, 1\]"):
        load_dispatcher(tmp_path / "bad.npz")


def test_evaluate_runs_it_on_the_schedules_it_was_trained_for(
    delayed: DispatcherPolicy, flexible_instance: Instance
) -> None:
    doc = evaluate(["ft06", "la01"], [], 1.0, policy=delayed, samples=4)
    for name in ("ft06", "la01"):
        inst = load_instance(name)
        methods = doc["instances"][name]["methods"]
        assert methods["policy"]["makespan"] == greedy_makespan(delayed, inst, DELAY)
        assert methods["sampled"]["makespan"] <= methods["policy"]["makespan"]
        assert methods["policy"]["delay"] == methods["sampled"]["delay"] == DELAY
    sampled = sample_schedule(delayed, load_instance("ft06"), 4)
    assert sampled.makespan == doc["instances"]["ft06"]["methods"]["sampled"]["makespan"]
    # Flexible shops have no delay schedules: there it runs non-delay.
    assert policy_delay(delayed, load_instance("ft06")) == DELAY
    assert policy_delay(delayed, flexible_instance) is None


def test_bad_delays_are_refused_by_name() -> None:
    assert self_labeling.check_hyperparams({"delay": 0.25}) == {"delay": 0.25}
    assert self_labeling.check_hyperparams({"delay": None}) == {"delay": None}
    for bad in (2, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="delay="):
            self_labeling.check_hyperparams({"delay": bad})
    with pytest.raises(ValueError, match=r"delay=1\.5"):
        self_labeling.train_self_labeling(iterations=1, delay=1.5)
