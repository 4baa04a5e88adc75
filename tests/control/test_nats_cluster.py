"""The shipped three-node NATS cluster configs (configs/nats/), run on loopback.

The test starts the three nodes from the shipped files, changing only what a single machine
needs (loopback addresses, free ports, temporary store folders), and checks what the cluster
is for: agent state in a key-value bucket with three replicas survives the loss of a node,
and a client that knows one server fails over to the others.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from autofab.control.bus import Bus, BusSettings
from autofab.control.natsd import NatsEndpoint, find_nats_server

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nats"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _loopback(text: str, client: int, route: int, http: int, routes: list[int], store: Path) -> str:
    text = text.replace("0.0.0.0:4222", f"127.0.0.1:{client}")
    text = text.replace("0.0.0.0:6222", f"127.0.0.1:{route}")
    text = text.replace("127.0.0.1:8222", f"127.0.0.1:{http}")
    for k, port in enumerate(routes, start=1):
        text = text.replace(f"nats-route://nats-{k}:6222", f"nats-route://127.0.0.1:{port}")
    return re.sub(r"store_dir: .*", f'store_dir: "{store}"', text)


class Cluster:
    def __init__(self, tmp: Path) -> None:
        ports = _free_ports(9)
        self.clients, self.routes, self.https = ports[:3], ports[3:6], ports[6:]
        self.password = secrets.token_urlsafe(16)
        self.tmp = tmp
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.binary = find_nats_server()

    def start(self, i: int) -> None:
        shipped = (CONFIGS / f"node-{i}.conf").read_text()
        conf = self.tmp / f"node-{i}.conf"
        conf.write_text(
            _loopback(
                shipped,
                self.clients[i - 1],
                self.routes[i - 1],
                self.https[i - 1],
                self.routes,
                self.tmp / f"store-{i}",
            )
        )
        env = {**os.environ, "AUTOFAB_NATS_PASSWORD": self.password}
        self.procs[i] = subprocess.Popen(
            [str(self.binary), "-c", str(conf)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(self.tmp / f"node-{i}.log").open("wb"),
        )

    def stop(self, i: int) -> None:
        proc = self.procs.pop(i)
        proc.terminate()
        proc.wait(10)

    def endpoint(self, i: int) -> NatsEndpoint:
        return NatsEndpoint(f"nats://127.0.0.1:{self.clients[i - 1]}", "autofab", self.password)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    for i in (1, 2, 3):
        c.start(i)
    try:
        yield c
    finally:
        for i in list(c.procs):
            c.stop(i)


async def _until(what: str, attempt: object, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await attempt()  # type: ignore[operator]
        except Exception as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {timeout} s: {exc!r}") from exc
            await asyncio.sleep(0.5)


def test_three_node_cluster_keeps_agent_state_through_a_lost_node(cluster: Cluster) -> None:
    async def main() -> None:
        settings = BusSettings(kv_replicas=3, connect_timeout_s=2.0)
        bus = await _until("connect", lambda: Bus(cluster.endpoint(1), settings=settings).connect())
        assert isinstance(bus, Bus)
        try:
            kv = await _until("create a 3-replica bucket", lambda: bus.key_value("autofab-state-t"))
            status = await kv.status()  # type: ignore[attr-defined]
            assert status.stream_info.config.num_replicas == 3  # type: ignore[union-attr]
            await kv.put("scheduler", b"state-1")  # type: ignore[attr-defined]
            cluster.stop(2)  # one node of three down: a quorum of two is left
            entry = await _until("read after a node loss", lambda: kv.get("scheduler"))  # type: ignore[attr-defined]
            assert entry.value == b"state-1"  # type: ignore[attr-defined]
            await _until("write after a node loss", lambda: kv.put("scheduler", b"state-2"))  # type: ignore[attr-defined]
            cluster.stop(1)  # the node the client connected to: it fails over to node 3
            cluster.start(2)
            entry = await _until("read after fail-over", lambda: kv.get("scheduler"), 60.0)  # type: ignore[attr-defined]
            assert entry.value == b"state-2"  # type: ignore[attr-defined]
            assert bus.stats.reconnects >= 1
        finally:
            await bus.close()

    asyncio.run(main())


def test_shipped_configs_take_the_password_from_the_environment() -> None:
    for i in (1, 2, 3):
        text = (CONFIGS / f"node-{i}.conf").read_text()
        assert "$AUTOFAB_NATS_PASSWORD" in text
        assert f"server_name: autofab-nats-{i}" in text
        assert all(f"nats-route://nats-{k}:6222" in text for k in (1, 2, 3))
