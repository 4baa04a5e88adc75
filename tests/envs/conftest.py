"""Fixtures shared by the environment tests."""

from __future__ import annotations

import pytest

from autofab.envs import Instance, instance_from_dict


@pytest.fixture
def uneven_shop() -> Instance:
    """Three jobs of 3, 2 and 1 operations on three machines, worked through by hand.

    job 0: M0 for 3, M1 for 2, M2 for 4; job 1: M1 for 2, M0 for 5; job 2: M2 for 1.
    The longest operation is 5 and the largest job's work 9.
    """
    route = [[("M0", 3), ("M1", 2), ("M2", 4)], [("M1", 2), ("M0", 5)], [("M2", 1)]]
    return instance_from_dict(
        {
            "name": "uneven",
            "machines": ["M0", "M1", "M2"],
            "jobs": [{"operations": [{"durations": {m: t}} for m, t in ops]} for ops in route],
        }
    )
