"""``map_tasks``: order, errors that keep their type, the in-process path, bad addresses.

The task functions are builtins (``abs``, ``int``): Ray workers import a task function by
name, and test modules loaded with ``--import-mode=importlib`` are not importable there.
One local Ray start (a few seconds) serves the whole module through a shared fixture.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import psutil
import pytest

from autofab.control import ray_tasks
from autofab.control.ray_tasks import RayAddressError, map_tasks

ray = pytest.importorskip("ray")

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module; map_tasks uses a Ray it finds and leaves it running."""
    ray_tasks.init_local_ray(ray, num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


def test_a_local_ray_listens_on_loopback_only(local_ray: None) -> None:
    """No Ray process of a local start accepts connections from outside the machine, and
    Ray's single-machine switch is put back for a later cluster connection."""
    from ray._private import ray_constants

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    listening = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            listening += [
                (proc.name(), c.laddr.ip)
                for c in proc.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            ]
    assert listening, "the GCS and the raylet listen somewhere"
    outside = [(name, ip) for name, ip in listening if ip not in LOOPBACK]
    assert not outside
    assert ray_constants.ENABLE_RAY_CLUSTER
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_results_come_back_in_input_order(local_ray: None) -> None:
    seen: list[tuple[int, int]] = []
    out = map_tasks(abs, [-3, 1, -2, 0], progress=lambda i, r: seen.append((i, r)))
    assert out == [3, 1, 2, 0]
    assert sorted(seen) == [(0, 3), (1, 1), (2, 2), (3, 0)]
    assert ray.is_initialized(), "a Ray the caller started is left running"


def test_a_task_value_error_stays_a_value_error(local_ray: None) -> None:
    with pytest.raises(ValueError, match="invalid literal for int") as info:
        map_tasks(int, ["1", "x", "3"])
    assert type(info.value) is ValueError, "the original type, not Ray's wrapper"
    assert "Traceback" not in str(info.value), "one line for the CLI"


def test_a_single_item_runs_in_process_without_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ray(*args: object, **kwargs: object) -> bool:
        raise AssertionError("Ray must not start for one item")

    monkeypatch.setattr(ray_tasks, "_init_ray", no_ray)
    seen: list[tuple[int, str]] = []
    assert map_tasks(str.upper, ["a"], progress=lambda i, r: seen.append((i, r))) == ["A"]
    assert seen == [(0, "A")]
    assert map_tasks(str.upper, []) == []
    with pytest.raises(ValueError, match="invalid literal"):
        map_tasks(int, ["x"])


def test_too_many_cpus_per_task_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="CPUs"):
        map_tasks(abs, [1, 2], num_cpus_per_task=10_000)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_unreachable_address_is_a_quick_clear_error(scheme: str) -> None:
    address = f"{scheme}127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(RayAddressError, match="did not answer") as info:
        map_tasks(abs, [1, 2], ray_address=address)
    assert time.monotonic() - started < ray_tasks.CONNECT_TIMEOUT_S + 2
    assert isinstance(info.value, ValueError)
    assert address in str(info.value)


def test_a_malformed_address_names_the_fault() -> None:
    with pytest.raises(RayAddressError, match="not a number"):
        map_tasks(abs, [1, 2], ray_address="10.0.0.5:port")
