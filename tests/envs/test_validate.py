"""Schedule validation: valid schedules pass, and every kind of corruption is caught."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from autofab.envs import (
    Instance,
    JobShopEnv,
    PlantModel,
    RulePolicy,
    ScheduleError,
    instance_from_dict,
    load_instance,
    random_instance,
    run_episode,
    schedule_violations,
    validate_schedule,
)

Schedule = list[dict[str, Any]]

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A corruption kind -> the words its violation must contain.
KINDS = {
    "missing": "is missing",
    "duplicate": "scheduled 2 times",
    "ineligible": "cannot do it",
    "duration": "expected",
    "precedence": "before its predecessor ends",
    "overlap": "overlaps",
    "release": "before the job's release",
}


def op_name(job: int, index: int) -> str:
    return f"job {job} operation {index}"


# --------------------------------------------------------------------------- corruptions


def feasible_kinds(inst: Instance, schedule: Schedule) -> list[str]:
    """The corruptions that can be applied to this schedule so that they are detectable."""
    kinds = ["missing", "duplicate", "duration", "release"]
    if any(not inst.eligible[_op(inst, e)].all() for e in schedule):
        kinds.append("ineligible")
    if inst.max_ops_per_job > 1:
        kinds.append("precedence")
    if _overlap_pairs(schedule):
        kinds.append("overlap")
    return kinds


def _op(inst: Instance, e: dict[str, Any]) -> int:
    return int(inst.job_offsets[e["job"]]) + int(e["index"])


def _overlap_pairs(schedule: Schedule) -> list[tuple[int, int]]:
    """Pairs of entries on one machine that both take time (so can be made to overlap)."""
    pairs = []
    for a, ea in enumerate(schedule):
        for b, eb in enumerate(schedule):
            same_machine = a < b and ea["machine"] == eb["machine"]
            if same_machine and ea["end"] > ea["start"] and eb["end"] > eb["start"]:
                pairs.append((a, b))
    return pairs


def corrupt(
    inst: Instance, schedule: Schedule, kind: str, data: st.DataObject
) -> tuple[Schedule, str]:
    """Break ``schedule`` in one way; returns it and the operation the break is about."""
    bad = copy.deepcopy(schedule)
    pick = data.draw(st.integers(0, len(bad) - 1), label="entry")
    e = bad[pick]
    if kind == "missing":
        del bad[pick]
    elif kind == "duplicate":
        bad.append(dict(e))
    elif kind == "duration":
        e["end"] = e["end"] + data.draw(st.sampled_from([-0.5, 1, 7.25]), label="delta")
    elif kind == "release":
        job = e["job"]
        first = next(x for x in bad if x["job"] == job and x["index"] == 0)
        shift = first["start"] - inst.release[job] + data.draw(st.integers(1, 5), label="early")
        first["start"] -= shift
        first["end"] -= shift
        e = first
    elif kind == "ineligible":
        candidates = [x for x in bad if not inst.eligible[_op(inst, x)].all()]
        e = data.draw(st.sampled_from(candidates), label="ineligible entry")
        others = np.flatnonzero(~inst.eligible[_op(inst, e)]).tolist()
        e["machine"] = data.draw(st.sampled_from(others), label="machine")
    elif kind == "precedence":
        later = [x for x in bad if x["index"] > 0]
        e = data.draw(st.sampled_from(later), label="later op")
        prev = next(x for x in bad if x["job"] == e["job"] and x["index"] == e["index"] - 1)
        length = e["end"] - e["start"]
        e["start"] = prev["end"] - data.draw(st.integers(1, 3), label="early")
        e["end"] = e["start"] + length
    elif kind == "overlap":
        a, b = data.draw(st.sampled_from(_overlap_pairs(bad)), label="pair")
        first, second = bad[a], bad[b]
        length = second["end"] - second["start"]
        second["start"] = first["start"]
        second["end"] = first["start"] + length
        e = second
    else:  # pragma: no cover
        raise AssertionError(kind)
    return bad, op_name(e["job"], e["index"])


def assert_detected(inst: Instance, schedule: Schedule, kind: str, about: str) -> None:
    problems = schedule_violations(inst, schedule)
    hits = [p for p in problems if KINDS[kind] in p]
    assert hits, (kind, about, problems)
    assert any(about in p for p in hits), (kind, about, problems)
    with pytest.raises(ScheduleError) as err:
        validate_schedule(inst, schedule)
    assert err.value.violations == problems


def check_corruptions(inst: Instance, schedule: Schedule, data: st.DataObject) -> None:
    """Apply each feasible kind of corruption, in a drawn way, and check it is caught."""
    kinds = feasible_kinds(inst, schedule)
    for kind in kinds:
        event(f"corruption: {kind}")
        bad, about = corrupt(inst, schedule, kind, data)
        assert_detected(inst, bad, kind, about)
    assert schedule_violations(inst, schedule) == []  # the corruptions worked on copies


# --------------------------------------------------------------------------- strategies


@st.composite
def classic_instances(draw: st.DrawFn) -> Instance:
    jobs = draw(st.integers(1, 5), label="jobs")
    machines = draw(st.integers(1, 4), label="machines")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    low = draw(st.integers(0, 3), label="low")
    high = draw(st.integers(max(low, 1), 20), label="high")
    return random_instance(jobs, machines, seed, low=low, high=high)


@st.composite
def flexible_instances(draw: st.DrawFn) -> Instance:
    n_machines = draw(st.integers(1, 4), label="machines")
    names = [f"m{i}" for i in range(n_machines)]
    skills = ["mill", "turn", "drill"]
    caps = [draw(st.sets(st.sampled_from(skills), min_size=1), label=f"caps {m}") for m in names]
    offered = sorted(set().union(*caps))
    jobs = []
    for _ in range(draw(st.integers(1, 4), label="jobs")):
        ops = []
        for _ in range(draw(st.integers(1, 4), label="ops")):
            if draw(st.booleans(), label="named capability"):
                cap = draw(st.sampled_from(offered), label="capability")
                able = [m for m, c in zip(names, caps, strict=True) if cap in c]
                chosen = draw(st.sets(st.sampled_from(able), min_size=1), label="eligible")
                op: dict[str, Any] = {"capability": cap}
            else:
                chosen = draw(st.sets(st.sampled_from(names), min_size=1), label="eligible")
                op = {}
            op["durations"] = {
                m: draw(st.integers(1, 12) | st.sampled_from([0.5, 2.5]), label="time")
                for m in sorted(chosen)
            }
            ops.append(op)
        job: dict[str, Any] = {"operations": ops}
        job["release"] = draw(st.integers(0, 10), label="release")
        jobs.append(job)
    machines = [{"name": n, "capabilities": sorted(c)} for n, c in zip(names, caps, strict=True)]
    return instance_from_dict({"name": "hypo", "machines": machines, "jobs": jobs})


def env_schedule(inst: Instance, data: st.DataObject) -> dict[str, Any]:
    """Run JobShop-v0 to the end, drawing each action as an index into the valid ones."""
    env = JobShopEnv(instance=inst)
    env.reset(seed=0)
    terminated, info = False, {}
    steps = 0
    while not terminated:
        valid = np.flatnonzero(env.action_masks())
        assert len(valid) > 0
        i = data.draw(st.integers(0, len(valid) - 1), label="action index")
        _, _, terminated, truncated, info = env.step(int(valid[i]))
        assert not truncated
        steps += 1
    assert steps == inst.n_ops
    return info


def model_schedule(inst: Instance, data: st.DataObject) -> PlantModel:
    """Drive PlantModel directly, drawing the job and also the idle eligible machine."""
    model = PlantModel(inst)
    while not model.all_started:
        model.advance_to_decision()
        job = int(data.draw(st.sampled_from(np.flatnonzero(model.action_mask()).tolist())))
        op = int(model.job_next[job])
        idle = np.flatnonzero(inst.eligible[op] & model.machine_idle()).tolist()
        model.dispatch(job, data.draw(st.sampled_from(idle), label="machine"))
    return model


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(inst=classic_instances() | flexible_instances(), data=st.data())
def test_random_episodes_give_valid_schedules_and_corruptions_are_caught(
    inst: Instance, data: st.DataObject
) -> None:
    info = env_schedule(inst, data)
    schedule = info["schedule"]
    assert schedule_violations(inst, schedule) == []
    assert len(schedule) == inst.n_ops
    assert info["makespan"] == pytest.approx(max(e["end"] for e in schedule))
    check_corruptions(inst, schedule, data)


@SETTINGS
@given(inst=flexible_instances(), data=st.data())
def test_model_with_any_idle_machine_gives_valid_schedules(
    inst: Instance, data: st.DataObject
) -> None:
    model = model_schedule(inst, data)
    schedule = model.schedule()
    assert schedule_violations(inst, schedule) == []
    assert model.makespan() == pytest.approx(max(e["end"] for e in schedule))
    assert model.lower_bound() == pytest.approx(model.makespan())
    check_corruptions(inst, schedule, data)


@SETTINGS
@given(
    inst=classic_instances(),
    speeds=st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), max_size=4),
    data=st.data(),
)
def test_schedules_at_speed_validate_with_their_speeds(
    inst: Instance, speeds: list[float], data: st.DataObject
) -> None:
    model = PlantModel(inst)
    for m, s in enumerate(speeds[: inst.n_machines]):
        model.set_speed(m, s)
    while not model.all_started:
        model.advance_to_decision()
        model.dispatch(
            int(data.draw(st.sampled_from(np.flatnonzero(model.action_mask()).tolist())))
        )
    assert schedule_violations(inst, model.schedule(), speeds=model.speed) == []


# --------------------------------------------------------------------------- by hand


@pytest.fixture
def ft06_schedule() -> tuple[Instance, Schedule]:
    info = run_episode(JobShopEnv(instance="ft06"), RulePolicy("mwkr"), seed=0)
    return load_instance("ft06"), info["schedule"]


def test_valid_schedule_has_no_violations(ft06_schedule: tuple[Instance, Schedule]) -> None:
    inst, schedule = ft06_schedule
    assert schedule_violations(inst, schedule) == []
    validate_schedule(inst, schedule)


def find(schedule: Schedule, job: int, index: int) -> dict[str, Any]:
    return next(e for e in schedule if e["job"] == job and e["index"] == index)


def test_each_corruption_on_ft06(ft06_schedule: tuple[Instance, Schedule]) -> None:
    inst, schedule = ft06_schedule

    bad = [e for e in schedule if (e["job"], e["index"]) != (3, 2)]
    assert schedule_violations(inst, bad) == ["job 3 operation 2 is missing"]

    bad = copy.deepcopy(schedule)
    bad.append(dict(find(bad, 4, 0)))
    assert "job 4 operation 0 is scheduled 2 times" in schedule_violations(inst, bad)

    bad = copy.deepcopy(schedule)
    e = find(bad, 0, 0)  # runs on M2
    e["machine"] = 5
    assert any("job 0 operation 0 runs on machine 5" in p for p in schedule_violations(inst, bad))

    bad = copy.deepcopy(schedule)
    find(bad, 1, 3)["end"] += 1
    assert any(
        p.startswith("job 1 operation 3 on machine") and "expected 10" in p
        for p in schedule_violations(inst, bad)
    )

    bad = copy.deepcopy(schedule)
    e, prev = find(bad, 2, 4), find(bad, 2, 3)
    length = e["end"] - e["start"]
    e["start"] = prev["end"] - 1
    e["end"] = e["start"] + length
    assert any(
        "job 2 operation 4 starts at" in p and "predecessor" in p
        for p in schedule_violations(inst, bad)
    )

    bad = copy.deepcopy(schedule)
    on_m0 = sorted((e for e in bad if e["machine"] == 0), key=lambda e: e["start"])
    first, second = on_m0[0], on_m0[1]
    length = second["end"] - second["start"]
    second["start"] = first["end"] - 1
    second["end"] = second["start"] + length
    assert any(
        p.startswith("machine 0:") and "overlaps" in p for p in schedule_violations(inst, bad)
    )


def test_start_before_release() -> None:
    inst = Instance.from_matrices([[0, 1], [1, 0]], [[3, 2], [4, 1]], release=[0, 5])
    schedule = [
        {"job": 0, "index": 0, "machine": 0, "start": 0, "end": 3},
        {"job": 0, "index": 1, "machine": 1, "start": 3, "end": 5},
        {"job": 1, "index": 0, "machine": 1, "start": 5, "end": 9},
        {"job": 1, "index": 1, "machine": 0, "start": 9, "end": 10},
    ]
    assert schedule_violations(inst, schedule) == []
    early = copy.deepcopy(schedule)
    early[2].update(start=4.5, end=8.5)  # M1 is free from 5, but the overlap is not the point
    problems = schedule_violations(inst, early)
    assert any("job 1 operation 0 starts at 4.5, before the job's release 5" in p for p in problems)


def test_overlap_is_found_past_a_short_neighbour() -> None:
    # A long op on M0 overlaps two later ones; the one right after it is short.
    inst = Instance.from_matrices([[0], [0], [0]], [[10], [1], [1]])
    schedule = [
        {"job": 0, "index": 0, "machine": 0, "start": 0, "end": 10},
        {"job": 1, "index": 0, "machine": 0, "start": 2, "end": 3},
        {"job": 2, "index": 0, "machine": 0, "start": 5, "end": 6},
    ]
    problems = schedule_violations(inst, schedule)
    assert problems
    assert all("overlaps" in p for p in problems)


def test_partial_schedule_check(ft06_schedule: tuple[Instance, Schedule]) -> None:
    inst, schedule = ft06_schedule
    early = [e for e in schedule if e["end"] <= 20]
    assert schedule_violations(inst, early, complete=False) == []
    assert any("is missing" in p for p in schedule_violations(inst, early))


@pytest.mark.parametrize(
    "entry",
    [
        {"job": 9, "index": 0, "machine": 0, "start": 0, "end": 1},
        {"job": 0, "index": 6, "machine": 0, "start": 0, "end": 1},
        {"job": 0, "index": 0, "machine": 6, "start": 0, "end": 1},
        {"job": 0, "index": 0, "machine": 2, "start": float("nan"), "end": 1},
        {"job": 0, "index": 0, "machine": 2, "start": 0},
    ],
)
def test_malformed_entries(entry: dict[str, Any]) -> None:
    problems = schedule_violations(load_instance("ft06"), [entry], complete=False)
    assert len(problems) == 1
    assert "entry" in problems[0]


def test_schedule_error_lists_every_violation() -> None:
    inst = load_instance("ft06")
    with pytest.raises(ScheduleError, match=r"36 schedule violation\(s\)") as err:
        validate_schedule(inst, [])
    assert len(err.value.violations) == 36
    assert "... and 16 more" in str(err.value)
