"""The node map: which OPC UA NodeId holds each machine and plant variable.

The supervisor and the telemetry gateway never guess NodeIds; they read this JSON file, which
the plant twin writes from its own address space (or an integrator writes for a real plant).
One file, one name per variable: the names here are the browse names on the server, the
config keys and the message fields.

Format (``schema`` 1)::

    {"schema": 1, "plant": "demo", "endpoint": "opc.tcp://127.0.0.1:4840/autofab/demo",
     "namespace_uri": "urn:autofab:plant:demo",
     "plant_variables": {"power": "ns=2;s=demo.power", ...},
     "machines": {"mill-1": {"line": "machining", "nodes": {"speed": "ns=2;s=...", ...}}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncua import ua

__all__ = [
    "MACHINE_SETPOINTS",
    "MACHINE_TELEMETRY",
    "MACHINE_VARIABLES",
    "MACHINE_WORK_SETPOINTS",
    "MACHINE_WORK_TELEMETRY",
    "MACHINE_WORK_VARIABLES",
    "NODEMAP_SCHEMA",
    "PLANT_VARIABLES",
    "MachineNodes",
    "NodeMap",
    "NodeMapError",
    "load_nodemap",
]

NODEMAP_SCHEMA = 1
#: Read-only machine variables, in browse order.
MACHINE_TELEMETRY = (
    "state",
    "speed",
    "vibration",
    "temperature",
    "power",
    "ops_done",
    "parts_good",
    "parts_scrap",
    "breakdowns",
)
#: Machine variables the supervisor writes.
MACHINE_SETPOINTS = ("speed_setpoint", "run", "maintenance_request")
MACHINE_VARIABLES = MACHINE_TELEMETRY + MACHINE_SETPOINTS
#: Optional machine variables for a plant whose operations the agents start (``autofab run``):
#: the operation interface of a machine that runs the plant's production orders by number.
#: ``start_job`` (written by the supervisor) asks the machine to start the next operation of
#: production order ``start_job``; ``job``/``op`` are the running operation (-1 when none),
#: ``last_job``/``last_op``/``last_defect`` the last one finished, and ``load``,
#: ``run_seconds`` and ``renewals`` (repairs and maintenance begun) complete the telemetry
#: the agents read. A real plant's node map may leave them out; ``autofab run`` then says
#: which are missing.
MACHINE_WORK_TELEMETRY = (
    "load",
    "run_seconds",
    "renewals",
    "job",
    "op",
    "last_job",
    "last_op",
    "last_defect",
)
MACHINE_WORK_SETPOINTS = ("start_job",)
MACHINE_WORK_VARIABLES = MACHINE_WORK_TELEMETRY + MACHINE_WORK_SETPOINTS
#: Plant-wide variables; only ``watchdog_heartbeat`` is writable.
PLANT_VARIABLES = ("power", "tariff", "plant_time", "watchdog_heartbeat", "watchdog_alarm")


class NodeMapError(ValueError):
    """A node map file is missing, malformed, or lacks a variable; the message says which."""


@dataclass(frozen=True)
class MachineNodes:
    """One machine's line and its variables' NodeId strings."""

    line: str
    nodes: Mapping[str, str]


@dataclass(frozen=True)
class NodeMap:
    """Where every variable of one plant lives on its OPC UA server."""

    plant: str
    endpoint: str
    namespace_uri: str
    plant_variables: Mapping[str, str]
    machines: Mapping[str, MachineNodes]

    def node_id(self, machine: str, variable: str) -> str:
        """The NodeId string of ``machine``'s ``variable``; a clear error if either is unknown."""
        if machine not in self.machines:
            raise NodeMapError(
                f"node map of plant {self.plant!r} has no machine {machine!r}; machines: "
                f"{', '.join(self.machines)}"
            )
        nodes = self.machines[machine].nodes
        if variable not in nodes:
            raise NodeMapError(
                f"node map: machine {machine!r} has no variable {variable!r}; variables: "
                f"{', '.join(nodes)}"
            )
        return nodes[variable]

    def missing_work_variables(self) -> list[str]:
        """``machine.variable`` for every operation-interface variable the map lacks (empty
        when agents can start operations on every machine of this plant)."""
        return [
            f"{name}.{v}"
            for name, m in self.machines.items()
            for v in MACHINE_WORK_VARIABLES
            if v not in m.nodes
        ]

    def plant_node_id(self, variable: str) -> str:
        """The NodeId string of a plant-wide variable."""
        if variable not in self.plant_variables:
            raise NodeMapError(
                f"node map of plant {self.plant!r} has no plant variable {variable!r}; "
                f"variables: {', '.join(self.plant_variables)}"
            )
        return self.plant_variables[variable]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": NODEMAP_SCHEMA,
            "plant": self.plant,
            "endpoint": self.endpoint,
            "namespace_uri": self.namespace_uri,
            "plant_variables": dict(self.plant_variables),
            "machines": {
                name: {"line": m.line, "nodes": dict(m.nodes)} for name, m in self.machines.items()
            },
        }

    def write(self, path: Path) -> Path:
        """Write the map as JSON (atomically, so a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "node map") -> NodeMap:
        """Validate ``data`` and build the map; errors name the source, the key and the value."""

        def bad(where: str, expected: str, got: Any) -> NodeMapError:
            return NodeMapError(f"{source}: {where}: expected {expected}, got {got!r}")

        if not isinstance(data, dict):
            raise bad("top level", "a JSON object", data)
        if data.get("schema") != NODEMAP_SCHEMA:
            raise bad("'schema'", f"{NODEMAP_SCHEMA}", data.get("schema"))
        for key in ("plant", "endpoint", "namespace_uri"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise bad(f"{key!r}", "a non-empty string", data.get(key))

        def node_ids(where: str, raw: Any, required: tuple[str, ...]) -> dict[str, str]:
            if not isinstance(raw, dict):
                raise bad(where, "an object of variable -> NodeId", raw)
            missing = [v for v in required if v not in raw]
            if missing:
                raise NodeMapError(f"{source}: {where}: missing {', '.join(missing)}")
            out: dict[str, str] = {}
            for var, nid in raw.items():
                try:
                    ua.NodeId.from_string(nid)
                except Exception:
                    raise bad(f"{where}.{var}", "a NodeId string like 'ns=2;s=name'", nid) from None
                out[str(var)] = nid
            return out

        plant_vars = node_ids("'plant_variables'", data.get("plant_variables"), PLANT_VARIABLES)
        raw_machines = data.get("machines")
        if not isinstance(raw_machines, dict) or not raw_machines:
            raise bad("'machines'", "a non-empty object of machine -> nodes", raw_machines)
        machines: dict[str, MachineNodes] = {}
        for name, entry in raw_machines.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("line"), str):
                raise bad(f"machines.{name}", "an object with 'line' and 'nodes'", entry)
            nodes = node_ids(f"machines.{name}.nodes", entry.get("nodes"), MACHINE_VARIABLES)
            machines[str(name)] = MachineNodes(entry["line"], nodes)
        return cls(data["plant"], data["endpoint"], data["namespace_uri"], plant_vars, machines)


def load_nodemap(path: str | Path) -> NodeMap:
    """Read and validate a node map file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise NodeMapError(f"cannot read node map {str(path)!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NodeMapError(f"node map {str(path)!r} is not valid JSON: {exc}") from None
    return NodeMap.from_dict(data, source=f"node map {str(path)!r}")
