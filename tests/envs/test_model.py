"""PlantModel: dispatch and advance on instances small enough to schedule by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from autofab.envs import (
    Instance,
    InvalidActionError,
    PlantModel,
    instance_from_dict,
    load_instance,
    schedule_violations,
)

#: Two machines that can both mill.
MILLS = [{"name": "a", "capabilities": ["mill"]}, {"name": "b", "capabilities": ["mill"]}]


def snapshot(model: PlantModel) -> dict[str, Any]:
    """Everything a failed dispatch must leave as it was."""
    return {
        "now": model.now,
        "n_started": model.n_started,
        "job_next": model.job_next.copy(),
        "job_state": model.job_state.copy(),
        "machine_state": model.machine_state.copy(),
        "op_start": model.op_start.copy(),
        "op_end": model.op_end.copy(),
        "op_machine": model.op_machine.copy(),
        "mask": model.action_mask().copy(),
        "lower_bound": model.lower_bound(),
        "schedule": model.schedule(),
    }


def assert_unchanged(model: PlantModel, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value, err_msg=key)
        else:
            assert after[key] == value, key


def entry(job: int, index: int, machine: int, start: float, end: float) -> dict[str, Any]:
    return {"job": job, "index": index, "machine": machine, "start": start, "end": end}


# --------------------------------------------------------------------------- dispatch


def test_hand_computed_schedule(tiny_instance: Instance) -> None:
    model = PlantModel(tiny_instance)
    assert model.now == 0
    assert model.lower_bound() == 6  # machine M1 carries 4 + 2
    np.testing.assert_array_equal(model.action_mask(), [True, True])

    assert model.dispatch(0) == 0  # job 0's first operation: flat index 0
    np.testing.assert_array_equal(model.action_mask(), [False, True])
    assert model.dispatch(1) == 2  # job 1's first operation: flat index 2
    np.testing.assert_array_equal(model.action_mask(), [False, False])
    assert not model.all_started

    # M0 frees at 3, but job 0 next needs M1 (busy until 4) and job 1 is busy until 4.
    assert model.next_event_time() == 3
    assert model.advance() == 3
    np.testing.assert_array_equal(model.action_mask(), [False, False])
    assert model.advance() == 4
    np.testing.assert_array_equal(model.action_mask(), [True, True])
    np.testing.assert_array_equal(model.machine_idle(), [True, True])

    assert model.dispatch(1) == 3
    assert model.dispatch(0) == 1
    assert model.all_started
    np.testing.assert_array_equal(model.job_done, [True, True])
    assert model.makespan() == 6
    assert model.lower_bound() == 6
    assert model.schedule() == [
        entry(0, 0, 0, 0, 3),
        entry(1, 0, 1, 0, 4),
        entry(0, 1, 1, 4, 6),
        entry(1, 1, 0, 4, 5),
    ]
    np.testing.assert_array_equal(model.job_completion(), [6, 5])
    assert schedule_violations(tiny_instance, model.schedule()) == []

    # The remaining events are the two completions; then nothing is left.
    assert model.advance() == 5
    assert model.advance() == 6
    with pytest.raises(InvalidActionError, match="no event"):
        model.advance()


def test_advance_to_decision_jumps_to_the_next_dispatchable_time(tiny_instance: Instance) -> None:
    model = PlantModel(tiny_instance)
    model.advance_to_decision()  # something can start now: no move
    assert model.now == 0
    model.dispatch(0)
    model.dispatch(1)
    model.advance_to_decision()
    assert model.now == 4
    np.testing.assert_array_equal(model.action_mask(), [True, True])


def test_reset_restores_the_start(tiny_instance: Instance) -> None:
    model = PlantModel(tiny_instance)
    fresh = snapshot(model)
    model.dispatch(0)
    model.dispatch(1)
    model.advance()
    model.reset()
    assert_unchanged(model, fresh)


def test_tardiness_of_a_finished_run() -> None:
    inst = Instance.from_matrices([[0, 1], [1, 0]], [[3, 2], [4, 1]], due=[5, 4])
    model = PlantModel(inst)
    model.dispatch(0)
    model.dispatch(1)
    model.advance_to_decision()
    model.dispatch(0)
    model.dispatch(1)
    # job 0 ends at 6 (due 5), job 1 at 5 (due 4).
    assert model.tardiness() == 2


# --------------------------------------------------------------------------- invalid moves


def _at_time_three(inst: Instance) -> PlantModel:
    """t=3 in the hand schedule: M0 idle, M1 busy, both jobs busy or blocked."""
    model = PlantModel(inst)
    model.dispatch(0)
    model.dispatch(1)
    model.advance()
    assert model.now == 3
    return model


@pytest.mark.parametrize(
    ("job", "machine", "fragment"),
    [
        (1, None, "not ready"),  # its first operation runs until 4
        (0, None, "busy"),  # its next operation needs M1, busy until 4
        (0, 1, "busy"),
        (0, 0, "cannot do"),  # job 0's next operation is M1 only
    ],
)
def test_invalid_dispatch_raises_and_changes_nothing(
    tiny_instance: Instance, job: int, machine: int | None, fragment: str
) -> None:
    model = _at_time_three(tiny_instance)
    before = snapshot(model)
    with pytest.raises(InvalidActionError, match=fragment):
        model.dispatch(job, machine)
    assert_unchanged(model, before)


def test_dispatch_of_a_finished_job() -> None:
    inst = Instance.from_matrices([[0], [1]], [[2], [5]])
    model = PlantModel(inst)
    model.dispatch(0)
    model.advance()
    before = snapshot(model)
    with pytest.raises(InvalidActionError, match="no operation left"):
        model.dispatch(0)
    assert_unchanged(model, before)


@pytest.mark.parametrize("job", [2, -1])
def test_dispatch_of_a_job_that_does_not_exist(tiny_instance: Instance, job: int) -> None:
    model = PlantModel(tiny_instance)
    before = snapshot(model)
    with pytest.raises(InvalidActionError):
        model.dispatch(job)
    assert_unchanged(model, before)


@pytest.mark.parametrize("machine", [2, -1])
def test_dispatch_on_a_machine_that_does_not_exist(tiny_instance: Instance, machine: int) -> None:
    # Job 1's first operation runs on M1, the last machine: -1 must not alias it.
    model = PlantModel(tiny_instance)
    before = snapshot(model)
    with pytest.raises(InvalidActionError):
        model.dispatch(1, machine)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- release times


def test_release_time_delays_a_job() -> None:
    inst = Instance.from_matrices([[0, 1], [1, 0]], [[3, 2], [4, 1]], release=[0, 5])
    model = PlantModel(inst)
    np.testing.assert_array_equal(model.action_mask(), [True, False])
    before = snapshot(model)
    with pytest.raises(InvalidActionError, match="not ready"):
        model.dispatch(1)
    assert_unchanged(model, before)
    model.dispatch(0)  # M0 [0, 3)
    assert model.advance() == 3
    model.dispatch(0)  # M1 [3, 5)
    assert model.next_event_time() == 5  # M1 frees and job 1 is released together
    assert model.advance() == 5
    np.testing.assert_array_equal(model.action_mask(), [False, True])
    model.dispatch(1)  # M1 [5, 9)
    model.advance_to_decision()
    assert model.now == 9
    model.dispatch(1)  # M0 [9, 10)
    assert model.makespan() == 10
    assert model.schedule()[2] == entry(1, 0, 1, 5, 9)
    assert schedule_violations(inst, model.schedule()) == []


def test_release_alone_is_an_event() -> None:
    # Nothing runs at t=0; the only event is the release at 7.
    inst = Instance.from_matrices([[0]], [[2]], release=[7])
    model = PlantModel(inst)
    assert not model.action_mask().any()
    assert model.next_event_time() == 7
    model.advance_to_decision()
    assert model.now == 7
    model.dispatch(0)
    assert model.makespan() == 9


# --------------------------------------------------------------------------- lower bound


def test_lower_bound_equals_makespan_when_all_started() -> None:
    for name in ("ft06", "la01"):
        model = PlantModel(load_instance(name))
        rng = np.random.default_rng(0)
        while not model.all_started:
            model.advance_to_decision()
            model.dispatch(int(rng.choice(np.flatnonzero(model.action_mask()))))
        assert model.lower_bound() == model.makespan()


def test_lower_bound_is_a_lower_bound_that_only_rises() -> None:
    """On a classic shop at speed 1 the bound never exceeds the final makespan and never
    falls, so the dense reward -(change in bound) is never positive."""
    model = PlantModel(load_instance("ft06"))
    rng = np.random.default_rng(1)
    bounds = [model.lower_bound()]
    while not model.all_started:
        model.advance_to_decision()
        model.dispatch(int(rng.choice(np.flatnonzero(model.action_mask()))))
        bounds.append(model.lower_bound())
    assert np.all(np.diff(bounds) >= 0)
    assert max(bounds) == model.makespan()


def test_lower_bound_on_a_flexible_shop_does_not_exceed_the_makespan() -> None:
    # One operation: 10 on the first mill, 1 on the second. The model runs it on the
    # second (it finishes soonest), so the makespan, and the best possible, is 1.
    inst = instance_from_dict(
        {
            "machines": MILLS,
            "jobs": [{"operations": [{"capability": "mill", "durations": {"a": 10, "b": 1}}]}],
        }
    )
    model = PlantModel(inst)
    initial = model.lower_bound()
    model.dispatch(0)
    assert model.makespan() == 1
    assert model.lower_bound() == model.makespan()
    assert initial <= model.makespan()


# --------------------------------------------------------------------------- flexible


def test_flexible_picks_the_idle_machine_that_finishes_soonest(
    flexible_instance: Instance,
) -> None:
    model = PlantModel(flexible_instance)
    assert not model.classic
    # t=0: job 0 op 0 may run on mill-1 (5), mill-2 (7) or drill-1 (9): mill-1.
    assert model.choose_machine(0) == 0
    model.dispatch(0)
    assert model.op_machine[0] == 0
    # Job 2 op 0: mill-2 (3) or lathe-1 (8): mill-2.
    model.dispatch(2)
    assert model.op_machine[5] == 1
    assert model.op_end[5] == 3
    # Job 1 is released at 2; at t=3 job 2 op 1 wants mill-1 or mill-2 (2 each) or
    # drill-1 (1): drill-1 is idle and quickest.
    model.advance_to_decision()
    assert model.now == 2
    np.testing.assert_array_equal(model.action_mask(), [False, True, False])
    model.dispatch(1)  # lathe-1 [2, 6)
    model.advance_to_decision()
    assert model.now == 3
    model.dispatch(2)
    assert model.op_machine[6] == 3
    assert model.op_end[6] == 4


def test_flexible_falls_back_to_the_slower_idle_machine() -> None:
    inst = instance_from_dict(
        {
            "machines": MILLS,
            "jobs": [
                {"operations": [{"capability": "mill", "durations": {"a": 5, "b": 3}}]},
                {"operations": [{"capability": "mill", "durations": {"a": 4, "b": 6}}]},
                {"operations": [{"capability": "mill", "durations": {"a": 1, "b": 1}}]},
            ],
        }
    )
    model = PlantModel(inst)
    model.dispatch(0)  # b: 3 < 5
    model.dispatch(1)  # its faster machine a is the only idle one: 4
    assert model.op_machine.tolist() == [1, 0, -1]
    assert not model.action_mask()[2]  # both machines busy
    before = snapshot(model)
    with pytest.raises(InvalidActionError, match="no eligible machine is idle"):
        model.dispatch(2)
    assert_unchanged(model, before)
    model.advance_to_decision()
    assert model.now == 3
    model.dispatch(2)  # only b is idle again
    assert model.op_machine[2] == 1


def test_flexible_ties_go_to_the_lowest_machine() -> None:
    inst = instance_from_dict(
        {
            "machines": ["x", *MILLS],
            "jobs": [{"operations": [{"capability": "mill", "durations": {"b": 2, "a": 2}}]}],
        }
    )
    model = PlantModel(inst)
    model.dispatch(0)
    assert model.op_machine[0] == 1


def test_flexible_dispatch_on_a_chosen_machine(flexible_instance: Instance) -> None:
    model = PlantModel(flexible_instance)
    model.dispatch(0, machine=3)  # drill-1 is eligible, though slowest
    assert model.op_machine[0] == 3
    assert model.op_end[0] == 9
    before = snapshot(model)
    with pytest.raises(InvalidActionError, match="cannot do"):
        model.dispatch(2, machine=0)  # job 2 op 0 is mill-2 or lathe-1
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- speed


def test_speed_two_halves_processing_time(tiny_instance: Instance) -> None:
    model = PlantModel(tiny_instance)
    model.set_speed(0, 2.0)
    model.dispatch(0)  # M0: 3 / 2
    model.dispatch(1)  # M1: 4 at speed 1
    assert model.op_end[0] == 1.5
    assert model.op_end[2] == 4
    model.advance_to_decision()
    assert model.now == 4
    model.dispatch(0)
    model.dispatch(1)  # M0: 1 / 2
    assert model.op_end[3] == 4.5
    assert model.makespan() == 6
    assert schedule_violations(tiny_instance, model.schedule(), speeds=model.speed) == []
    assert schedule_violations(tiny_instance, model.schedule()) != []


def test_speed_on_a_flexible_shop_changes_the_choice() -> None:
    inst = instance_from_dict(
        {
            "machines": MILLS,
            "jobs": [{"operations": [{"capability": "mill", "durations": {"a": 5, "b": 3}}]}],
        }
    )
    model = PlantModel(inst)
    model.set_speed(0, 2.0)  # a: 2.5 beats b: 3
    model.dispatch(0)
    assert model.op_machine[0] == 0
    assert model.op_end[0] == 2.5


@pytest.mark.parametrize("speed", [0.0, -1.0, float("nan")])
def test_bad_speed_is_refused(tiny_instance: Instance, speed: float) -> None:
    model = PlantModel(tiny_instance)
    with pytest.raises(ValueError, match="speed"):
        model.set_speed(0, speed)
    np.testing.assert_array_equal(model.speed, [1.0, 1.0])
