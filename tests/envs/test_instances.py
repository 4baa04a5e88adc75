"""Instances: benchmarks, random instances, the JSON form, and errors that name the fault."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import autofab.envs  # noqa: F401  (registers autofab/JobShop-v0)
from autofab.envs import (
    Instance,
    InstanceError,
    benchmark_names,
    instance_from_dict,
    instance_to_dict,
    load_instance,
    random_instance,
    save_instance,
)

FIELDS = (
    "name",
    "machine_names",
    "machine_capabilities",
    "job_offsets",
    "op_capability",
    "durations",
    "eligible",
    "release",
    "due",
    "best_known",
    "optimal",
)


def assert_same_instance(a: Instance, b: Instance) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype.kind == y.dtype.kind, name
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x == y, name


# --------------------------------------------------------------------------- benchmarks


def test_benchmark_names_cover_ft_la_ta() -> None:
    names = set(benchmark_names())
    expected = {"ft06", "ft10"}
    expected |= {f"la{i:02d}" for i in range(1, 41)}
    expected |= {f"ta{i:02d}" for i in range(1, 81)}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("name", benchmark_names())
def test_every_benchmark_loads(name: str) -> None:
    inst = load_instance(name)
    assert inst.name == name
    assert inst.best_known is not None
    assert inst.best_known > 0
    assert not inst.is_flexible
    assert inst.n_ops == int(np.diff(inst.job_offsets).sum())
    # A classic shop: one eligible machine per operation, a positive time there.
    assert np.all(inst.eligible.sum(axis=1) == 1)
    assert np.all(inst.durations[inst.eligible] >= 0)
    # No machine can finish its own work before the best-known makespan.
    assert inst.durations.sum(axis=0).max() <= inst.best_known
    assert inst.job_total_work.max() <= inst.best_known


@pytest.mark.parametrize(
    ("name", "jobs", "machines", "best", "optimal"),
    [
        ("ft06", 6, 6, 55, True),
        ("ft10", 10, 10, 930, True),
        ("la01", 10, 5, 666, True),
        ("ta01", 15, 15, 1231, True),
        ("ta80", 100, 20, 5183, True),
    ],
)
def test_benchmark_facts(name: str, jobs: int, machines: int, best: float, optimal: bool) -> None:
    inst = load_instance(name)
    assert (inst.n_jobs, inst.n_machines, inst.n_ops) == (jobs, machines, jobs * machines)
    assert inst.best_known == best
    assert inst.optimal is optimal


def test_ft06_data_matches_the_published_matrix() -> None:
    # First two jobs of Fisher and Thompson's 6x6 instance: (machine, time) pairs.
    inst = load_instance("ft06")
    job0 = [(2, 1), (0, 3), (1, 6), (3, 7), (5, 3), (4, 6)]
    job1 = [(1, 8), (2, 5), (4, 10), (5, 10), (0, 10), (3, 4)]
    for j, route in enumerate((job0, job1)):
        ops = range(int(inst.job_offsets[j]), int(inst.job_offsets[j + 1]))
        got = [(int(np.argmax(inst.eligible[o])), float(inst.durations[o].max())) for o in ops]
        assert got == route


def test_unknown_benchmark_names_it() -> None:
    with pytest.raises(InstanceError, match="unknown benchmark instance 'ta999'"):
        load_instance("ta999")


# --------------------------------------------------------------------------- random


def test_random_instance_is_deterministic_per_seed() -> None:
    assert_same_instance(random_instance(8, 5, 42), random_instance(8, 5, 42))
    gen_a = random_instance(8, 5, np.random.default_rng(7))
    gen_b = random_instance(8, 5, np.random.default_rng(7))
    np.testing.assert_array_equal(gen_a.durations, gen_b.durations)


def test_random_instance_differs_across_seeds() -> None:
    seen = {random_instance(6, 4, seed).durations.tobytes() for seed in range(10)}
    assert len(seen) == 10
    assert not np.array_equal(random_instance(6, 4, 0).eligible, random_instance(6, 4, 1).eligible)


@pytest.mark.parametrize(("jobs", "machines", "seed"), [(1, 1, 0), (3, 7, 1), (15, 15, 2)])
def test_random_instance_shape_and_ranges(jobs: int, machines: int, seed: int) -> None:
    inst = random_instance(jobs, machines, seed)
    assert (inst.n_jobs, inst.n_machines, inst.n_ops) == (jobs, machines, jobs * machines)
    times = inst.durations[inst.eligible]
    assert times.min() >= 1
    assert times.max() <= 99
    np.testing.assert_array_equal(times, np.round(times))
    assert np.all(inst.eligible.sum(axis=1) == 1)
    for j in range(jobs):
        ops = slice(int(inst.job_offsets[j]), int(inst.job_offsets[j + 1]))
        # Each job visits each machine exactly once.
        np.testing.assert_array_equal(inst.eligible[ops].sum(axis=0), np.ones(machines))
    np.testing.assert_array_equal(inst.release, np.zeros(jobs))
    assert np.all(inst.due > 0)


def test_random_instance_uses_the_whole_range() -> None:
    times = random_instance(50, 20, 3).durations
    times = times[times > 0]
    assert times.min() <= 5
    assert times.max() >= 95
    narrow = random_instance(10, 10, 3, low=4, high=6).durations
    assert set(np.unique(narrow[narrow > 0])) == {4, 5, 6}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"jobs": 0, "machines": 3}, "jobs"),
        ({"jobs": 3, "machines": -1}, "machines"),
        ({"jobs": 2.5, "machines": 3}, "jobs"),
        ({"jobs": True, "machines": 3}, "jobs"),
        ({"jobs": "3", "machines": 3}, "jobs"),
        ({"jobs": 3, "machines": 3, "low": 5, "high": 2}, "low"),
        ({"jobs": 3, "machines": 3, "low": -1, "high": 2}, "low"),
    ],
)
def test_bad_random_instance_arguments(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InstanceError, match=fragment):
        random_instance(seed=0, **kwargs)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"jobs": 0, "machines": 4}, "jobs"),
        ({"jobs": 6, "machines": 0}, "machines"),
        ({"jobs": 6.5, "machines": 4}, "jobs"),
        ({"jobs": 6, "machines": "4"}, "machines"),
        ({"jobs": 6, "machines": 4, "low": 10, "high": 3}, "low"),
        ({"jobs": 6, "machines": 4, "seed": 1}, "seed"),
    ],
)
def test_bad_random_spec_in_the_env(spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InstanceError, match=fragment):
        gym.make("autofab/JobShop-v0", instance=spec)


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("source", ["ft06", "ta01", "random"])
def test_json_round_trip_of_classic_instances(source: str, tmp_path: Path) -> None:
    inst = random_instance(7, 3, 5) if source == "random" else load_instance(source)
    assert_same_instance(instance_from_dict(instance_to_dict(inst)), inst)
    path = save_instance(inst, tmp_path / f"{source}.json")
    assert path.is_file()
    assert_same_instance(load_instance(path), inst)
    assert_same_instance(load_instance(str(path)), inst)


def test_json_round_trip_of_a_flexible_instance(
    flexible_spec: dict[str, Any], tmp_path: Path
) -> None:
    flexible_spec["best_known"] = 12.5
    flexible_spec["optimal"] = False
    inst = instance_from_dict(flexible_spec)
    assert inst.is_flexible
    assert inst.best_known == 12.5
    assert inst.optimal is False
    back = instance_from_dict(instance_to_dict(inst))
    assert_same_instance(back, inst)
    path = save_instance(inst, tmp_path / "cell.json")
    assert_same_instance(load_instance(path), inst)
    # The JSON form is plain JSON and a fixed point of the round trip.
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == instance_to_dict(inst)
    assert instance_to_dict(instance_from_dict(data)) == data


def test_flexible_instance_reads_as_written(flexible_instance: Instance) -> None:
    inst = flexible_instance
    assert inst.name == "cell-a"
    assert inst.machine_names == ("mill-1", "mill-2", "lathe-1", "drill-1")
    assert inst.machine_capabilities[3] == frozenset({"drill", "mill"})
    assert "lathe-1" in inst.machine_capabilities[2]
    np.testing.assert_array_equal(inst.job_offsets, [0, 3, 5, 8])
    assert inst.op_capability[:3] == ("mill", "lathe-1", "drill")
    np.testing.assert_array_equal(inst.eligible[0], [True, True, False, True])
    np.testing.assert_array_equal(inst.durations[0], [5, 7, 0, 9])
    assert inst.durations[2, 3] == 2.5
    # Operation 0 of job 2 names no capability: exactly its listed machines may do it.
    np.testing.assert_array_equal(inst.eligible[5], [False, True, True, False])
    np.testing.assert_array_equal(inst.release, [0, 2, 0])
    # Job 0's due date is given; the others follow the total-work-content rule.
    assert inst.due[0] == 40
    assert inst.due[1] == pytest.approx(2 + 1.5 * (4 + 4))
    assert inst.due[2] == pytest.approx(0 + 1.5 * (3 + 1 + 4))


def test_name_argument_overrides_the_json_name(flexible_spec: dict[str, Any]) -> None:
    assert instance_from_dict(flexible_spec, name="other").name == "other"


def test_file_without_name_takes_the_file_stem(
    flexible_spec: dict[str, Any], tmp_path: Path
) -> None:
    del flexible_spec["name"]
    path = tmp_path / "line-3.json"
    path.write_text(json.dumps(flexible_spec), encoding="utf-8")
    assert load_instance(path).name == "line-3"


# --------------------------------------------------------------------------- errors


def test_from_matrices_shape_mismatch() -> None:
    with pytest.raises(InstanceError, match=r"shape \(2, 3\).*shape \(2, 2\)"):
        Instance.from_matrices([[0, 1, 2], [2, 1, 0]], [[1, 2], [3, 4]], name="bad")


def test_from_matrices_ragged_rows() -> None:
    with pytest.raises(InstanceError, match="rectangular"):
        Instance.from_matrices([[0, 1], [1]], [[1, 2], [3]])


def test_from_matrices_negative_time_names_job_and_operation() -> None:
    with pytest.raises(InstanceError, match=r"job 1 operation 2: processing time -4"):
        Instance.from_matrices([[0, 1, 2], [2, 1, 0]], [[1, 2, 3], [4, 5, -4]], name="neg")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_from_matrices_non_finite_time(bad: float) -> None:
    with pytest.raises(InstanceError, match=r"job 0 operation 1: processing time"):
        Instance.from_matrices([[0, 1]], [[1, bad]])


def test_from_matrices_without_operations() -> None:
    with pytest.raises(InstanceError, match="no operations"):
        Instance.from_matrices([[], []], [[], []])


def test_from_matrices_negative_machine_id() -> None:
    with pytest.raises(InstanceError, match=r"job 0 operation 1: machine id -1"):
        Instance.from_matrices([[0, -1]], [[1, 1]])


def test_from_matrices_release_of_wrong_length() -> None:
    with pytest.raises(InstanceError, match="release"):
        Instance.from_matrices([[0, 1], [1, 0]], [[1, 1], [1, 1]], release=[0, 1, 2])


def test_json_negative_time_names_job_operation_and_machine(
    flexible_spec: dict[str, Any],
) -> None:
    flexible_spec["jobs"][1]["operations"][1]["durations"]["mill-2"] = -3
    with pytest.raises(InstanceError, match=r"job 1 operation 1: processing time -3 on .*'mill-2'"):
        instance_from_dict(flexible_spec)


def test_json_unknown_machine_is_named(flexible_spec: dict[str, Any]) -> None:
    flexible_spec["jobs"][2]["operations"][1]["durations"]["grinder-9"] = 4
    with pytest.raises(InstanceError, match=r"job 2 operation 1: unknown machine 'grinder-9'"):
        instance_from_dict(flexible_spec)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_json_non_finite_time(flexible_spec: dict[str, Any], bad: float) -> None:
    flexible_spec["jobs"][0]["operations"][2]["durations"]["drill-1"] = bad
    with pytest.raises(InstanceError, match=r"job 0 operation 2: processing time"):
        instance_from_dict(flexible_spec)


def test_json_file_with_nan_literal(flexible_spec: dict[str, Any], tmp_path: Path) -> None:
    flexible_spec["jobs"][0]["operations"][0]["durations"]["mill-1"] = math.nan
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(flexible_spec), encoding="utf-8")  # writes a bare NaN
    assert "NaN" in path.read_text(encoding="utf-8")
    with pytest.raises(InstanceError, match=r"job 0 operation 0: processing time nan"):
        load_instance(path)


@pytest.mark.parametrize(
    ("key", "bad"), [("release", -1), ("release", math.inf), ("due", math.nan)]
)
def test_json_bad_release_or_due(flexible_spec: dict[str, Any], key: str, bad: float) -> None:
    flexible_spec["jobs"][1][key] = bad
    with pytest.raises(InstanceError, match=rf"job 1: {key}"):
        instance_from_dict(flexible_spec)


def test_json_job_without_operations(flexible_spec: dict[str, Any]) -> None:
    flexible_spec["jobs"][1]["operations"] = []
    with pytest.raises(InstanceError, match="job 1 has no operations"):
        instance_from_dict(flexible_spec)


def test_json_operation_without_machines(flexible_spec: dict[str, Any]) -> None:
    flexible_spec["jobs"][0]["operations"][1]["durations"] = {}
    with pytest.raises(InstanceError, match="job 0 operation 1: no machine is eligible"):
        instance_from_dict(flexible_spec)


def test_json_capability_the_machine_lacks(flexible_spec: dict[str, Any]) -> None:
    flexible_spec["jobs"][0]["operations"][0]["durations"]["lathe-1"] = 4
    with pytest.raises(InstanceError, match=r"job 0 operation 0 .*'mill'.*'lathe-1'"):
        instance_from_dict(flexible_spec)


def test_json_duplicate_machine_names(flexible_spec: dict[str, Any]) -> None:
    flexible_spec["machines"].append("mill-1")
    with pytest.raises(InstanceError, match="not unique"):
        instance_from_dict(flexible_spec)


def test_json_unknown_top_level_key(flexible_spec: dict[str, Any]) -> None:
    flexible_spec["machiness"] = []
    with pytest.raises(InstanceError, match="machiness"):
        instance_from_dict(flexible_spec)


@pytest.mark.parametrize("data", [[1, 2], "cell", 3])
def test_json_that_is_not_an_object(data: Any) -> None:
    with pytest.raises(InstanceError, match="object"):
        instance_from_dict(data)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(InstanceError, match=r"nowhere\.json.*does not exist"):
        load_instance(path)


def test_invalid_json_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"machines": ["M0"], "jobs": [', encoding="utf-8")
    with pytest.raises(InstanceError, match=r"broken\.json.*not valid JSON"):
        load_instance(path)


def test_json_file_holding_a_list(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(InstanceError, match="object"):
        load_instance(path)
