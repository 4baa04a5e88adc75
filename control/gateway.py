"""The telemetry gateway: the plant's OPC UA telemetry, read and published on NATS.

Agents never talk OPC UA (ARCHITECTURE.md, "Layers"); they learn what the plant does from
:class:`~autofab.agents.protocol.Telemetry` on ``Subjects.telemetry(machine)``. The gateway
is the one component that reads the plant for them:

* it opens its own secure channel (Basic256Sha256, SignAndEncrypt, with a client
  certificate of its own) and logs in **anonymously**: it can read, never write, so a bug
  here cannot move a machine;
* every ``period_s`` of wall time it reads every machine's telemetry and the plant time in
  one OPC UA Read call (one round trip, whatever the plant's size), addressed through the
  node map, so a real plant with its own address space works the same;
* it publishes a machine's telemetry when something an agent acts on changed (state, the
  operation running or finished, the ``ops_done`` counter), and otherwise every
  ``refresh_s``, so a restarted agent hears the state within that time;
* a lost link is retried with backoff (up to ``max_backoff_s``); nothing is published
  while the plant cannot be read, so agents never see made-up values.

Telemetry is not a command: it carries no TTL, and a stale copy is harmless because each
message holds the full state and the plant time it was read at.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from autofab.agents.protocol import MachineStatusName, Subjects, Telemetry
from autofab.control.bus import Bus
from autofab.control.opcua.nodemap import NodeMap, NodeMapError
from autofab.control.opcua.security import ensure_client_files

__all__ = ["GatewayStats", "TelemetryGateway", "telemetry_from_values"]

log = logging.getLogger(__name__)

#: Plant state codes (the twin's ``state`` variable) to the protocol's names.
STATES: Final[dict[int, MachineStatusName]] = {
    0: "idle",
    1: "running",
    2: "down",
    3: "maintenance",
}
#: What the gateway reads per machine, in this order.
READ_VARIABLES: Final[tuple[str, ...]] = (
    "state",
    "speed_setpoint",
    "vibration",
    "temperature",
    "power",
    "ops_done",
    "load",
    "run_seconds",
    "renewals",
    "job",
    "op",
    "last_job",
    "last_op",
    "last_defect",
)
#: Fields whose change is published at once.
_KEY_FIELDS: Final[tuple[str, ...]] = (
    "status",
    "ops_done",
    "plant_job",
    "plant_op",
    "last_plant_job",
    "last_plant_op",
)


def _index(value: Any) -> int | None:
    """A job or operation number from the plant; negative means none."""
    return int(value) if value is not None and int(value) >= 0 else None


def telemetry_from_values(machine: str, plant_time: float, values: Sequence[Any]) -> Telemetry:
    """One machine's :class:`Telemetry` from the values of :data:`READ_VARIABLES`.

    Raises:
        ValueError: a value the protocol cannot carry (an unknown state code, a negative
            or non-finite reading); the message names the machine and the variable.
    """
    v = dict(zip(READ_VARIABLES, values, strict=True))
    state = int(v["state"])
    if state not in STATES:
        raise ValueError(f"machine {machine}: unknown state code {state}")
    for name in ("speed_setpoint", "vibration", "power", "run_seconds", "load"):
        x = float(v[name])
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"machine {machine}: {name} = {x!r} is not a finite reading >= 0")
    return Telemetry(
        machine=machine,
        plant_time=max(float(plant_time), 0.0),
        status=STATES[state],
        speed_setpoint=float(v["speed_setpoint"]),
        load=float(v["load"]),
        run_seconds=float(v["run_seconds"]),
        renewals=int(v["renewals"]),
        vibration_mm_s=float(v["vibration"]),
        temperature_c=float(v["temperature"]),
        power_w=float(v["power"]),
        ops_done=int(v["ops_done"]),
        plant_job=_index(v["job"]),
        plant_op=_index(v["op"]),
        last_plant_job=_index(v["last_job"]),
        last_plant_op=_index(v["last_op"]),
        last_defect=bool(v["last_defect"]),
    )


@dataclass
class GatewayStats:
    """What the gateway did: reads, messages published, link losses, bad readings."""

    reads: int = 0
    published: int = 0
    reconnects: int = 0
    bad_readings: int = 0
    connected: bool = False
    plant_time: float = 0.0


class TelemetryGateway:
    """Reads the plant at ``nodemap.endpoint`` and publishes telemetry on ``bus``.

    ``cert_dir`` holds the gateway's client certificate (generated once, 0600 key). Run it
    with :meth:`run` (until cancelled).
    """

    def __init__(
        self,
        nodemap: NodeMap,
        bus: Bus,
        cert_dir: Path,
        *,
        period_s: float = 0.05,
        refresh_s: float = 1.0,
        timeout_s: float = 4.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        missing = nodemap.missing_work_variables()
        if missing:
            raise NodeMapError(
                f"node map of plant {nodemap.plant!r} lacks the operation interface the "
                f"agents need ({len(missing)} variables, first {', '.join(missing[:4])})"
            )
        if not (period_s > 0 and refresh_s >= period_s):
            raise ValueError(
                f"period_s must be > 0 and refresh_s >= period_s, got {period_s}, {refresh_s}"
            )
        self.nodemap = nodemap
        self.bus = bus
        self.cert_dir = Path(cert_dir)
        self.period_s = period_s
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.subjects = Subjects(nodemap.plant)
        self.stats = GatewayStats()
        self.machines = list(nodemap.machines)
        self._ids = [nodemap.plant_node_id("plant_time")] + [
            nodemap.node_id(m, v) for m in self.machines for v in READ_VARIABLES
        ]
        self._last: dict[str, tuple[Any, ...]] = {}
        self._sent_at: dict[str, float] = {}

    async def _connect(self) -> Client:
        files = ensure_client_files(self.cert_dir, "gateway-client")
        client = Client(self.nodemap.endpoint, timeout=self.timeout_s)
        client.application_uri = "urn:autofab:gateway-client"
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            str(files.certificate),
            str(files.private_key),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        await client.connect()
        return client

    async def run(self) -> None:
        """Read and publish until cancelled; reconnect with backoff on a lost link."""
        backoff = 0.2
        while True:
            client: Client | None = None
            try:
                client = await self._connect()
                self.stats.connected = True
                backoff = 0.2
                nodes = [client.get_node(i) for i in self._ids]
                while True:
                    started = time.monotonic()
                    values = await client.read_values(nodes)
                    await self._publish(values)
                    await asyncio.sleep(max(self.period_s - (time.monotonic() - started), 0.0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the link: anything asyncua raises for a lost server
                if self.stats.connected:
                    log.warning("gateway: plant link lost (%s); reconnecting", exc)
                self.stats.connected = False
                self.stats.reconnects += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                self.stats.connected = False
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.disconnect()

    async def _publish(self, values: Sequence[Any]) -> None:
        self.stats.reads += 1
        plant_time = float(values[0])
        self.stats.plant_time = plant_time
        now = time.monotonic()
        k = len(READ_VARIABLES)
        for i, machine in enumerate(self.machines):
            chunk = values[1 + i * k : 1 + (i + 1) * k]
            try:
                telemetry = telemetry_from_values(machine, plant_time, chunk)
            except ValueError as exc:
                self.stats.bad_readings += 1
                log.warning("gateway: %s", exc)
                continue
            key = tuple(getattr(telemetry, f) for f in _KEY_FIELDS)
            if key == self._last.get(machine) and now - self._sent_at.get(machine, 0.0) < (
                self.refresh_s
            ):
                continue
            if await self.bus.publish(self.subjects.telemetry(machine), telemetry):
                self._last[machine] = key
                self._sent_at[machine] = now
                self.stats.published += 1
