"""Certificates, the supervisor identity, and who may write to the plant twin.

Security is on by default because the twin stands in for a real plant, and whatever talks to
a real plant must already cope with encryption and login. The design:

- **Channel.** The server offers only Basic256Sha256 and Aes256_Sha256_RsaPss with
  SignAndEncrypt. Its certificate and private key are generated on first run into a
  configured directory (:func:`ensure_server_files`; mode 0700, the key 0600) and reused after.
  The default directory is under the user's home, never inside the repository.
- **Identity.** A client proves who it is with a user name and password, not with its
  channel certificate (any client certificate may open an encrypted channel; asyncua clients
  make a throwaway one with :func:`ensure_client_files`). The supervisor's password is random,
  generated on first run and written 0600 to ``supervisor.json`` beside the certificates;
  whoever may read that file may drive the plant.
- **Who may write.** :class:`TwinUserManager` maps an anonymous session to the anonymous role
  and the supervisor's login to ``UserRole.User`` named ``supervisor``; any other login is
  refused. :class:`TwinPermissionRuleset` lets anonymous sessions browse, read and subscribe
  but never write or call methods. The twin checks the user name again on every write, so a
  NoSecurity endpoint (``--insecure-dev``) grants no more than an encrypted one.
  asyncua's permissive default user manager is never used: it makes everyone a writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import Client, ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import (
    ADMIN_TYPES,
    USER_TYPES,
    PermissionRuleset,
    User,
    UserRole,
)
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

__all__ = [
    "SECURE_POLICIES",
    "SUPERVISOR_USER",
    "ClientFiles",
    "ServerFiles",
    "TwinPermissionRuleset",
    "TwinUserManager",
    "close_client",
    "default_cert_dir",
    "encrypted_client",
    "ensure_client_files",
    "ensure_server_files",
    "secure_client",
]

#: The one identity that may write setpoints and the watchdog heartbeat.
SUPERVISOR_USER = "supervisor"
#: The security policies the twin offers unless ``insecure_dev`` is asked for.
SECURE_POLICIES = (
    ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
)
SERVER_CERT = "server-cert.der"
SERVER_KEY = "server-key.pem"
SUPERVISOR_FILE = "supervisor.json"
_CERT_DAYS = 3650


def default_cert_dir(plant: str) -> Path:
    """``$XDG_STATE_HOME/autofab/opcua/<plant>`` (``~/.local/state/...``): outside any repo."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "autofab" / "opcua" / plant


@dataclass(frozen=True)
class ServerFiles:
    """Where the twin's certificate, key and supervisor login live, once they exist."""

    cert_dir: Path
    certificate: Path
    private_key: Path
    supervisor_file: Path
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class ClientFiles:
    """A client application's certificate and key, for a SignAndEncrypt channel."""

    certificate: Path
    private_key: Path


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file that only this user can read (0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(0o600)


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"{path} is readable by other users (mode {mode:o}); expected 0600: "
            f"run 'chmod 600 {path}' or delete it to have a new one generated"
        )


def _make_cert(cert: Path, key: Path, common_name: str, uri: str, server: bool) -> None:
    private_key = cert_gen.generate_private_key()
    host = socket.gethostname()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(uri),
        x509.DNSName(host),
        x509.DNSName("localhost"),
    ]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    certificate = cert_gen.generate_self_signed_app_certificate(
        private_key, common_name, {"organizationName": "autofab"}, names, [usage], days=_CERT_DAYS
    )
    _write_private(key, cert_gen.dump_private_key_as_pem(private_key))
    cert.write_bytes(certificate.public_bytes(Encoding.DER))


