"""Run one function over many items as Ray tasks: seeds to train, instances to evaluate.

:func:`map_tasks` is the one place ``autofab`` starts or joins Ray for batch work (the
architecture keeps Ray in ``control``). It exists so commands stay simple: they hand it a
top-level function and a list of picklable items and get the results back in order, with
a task's ``ValueError`` still a ``ValueError`` (so the CLI's bad-input contract, exit 2,
holds across processes).

Ray is imported only inside :func:`map_tasks`, so ``autofab --help`` and every command that
runs in one process never pay its import (about a second) or its start (a few seconds).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "CONNECT_TIMEOUT_S",
    "LOCAL_OBJECT_STORE_BYTES",
    "RAY_REQUIREMENT",
    "RayAddressError",
    "RayTaskFailed",
    "available_cpus",
    "init_local_ray",
    "init_ray",
    "map_tasks",
    "ray_available",
]

T = TypeVar("T")
R = TypeVar("R")

#: What to install for parallel runs; quoted in messages that ask for it.
RAY_REQUIREMENT = "ray>=2.40"
#: Seconds to wait for a ``--ray-address`` to answer before giving up with a clear error.
CONNECT_TIMEOUT_S = 5.0
#: Object store of a local Ray: results here are small (run summaries, schedules), and
#: Ray's default (30 % of memory) makes a local start slower and warns in containers.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
#: Ray's default port for ``ray start --head``; used when an address names no port.
DEFAULT_GCS_PORT = 6379
#: Ray Client's default port, for ``ray://HOST`` addresses without one.
DEFAULT_CLIENT_PORT = 10001


class RayAddressError(ValueError):
    """The Ray cluster at ``address`` cannot be reached or joined.

    A ``ValueError`` because the address is user input: the CLI turns it into one red
    line and exit code 2, not a traceback.
    """

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"cannot join the Ray cluster at --ray-address {address!r}: {detail}")
        self.address = address


class RayTaskFailed(RuntimeError):
    """A task died without an exception of its own (worker crash, out of memory, lost node)."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity set, which containers narrow).

    The same count as :func:`autofab.agents.policies.cpsat.available_cpus`, kept here so
    that importing this module does not import OR-Tools.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ray_available() -> bool:
    """Whether ray can be imported, checked without importing it (that takes a second)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def map_tasks(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    ray_address: str | None = None,
    num_cpus_per_task: int = 1,
    progress: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[fn(item) for item in items]``, each call a Ray task; results in input order.

    Args:
        fn: A top-level (importable) function; Ray workers import it by name, so it runs
            the same code as here. It must build what it needs (environments, models)
            itself: items travel pickled.
        items: Picklable arguments, one task each.
        ray_address: ``None`` starts a local Ray bounded to the CPUs this process may use
            (and to what the tasks can use) and shuts it down afterwards. An address
            (``HOST:PORT``, ``ray://HOST:PORT`` or ``auto``) joins that cluster, which is
            left running; its nodes need autofab installed.
        num_cpus_per_task: CPUs Ray reserves per task; the task should use no more
            (CP-SAT workers, torch threads).
        progress: Called as ``progress(index, result)`` when a task finishes, in
            completion order, for a line per finished seed or instance.

    A single item (and no address) runs in this process: starting Ray would cost more
    than it could save. Ray is imported only on the parallel path.

    Raises:
        RayAddressError: ``ray_address`` does not answer within :data:`CONNECT_TIMEOUT_S`
            or is not a Ray cluster.
        ImportError: Ray is needed and not installed.
        RayTaskFailed: A task died without raising (its worker crashed).
        Exception: The first failing task's own exception, as its own type (the others
            are cancelled).
    """
    if num_cpus_per_task < 1:
        raise ValueError(f"num_cpus_per_task must be >= 1, got {num_cpus_per_task}")
    items = list(items)
    if not items:
        return []
    if len(items) == 1 and ray_address is None:
        result = fn(items[0])
        if progress is not None:
            progress(0, result)
        return [result]
    if ray_address is None and num_cpus_per_task > available_cpus():
        raise ValueError(
            f"a task needs {num_cpus_per_task} CPUs but this machine offers "
            f"{available_cpus()}; ask for fewer CPUs per task"
        )
    if ray_address is not None:
        _check_reachable(ray_address)
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"parallel runs need ray: pip install '{RAY_REQUIREMENT}'") from exc

    started_here = _init_ray(ray, ray_address, len(items) * num_cpus_per_task, num_cpus_per_task)
    try:
        remote = ray.remote(num_cpus=num_cpus_per_task, max_retries=0)(_call)
        fn_ref = ray.put(fn)
        refs = [remote.remote(fn_ref, item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    value = ray.get(ref)
                except Exception as exc:
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise _unwrap(ray, exc) from None
                results[index[ref]] = value
                if progress is not None:
                    progress(index[ref], value)
        return results
    finally:
        if started_here:
            ray.shutdown()


def _call(fn: Callable[[T], R], item: T) -> R:
    """The task body: a plain call, so ``fn`` needs no Ray decorator of its own."""
    return fn(item)


#: Ray's single-machine switch (meant for Windows and macOS, read once per process at
#: import). With it off, Ray takes 127.0.0.1 as this node's address.
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_ray(ray: Any, **kwargs: Any) -> None:
    """Start a new Ray on this machine, listening on loopback only.

    On Linux Ray gives a node the machine's routable address even when asked for
    127.0.0.1, and its GCS, raylet and workers then listen on every interface: anyone who
    can reach the machine could submit code to it. A local run talks to nobody else, so it
    runs Ray in its single-machine mode (loopback) instead. Ray's own processes read the
    switch from the environment when they start; this process read it at import, so it is
    set in both places for the start and put back afterwards (a later ``ray.init`` of a
    real cluster from this process must advertise a routable address again).
    ``kwargs`` go to ``ray.init``.
    """
    from ray._private import ray_constants

    before_env = os.environ.get(_SINGLE_MACHINE_ENV)
    before_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",  # a new local Ray, even where `ray start` runs one
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            **kwargs,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = before_env


def init_ray(ray: Any, address: str | None, **kwargs: Any) -> None:
    """Start a local Ray (:func:`init_local_ray`) or join the cluster at ``address``; a
    cluster that cannot be joined is a :class:`RayAddressError`. ``kwargs`` go to
    ``ray.init``."""
    if address is None:
        init_local_ray(ray, **kwargs)
        return
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise RayAddressError(address, str(exc).strip().splitlines()[0]) from None


def _init_ray(ray: Any, address: str | None, cpus_wanted: int, cpus_per_task: int) -> bool:
    """Start a local Ray or join ``address``; True when this call started one to stop.

    A Ray that this process already runs (a caller's ``ray.init``) is used as is and left
    running. Logging stays at warnings: a CLI run should not print Ray's banner.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        quiet["num_cpus"] = max(cpus_per_task, min(available_cpus(), cpus_wanted))
    init_ray(ray, address, **quiet)
    return address is None


def _check_reachable(address: str) -> None:
    """Fail fast on an address nobody answers at.

    Ray's own connect retries for a minute or more before it gives up; a TCP connect
    with :data:`CONNECT_TIMEOUT_S` turns a typo into an error in seconds. ``auto`` (the
    address from ``RAY_ADDRESS`` or a local ``ray start``) is left to Ray.
    """
    if address.strip().lower() == "auto":
        return
    text = address.strip()
    port = DEFAULT_GCS_PORT
    if text.startswith("ray://"):
        text, port = text[len("ray://") :], DEFAULT_CLIENT_PORT
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = text
    elif port_text.isdigit():
        port = int(port_text)
    else:
        raise RayAddressError(address, f"port {port_text!r} is not a number; use HOST:PORT")
    host = host.strip("[]")
    if not host:
        raise RayAddressError(address, "no host; use HOST:PORT, e.g. 10.0.0.5:6379")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayAddressError(
            address, f"{host}:{port} did not answer within {CONNECT_TIMEOUT_S:g} s ({reason})"
        ) from None


def _unwrap(ray: Any, exc: Exception) -> Exception:
    """A task's own exception, as its own type, from Ray's wrapper around it.

    Ray's ``RayTaskError`` does subclass the original type, but its text is the remote
    traceback; the CLI prints ``str(exc)`` as one line, so the original is what it needs.
    """
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            return cause
    if isinstance(exc, ray.exceptions.RayError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RayTaskFailed(f"a Ray task failed: {first}")
    return exc
