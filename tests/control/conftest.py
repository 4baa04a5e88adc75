"""Fixtures the control tests share: real servers and a background event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from autofab.control.natsd import EmbeddedNats
from autofab.control.opcua.security import ensure_client_files, ensure_server_files

T = TypeVar("T")


class LoopThread:
    """An event loop on a thread, for servers that a CLI in the test's thread talks to."""

    def __init__(self, timeout: float) -> None:
        #: How long :meth:`call` waits for a coroutine before failing the test.
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(self.timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[Callable[[float], LoopThread]]:
    """Makes background event loops (``loop_thread(timeout)``); all close at teardown."""
    made: list[LoopThread] = []

    def make(timeout: float) -> LoopThread:
        made.append(LoopThread(timeout))
        return made[-1]

    yield make
    for thread in made:
        if not thread.loop.is_closed():
            thread.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One OPC UA certificate directory per module: RSA key generation is the slow part."""
    cert_dir = tmp_path_factory.mktemp("opcua-certs")
    ensure_server_files(cert_dir, "urn:autofab:plant:demo")
    ensure_client_files(cert_dir)
    return cert_dir


@pytest.fixture(scope="module")
def nats_server() -> Iterator[EmbeddedNats]:
    """One real nats-server (loopback, JetStream, credentials) per module."""
    with EmbeddedNats() as server:
        yield server
