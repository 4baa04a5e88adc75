"""The plant writer: the supervisor's one OPC UA session, addressed through a node map.

Only the safety supervisor writes to the plant (ARCHITECTURE.md, "Safety supervisor"), so
this is the only client in autofab that holds the plant's write credentials: a login
(user name and password) and a client certificate for a Basic256Sha256 SignAndEncrypt
channel. It never builds a NodeId itself: every variable is looked up in a
:class:`~autofab.control.opcua.nodemap.NodeMap`, so a real plant with its own address space
(numeric NodeIds, other folders, ``Float`` instead of ``Double``) works with a hand-written
map and no code change.

Because a real plant may type a variable differently from the twin, the writer reads each
writable node's DataType once per connection and converts values to it (a speed becomes a
``Float`` where the plant says ``Float``); a write with the wrong variant type would be
refused with ``BadTypeMismatch``.

Reads ask for no timestamps (``TimestampsToReturn.Neither``): the runtime compares values
only, and a timestamp is two more fields per value for the plant to encode and for us to
decode. Node ids are resolved once per connection.

The writer knows nothing of requests, limits or retries. A lost link surfaces as an
exception from :meth:`write`, :meth:`read` or :meth:`heartbeat`; the runtime
(:mod:`autofab.control.supervisor_runtime`) decides what to do about it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Client, ua

from autofab.control.opcua.nodemap import NodeMap
from autofab.control.opcua.security import (
    SUPERVISOR_FILE,
    ClientFiles,
    close_client,
    encrypted_client,
    ensure_client_files,
)

__all__ = ["PlantCredentials", "PlantWriter"]

#: What a write or read names: (machine, variable).
Target = tuple[str, str]

_FLOATS = frozenset({ua.VariantType.Double, ua.VariantType.Float})
_INTEGERS = frozenset(
    {
        ua.VariantType.SByte,
        ua.VariantType.Byte,
        ua.VariantType.Int16,
        ua.VariantType.UInt16,
        ua.VariantType.Int32,
        ua.VariantType.UInt32,
        ua.VariantType.Int64,
        ua.VariantType.UInt64,
    }
)


@dataclass(frozen=True)
class PlantCredentials:
    """The plant write credentials: a login and a client certificate with its key."""

    username: str
    password: str = field(repr=False)
    certificate: Path
    private_key: Path
    #: Must match the URI in the certificate, or servers warn or refuse.
    application_uri: str = "urn:autofab:supervisor-client"

    @classmethod
    def from_cert_dir(
        cls, cert_dir: Path, client_name: str = "supervisor-client"
    ) -> PlantCredentials:
        """The twin's supervisor login (``supervisor.json``, written by the twin) and a
        client certificate in the same private directory (generated once)."""
        cert_dir = Path(cert_dir).expanduser()
        login = cert_dir / SUPERVISOR_FILE
        try:
            data = json.loads(login.read_text())
            username, password = str(data["username"]), str(data["password"])
        except OSError as exc:
            raise ValueError(f"cannot read supervisor login {str(login)!r}: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{login}: expected JSON with 'username' and 'password' ({exc})"
            ) from None
        files = ensure_client_files(cert_dir, client_name)
        return cls(
            username, password, files.certificate, files.private_key, f"urn:autofab:{client_name}"
        )


class PlantWriter:
    """One secure, authenticated OPC UA session to the plant at ``nodemap.endpoint``.

    Not safe to use from two tasks at once without a lock: the runtime serialises calls.
    """

    def __init__(
        self,
        nodemap: NodeMap,
        credentials: PlantCredentials,
        *,
        endpoint: str | None = None,
        timeout_s: float = 4.0,
    ) -> None:
        self.nodemap = nodemap
        self.credentials = credentials
        self.endpoint = endpoint or nodemap.endpoint
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._types: dict[ua.NodeId, ua.VariantType] = {}
        self._ids: dict[Target, ua.NodeId] = {}
        #: Counts connections: a write prepared on an earlier one must be prepared again.
        self.generation = 0

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        """Open the encrypted channel, log in, and learn the writable nodes' types.

        Raises whatever asyncua raises for an unreachable or refusing server; the caller
        retries with backoff.
        """
        await self.disconnect()
        files = ClientFiles(self.credentials.certificate, self.credentials.private_key)
        client = await encrypted_client(
            self.endpoint, files, self.credentials.application_uri, timeout=self.timeout_s
        )
        client.set_user(self.credentials.username)
        client.set_password(self.credentials.password)
        await client.connect()
        try:
            await self._learn_types(client)
        except BaseException:
            await close_client(client)
            raise
        self._client = client
        self.generation += 1

    async def disconnect(self) -> None:
        """Close the session if there is one; errors of a dead link are ignored."""
        client, self._client = self._client, None
        if client is not None:
            await close_client(client)

    async def _learn_types(self, client: Client) -> None:
        ids = [self.nodemap.plant_node_id("watchdog_heartbeat")]
        for machine in self.nodemap.machines:
            for variable in ("speed_setpoint", "run", "maintenance_request"):
                ids.append(self.nodemap.node_id(machine, variable))
            if "start_job" in self.nodemap.machines[machine].nodes:
                ids.append(self.nodemap.node_id(machine, "start_job"))
        nodes = [client.get_node(i) for i in ids]
        results = await client.read_attributes(nodes, attr=ua.AttributeIds.DataType)
        self._types.clear()
        self._ids.clear()
        for node, res in zip(nodes, results, strict=True):
            dtype = res.Value.Value if res.Value is not None else None
            if (
                isinstance(dtype, ua.NodeId)
                and dtype.NamespaceIndex == 0
                and isinstance(dtype.Identifier, int)
                and 1 <= dtype.Identifier <= 25
            ):
                self._types[node.nodeid] = ua.VariantType(dtype.Identifier)
            else:  # a subtype (an enumeration, a UtcTime): ask the server to resolve it
                self._types[node.nodeid] = await node.read_data_type_as_variant_type()

    def _session(self) -> Client:
        if self._client is None:
            raise ConnectionError(f"not connected to the plant at {self.endpoint}")
        return self._client

    def _variant(self, node_id: ua.NodeId, value: Any) -> ua.DataValue:
        vtype = self._types.get(node_id)
        if vtype in _FLOATS:
            value = float(value)
        elif vtype == ua.VariantType.Boolean:
            value = bool(value)
        elif vtype in _INTEGERS:
            value = int(value)
        return ua.DataValue(ua.Variant(value, vtype))

    def _node_id(self, target: Target) -> ua.NodeId:
        node_id = self._ids.get(target)
        if node_id is None:
            node_id = ua.NodeId.from_string(self.nodemap.node_id(*target))
            self._ids[target] = node_id
        return node_id

    def prepare(self, target: Target, value: float | bool) -> ua.WriteValue:
        """The write of ``value`` to ``target``, typed for this connection's plant (see
        :attr:`generation`); building it ahead keeps it off the time a write waits."""
        self._session()
        node_id = self._node_id(target)
        return ua.WriteValue(
            NodeId=node_id, AttributeId=ua.AttributeIds.Value, Value=self._variant(node_id, value)
        )

    async def write(
        self, targets: Sequence[Target], values: Sequence[float | bool]
    ) -> list[ua.StatusCode]:
        """Write ``values`` to ``targets`` in one OPC UA Write call; one status per target.

        A refused value (``BadOutOfRange``, ``BadInvalidState``) is a status, not an
        exception; an exception means the link.
        """
        return await self.write_prepared(
            [self.prepare(t, v) for t, v in zip(targets, values, strict=True)]
        )

    async def write_prepared(self, writes: Sequence[ua.WriteValue]) -> list[ua.StatusCode]:
        """:meth:`write` of writes from :meth:`prepare` on this connection."""
        client = self._session()
        params = ua.WriteParameters()
        params.NodesToWrite.extend(writes)
        return await client.uaclient.write(params)

    async def read(self, targets: Sequence[Target]) -> list[Any]:
        """Read the current values of ``targets`` in one OPC UA Read call (``None`` for a
        value the plant could not read)."""
        return await self._read_values([self._node_id(t) for t in targets])

    async def _read_values(self, node_ids: Sequence[ua.NodeId]) -> list[Any]:
        client = self._session()
        params = ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Neither)
        for node_id in node_ids:
            params.NodesToRead.append(
                ua.ReadValueId(NodeId=node_id, AttributeId=ua.AttributeIds.Value)
            )
        results = await client.uaclient.read(params)
        return [r.Value.Value if r.Value is not None else None for r in results]

    async def read_plant(self, variables: Sequence[str]) -> list[Any]:
        """Read plant-wide variables (``watchdog_alarm``, ``plant_time``) in one call."""
        return await self._read_values(
            [ua.NodeId.from_string(self.nodemap.plant_node_id(v)) for v in variables]
        )

    async def heartbeat(self, value: int) -> ua.StatusCode:
        """Write the watchdog heartbeat counter."""
        client = self._session()
        node = client.get_node(self.nodemap.plant_node_id("watchdog_heartbeat"))
        (status,) = await client.write_values(
            [node], [self._variant(node.nodeid, value)], raise_on_partial_error=False
        )
        return status
