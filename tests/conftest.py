"""Shared fixtures: small hand-made instances whose schedules can be worked out by hand."""

from __future__ import annotations

from typing import Any

import pytest

from autofab.envs import Instance, instance_from_dict
from autofab.envs.factory import DEFAULT_REWARD_WEIGHTS


@pytest.fixture
def tiny_instance() -> Instance:
    """Two jobs on two machines.

    job 0: M0 for 3, then M1 for 2; job 1: M1 for 4, then M0 for 1. Dispatching both at
    t=0 gives M0 [0,3) job 0, M1 [0,4) job 1, then at t=4 M1 [4,6) job 0 and M0 [4,5)
    job 1: makespan 6, which is also the optimum (machine M1 carries 6 units of work).
    """
    return Instance.from_matrices([[0, 1], [1, 0]], [[3, 2], [4, 1]], name="tiny")


@pytest.fixture
def flexible_spec() -> dict[str, Any]:
    """A hand-written flexible instance in JSON form.

    Two mills that share the ``mill`` capability, a lathe, and a drill press that also
    mills. Operations list several eligible machines, one omits its capability, jobs have
    release times and one has an explicit due date.
    """
    return {
        "name": "cell-a",
        "machines": [
            {"name": "mill-1", "capabilities": ["mill"]},
            {"name": "mill-2", "capabilities": ["mill"]},
            "lathe-1",
            {"name": "drill-1", "capabilities": ["drill", "mill"]},
        ],
        "jobs": [
            {
                "release": 0,
                "due": 40,
                "operations": [
                    {"capability": "mill", "durations": {"mill-1": 5, "mill-2": 7, "drill-1": 9}},
                    {"durations": {"lathe-1": 3}},
                    {"capability": "drill", "durations": {"drill-1": 2.5}},
                ],
            },
            {
                "release": 2,
                "operations": [
                    {"capability": "lathe-1", "durations": {"lathe-1": 4}},
                    {"capability": "mill", "durations": {"mill-1": 6, "mill-2": 4}},
                ],
            },
            {
                "operations": [
                    # No capability named and no shared one: the listed machines are the truth.
                    {"durations": {"mill-2": 3, "lathe-1": 8}},
                    {"capability": "mill", "durations": {"mill-1": 2, "mill-2": 2, "drill-1": 1}},
                    {"capability": "drill", "durations": {"drill-1": 4}},
                ],
            },
        ],
    }


@pytest.fixture
def flexible_instance(flexible_spec: dict[str, Any]) -> Instance:
    return instance_from_dict(flexible_spec)


@pytest.fixture
def expected_return():
    """The documented reward, summed over an episode, computed from the final KPIs.

    An oracle independent of the envs' own reward bookkeeping: both factory envs are
    held to it.
    """

    def compute(kpis: dict, weights: dict) -> float:
        w = {**DEFAULT_REWARD_WEIGHTS, **weights}
        return (
            w["parts"] * kpis["parts_good"]
            - w["tardiness_h"] * kpis["tardiness_s"] / 3600
            - w["energy_cost"] * kpis["energy_cost"]
            - w["over_cap_h"] * kpis["over_cap_s"] / 3600
            - w["cap_violations"] * kpis["cap_violations"]
            - w["scrap"] * kpis["parts_scrap"]
            - w["maintenance"] * kpis["maintenance"]
        )

    return compute
