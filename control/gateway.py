"""The telemetry gateway: the plant's OPC UA telemetry, read and published on NATS.

Agents never talk OPC UA (ARCHITECTURE.md, "Layers"); they learn what the plant does from
:class:`~autofab.agents.protocol.Telemetry` on ``Subjects.telemetry(machine)``. The gateway
is the one component that reads the plant for them:

* it opens its own secure channel (Basic256Sha256, SignAndEncrypt, with a client
  certificate of its own) and logs in **anonymously**: it can read, never write, so a bug
  here cannot move a machine;
* it **subscribes** (OPC UA data-change monitoring, publishing interval ``period_s``) to
  what agents act on: state, the operation running and the one finished last, the
  ``ops_done`` counter, speed, load, renewals and the plant time. The server sends only
  what changed, so a quiet plant costs next to nothing however large it is; polling every
  variable of a 100-machine plant every 50 ms would take a whole CPU core in encryption
  and encoding alone (measured: 55 ms of CPU per read of 1,401 values);
* every ``refresh_s`` it reads everything (one Read call, addressed through the node map,
  so a real plant with its own address space works the same): the noisy sensors and
  running hours, which change all the time and matter only at that pace;
* it publishes a machine's telemetry as soon as a monitored variable of it changed, and
  every machine's on each refresh, so a restarted agent hears the state within
  ``refresh_s``;
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from asyncua import Client

from autofab.agents.protocol import MachineStatusName, Subjects, Telemetry
from autofab.control.bus import Bus
from autofab.control.opcua.nodemap import MACHINE_WORK_TELEMETRY, NodeMap, NodeMapError
from autofab.control.opcua.security import close_client, secure_client

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
    *MACHINE_WORK_TELEMETRY,
)
#: What the gateway monitors (data-change subscription); the rest is read on refresh.
MONITORED: Final[frozenset[str]] = frozenset(
    {
        "state",
        "speed_setpoint",
        "ops_done",
        "load",
        "renewals",
        "job",
        "op",
        "last_job",
        "last_op",
        "last_defect",
    }
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
        #: The latest value of every variable read or monitored, in ``_ids`` order.
        self._values: list[Any] = []
        #: NodeId string -> its index in ``_ids`` (monitored variables only).
        self._index: dict[str, int] = {}
        self._dirty: set[int] = set()
        self._changed = asyncio.Event()

    async def _connect(self) -> Client:
        client = await secure_client(
            self.nodemap.endpoint, self.cert_dir, "gateway-client", timeout=self.timeout_s
        )
        await client.connect()
        return client

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        """asyncua's subscription callback: keep the value, mark its machine changed."""
        i = self._index.get(node.nodeid.to_string())
        if i is None or not self._values:
            return
        self._values[i] = val
        if i > 0:
            self._dirty.add((i - 1) // len(READ_VARIABLES))
        self._changed.set()

    async def _session(self, client: Client) -> None:
        """One connected session: read all, monitor the key variables, publish."""
        nodes = [client.get_node(i) for i in self._ids]
        self._values = list(await client.read_values(nodes))
        monitored = [0] + [
            1 + i * len(READ_VARIABLES) + k
            for i in range(len(self.machines))
            for k, v in enumerate(READ_VARIABLES)
            if v in MONITORED
        ]
        self._index = {nodes[i].nodeid.to_string(): i for i in monitored}
        subscription = await client.create_subscription(self.period_s * 1000, self)
        await subscription.subscribe_data_change([nodes[i] for i in monitored])
        await self._publish(range(len(self.machines)))
        refreshed = time.monotonic()
        while True:
            wait = refreshed + self.refresh_s - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(wait, 0.0))
            self._changed.clear()
            if time.monotonic() - refreshed >= self.refresh_s:
                self._values = list(await client.read_values(nodes))
                self._dirty.clear()
                refreshed = time.monotonic()
                await self._publish(range(len(self.machines)))
            elif self._dirty:
                dirty, self._dirty = sorted(self._dirty), set()
                await self._publish(dirty)

    async def run(self) -> None:
        """Read and publish until cancelled; reconnect with backoff on a lost link."""
        backoff = 0.2
        while True:
            client: Client | None = None
            try:
                client = await self._connect()
                self.stats.connected = True
                backoff = 0.2
                await self._session(client)
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
                    await close_client(client)

    async def _publish(self, machines: Iterable[int]) -> None:
        """Publish the telemetry of the machines at these indexes, from the latest values."""
        values = self._values
        self.stats.reads += 1
        plant_time = float(values[0])
        self.stats.plant_time = plant_time
        k = len(READ_VARIABLES)
        for i in machines:
            machine = self.machines[i]
            chunk = values[1 + i * k : 1 + (i + 1) * k]
            try:
                telemetry = telemetry_from_values(machine, plant_time, chunk)
            except ValueError as exc:
                self.stats.bad_readings += 1
                log.warning("gateway: %s", exc)
                continue
            if await self.bus.publish(self.subjects.telemetry(machine), telemetry):
                self.stats.published += 1