def ensure_server_files(cert_dir: Path, application_uri: str) -> ServerFiles:
    """Return the twin's certificate, key and supervisor login, generating what is missing.

    Generation happens once (an RSA key takes a moment); later runs reuse the files, so
    clients that pinned the certificate keep working. A key or login file that others can
    read is refused, not silently fixed: it may already have leaked.
    """
    cert_dir = Path(cert_dir).expanduser()
    _private_dir(cert_dir)
    cert, key = cert_dir / SERVER_CERT, cert_dir / SERVER_KEY
    if not (cert.exists() and key.exists()):
        _make_cert(cert, key, "autofab plant twin", application_uri, server=True)
    _check_private(key)
    login = cert_dir / SUPERVISOR_FILE
    if not login.exists():
        body = {"username": SUPERVISOR_USER, "password": secrets.token_urlsafe(24)}
        _write_private(login, json.dumps(body, indent=2).encode())
    _check_private(login)
    try:
        data = json.loads(login.read_text())
        username, password = str(data["username"]), str(data["password"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{login}: expected JSON with 'username' and 'password' ({exc}); delete it to "
            "have a new one generated"
        ) from None
    return ServerFiles(cert_dir, cert, key, login, username, password)


def ensure_client_files(cert_dir: Path, name: str = "supervisor-client") -> ClientFiles:
    """A client certificate and key in ``cert_dir`` (generated once), for asyncua clients
    that open a SignAndEncrypt channel; the login, not this certificate, is the identity."""
    cert_dir = Path(cert_dir).expanduser()
    _private_dir(cert_dir)
    cert, key = cert_dir / f"{name}-cert.der", cert_dir / f"{name}-key.pem"
    if not (cert.exists() and key.exists()):
        _make_cert(cert, key, f"autofab {name}", f"urn:autofab:{name}", server=False)
    _check_private(key)
    return ClientFiles(cert, key)


async def encrypted_client(
    endpoint: str, files: ClientFiles, application_uri: str, *, timeout: float = 4.0
) -> Client:
    """An asyncua client for ``endpoint`` on a Basic256Sha256 SignAndEncrypt channel with
    the certificate and key ``files``; not connected, not logged in yet. Every autofab
    OPC UA client is made here.

    ``timeout`` bounds every request, and asyncua's liveness probe of the server too (its
    default drops the link when one probe takes over a second, which a loaded plant
    server, or a shared CI machine, can)."""
    client = Client(endpoint, timeout=timeout, watchdog_intervall=timeout)
    client.application_uri = application_uri
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(files.certificate),
        str(files.private_key),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    return client


async def secure_client(
    endpoint: str, cert_dir: Path, name: str, *, timeout: float = 4.0
) -> Client:
    """:func:`encrypted_client` with the client certificate ``name`` (made once in
    ``cert_dir``). Without a login it is anonymous: it may read, never write."""
    files = ensure_client_files(cert_dir, name)
    return await encrypted_client(endpoint, files, f"urn:autofab:{name}", timeout=timeout)


#: How long :func:`close_client` waits for a polite close before it drops the socket.
CLOSE_TIMEOUT_S = 5.0


async def close_client(client: Client, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Close ``client``'s session and channel, then its socket; never waits past ``timeout``.

    asyncua's ``disconnect`` cancels its background tasks and awaits them, and asks the
    server to close the session; on a half-dead link or during shutdown either can wait
    for good. So the polite close runs as its own task: if it has not finished within
    ``timeout`` it is cancelled and left behind (not awaited: a task that swallows the
    cancel would hang us again) and the socket is dropped. Errors of a dead link are
    ignored. Safe to call from a ``finally`` of a cancelled task.
    """
    closing = asyncio.ensure_future(client.disconnect())
    try:
        await asyncio.wait({closing}, timeout=timeout)
    finally:
        if closing.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                closing.result()  # a dead link's error: nothing left to close
        else:
            closing.cancel()
            log.warning("OPC UA client close cut short after %.1f s; dropped its socket", timeout)
        with contextlib.suppress(Exception):
            client.disconnect_socket()


class TwinUserManager(UserManager):
    """Anonymous sessions become readers; the supervisor's login becomes the one writer;
    every other login is refused (``BadUserAccessDenied`` at session activation)."""

    def __init__(self, username: str, password: str) -> None:
        self._username = username
        self._password = password

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """Map a session's identity token to a user, or refuse it with ``None``."""
        if username is None and password is None:
            # ``certificate`` is then the channel's client certificate (X509 identity
            # tokens are not offered), which proves nothing about who is asking.
            return User(role=UserRole.Anonymous)
        if (
            username is not None
            and password is not None
            and secrets.compare_digest(username.encode(), self._username.encode())
            and secrets.compare_digest(str(password).encode(), self._password.encode())
        ):
            return User(role=UserRole.User, name=SUPERVISOR_USER)
        return None


class TwinPermissionRuleset(PermissionRuleset):
    """Per-role service permissions: anonymous may do everything a reader needs (browse,
    read, subscribe) but not Write or Call; the supervisor may also write; only the server's
    own internal session (admin) may change the address space."""

    _READ_ONLY_DENIED = frozenset(
        {
            ua.ObjectIds.WriteRequest_Encoding_DefaultBinary,
            ua.ObjectIds.CallRequest_Encoding_DefaultBinary,
            ua.ObjectIds.HistoryUpdateRequest_Encoding_DefaultBinary,
        }
    )

    def __init__(self) -> None:
        users = {ua.NodeId(t) for t in USER_TYPES}
        admins = {ua.NodeId(t) for t in ADMIN_TYPES}
        readers = {n for n in users if n.Identifier not in self._READ_ONLY_DENIED}
        self._allowed: dict[UserRole, set[ua.NodeId]] = {
            UserRole.Admin: users | admins,
            UserRole.User: users,
            UserRole.Anonymous: readers,
        }

    def check_validity(self, user: User, action_type_id: ua.NodeId, body: Any) -> bool:
        """Whether ``user`` may send a request of type ``action_type_id``."""
        return action_type_id in self._allowed.get(user.role, set())
