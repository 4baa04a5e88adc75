"""``autofab supervisor``: an operator's commands to a running plant's safety supervisor.

``autofab supervisor override MACHINE`` takes MACHINE by hand (agents' requests for it are
ignored until it is released); ``autofab supervisor estop`` stops every machine and lets
only stops through; ``autofab supervisor release MACHINE`` hands MACHINE back to the agents,
and ``autofab supervisor release`` (no machine) ends the emergency stop (machines stay
stopped until someone asks them to run).

Each is one NATS request/reply to the supervisor
(:func:`~autofab.control.supervisor_runtime.operator_subject`), carrying the operator
token: ``--token`` (or ``AUTOFAB_OPERATOR_TOKEN``), else the token file the supervisor
generated for the plant (:func:`~autofab.control.supervisor_runtime.operator_token_file`).
NATS is found as ``autofab order`` finds it: the plant's runtime file, or ``--nats-url``
with ``--user``/``--password``.

Exit codes: 0 when the supervisor applied the command, 3 when it refused it (a wrong token,
an unknown machine), 2 for bad input or no answer.

``autofab supervisor run CONFIG`` *is* the supervisor: it takes the plant's setpoint
requests from NATS, checks them against limits built from the plant config CONFIG (and the
``--limits`` YAML overrides), writes them to the plant at ``--endpoint`` through the node map
``--nodemap``, with the login and client certificate in ``--cert-dir``, and audits every
decision. It checks everything before it starts: the node map, the limits, NATS, and one
secure login to the plant, so a wrong file, key, address or password is one line and exit 2
rather than a supervisor that retries forever. Then it prints a ready line and a live status
line until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final

import typer
import yaml
from asyncua import ua
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from autofab.agents.protocol import ProtocolError, Subjects, check_token
from autofab.control.bus import BusDisconnectedError, BusSettings, RequestTimeoutError
from autofab.control.console import console, err_console, fail, user_errors
from autofab.control.natsd import NatsEndpoint
from autofab.control.opcua.nodemap import NodeMap, NodeMapError, load_nodemap
from autofab.control.opcua.security import default_cert_dir
from autofab.control.opcua.writer import PlantCredentials, PlantWriter
from autofab.control.order_cmd import (
    PasswordOption,
    PlantOption,
    TimeoutOption,
    UrlOption,
    UserOption,
    plant_endpoint,
    quiet_bus,
)
from autofab.control.supervisor import SupervisorConfigError, SupervisorLimits
from autofab.control.supervisor_runtime import (
    OperatorAction,
    OperatorCommand,
    OperatorReply,
    SupervisorRuntime,
    SupervisorSettings,
    SupervisorStats,
    audit_stream_name,
    ensure_operator_token,
    operator_subject,
    operator_token_file,
    read_operator_token,
)
from autofab.envs.plant import PlantConfig, load_plant

__all__ = [
    "EXIT_REFUSED",
    "SupervisorRun",
    "load_limits",
    "prepare_run",
    "probe_plant",
    "serve_supervisor",
    "status_line",
    "supervisor_app",
]

#: Exit code when the supervisor refused the command.
EXIT_REFUSED: Final = 3

supervisor_app = typer.Typer(
    name="supervisor",
    help="Operator commands to the safety supervisor: manual override and emergency stop.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="AUTOFAB_OPERATOR_TOKEN",
        help="The supervisor's operator token (default: the plant's token file).",
        show_default=False,
    ),
]
OperatorOption = Annotated[
    str, typer.Option("--operator", help="Who is acting (the override holder's name).")
]


def _token(plant: str, token: str | None) -> str:
    if token:
        return token
    try:
        return read_operator_token(plant)
    except FileNotFoundError:
        fail(
            f"no operator token: pass --token (or AUTOFAB_OPERATOR_TOKEN), or run where the "
            f"supervisor's token file {str(operator_token_file(plant))!r} is"
        )
    except (OSError, ValueError) as error:
        fail(str(error))


async def _ask(
    endpoint: NatsEndpoint, subject: str, command: OperatorCommand, timeout: float
) -> OperatorReply:
    from autofab.control.negotiate_cmd import connect_bus

    settings = BusSettings(name="autofab-operator", connect_timeout_s=min(timeout, 2.0))
    bus = await connect_bus(endpoint, settings=settings, timeout=timeout)
    try:
        return await bus.request(subject, command, timeout=timeout, expected=OperatorReply)
    finally:
        await bus.close()


def _send(
    action: OperatorAction,
    machine: str | None,
    *,
    plant: str,
    operator: str,
    nats_url: str | None,
    user: str | None,
    password: str | None,
    token: str | None,
    timeout: float,
) -> None:
    endpoint = plant_endpoint(plant, nats_url, user, password)
    try:
        command = OperatorCommand(
            request_id=f"op-{secrets.token_hex(6)}",
            action=action,
            machine=machine,
            operator=operator,
            token=_token(plant, token),
        )
    except ValueError as error:
        fail(f"bad command: {error}")
    with quiet_bus():
        try:
            reply = asyncio.run(_ask(endpoint, operator_subject(plant), command, timeout))
        except ConnectionError as error:
            if isinstance(error, BusDisconnectedError):
                fail(f"the NATS link to {endpoint.url} went down; nothing was sent")
            fail(str(error))
        except RequestTimeoutError as error:
            fail(f"no answer from the supervisor: {error}")
        except ProtocolError as error:
            fail(f"the answer is not a valid message: {error}")
    word = "done" if reply.ok else "refused"
    console.print(f"{word}: {escape(reply.detail)}", soft_wrap=True)
    held = ", ".join(f"{m} ({who})" for m, who in sorted(reply.overrides.items())) or "none"
    console.print(f"estop: {'engaged' if reply.estop else 'off'}; overrides: {escape(held)}")
    if not reply.ok:
        raise typer.Exit(EXIT_REFUSED)


@supervisor_app.command("override")
def override(
    machine: Annotated[
        str, typer.Argument(help="The machine to take by hand.", show_default=False)
    ],
    plant: PlantOption = "demo",
    operator: OperatorOption = "operator",
    nats_url: UrlOption = None,
    user: UserOption = None,
    password: PasswordOption = None,
    token: TokenOption = None,
    timeout: TimeoutOption = 5.0,
) -> None:
    """Hold MACHINE: agents' setpoint requests for it are ignored until it is released."""
    _send(
        "override_hold", machine, plant=plant, operator=operator, nats_url=nats_url, user=user,
        password=password, token=token, timeout=timeout,
    )  # fmt: skip


@supervisor_app.command("estop")
def estop(
    plant: PlantOption = "demo",
    operator: OperatorOption = "operator",
    nats_url: UrlOption = None,
    user: UserOption = None,
    password: PasswordOption = None,
    token: TokenOption = None,
    timeout: TimeoutOption = 5.0,
) -> None:
    """Emergency stop: run=false on every machine; until released only stops pass."""
    _send(
        "estop_engage", None, plant=plant, operator=operator, nats_url=nats_url, user=user,
        password=password, token=token, timeout=timeout,
    )  # fmt: skip


@supervisor_app.command("release")
def release(
    machine: Annotated[
        str | None,
        typer.Argument(help="Hand this machine back; without it, end the emergency stop."),
    ] = None,
    plant: PlantOption = "demo",
    operator: OperatorOption = "operator",
    nats_url: UrlOption = None,
    user: UserOption = None,
    password: PasswordOption = None,
    token: TokenOption = None,
    timeout: TimeoutOption = 5.0,
) -> None:
    """Release MACHINE's override, or (without MACHINE) the emergency stop."""
    action: OperatorAction = "override_release" if machine else "estop_release"
    _send(
        action, machine, plant=plant, operator=operator, nats_url=nats_url, user=user,
        password=password, token=token, timeout=timeout,
    )  # fmt: skip


# --- autofab supervisor run ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SupervisorRun:
    """Everything ``supervisor run`` checked before starting: what the runtime is built from."""

    plant: str
    limits: SupervisorLimits
    nodemap: NodeMap
    nodemap_path: Path
    credentials: PlantCredentials
    nats: NatsEndpoint
    operator_token: str = dataclasses.field(repr=False)
    #: Where the token came from, for the ready line: the token file, or ``--token``.
    token_source: str
    settings: SupervisorSettings = dataclasses.field(default_factory=SupervisorSettings)

    def runtime(self) -> SupervisorRuntime:
        return SupervisorRuntime(
            limits=self.limits,
            nodemap=self.nodemap,
            credentials=self.credentials,
            nats=self.nats,
            operator_token=self.operator_token,
            plant=self.plant,
            settings=self.settings,
        )


def load_limits(plant: PlantConfig, limits_file: Path | None) -> SupervisorLimits:
    """The limits of ``plant``, with the overrides in the ``limits_file`` YAML.

    The YAML takes :meth:`SupervisorLimits.from_plant`'s override keys (``speed_setpoint``,
    ``power_cap``, ``operators``, ``max_clock_skew_seconds``) and also ``machines``: per
    machine, only the keys given (``speed_min``, ``speed_max``...) replace the plant's.

    Raises:
        ValueError: an unreadable YAML file or a bad key; one line naming the file, the key
            and the value.
    """
    if limits_file is None:
        return SupervisorLimits.from_plant(plant)
    where = f"--limits {str(limits_file)!r}"
    try:
        raw = yaml.safe_load(limits_file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read {where}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(error).split())}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of limit keys, got {raw!r}")
    overrides: dict[str, Any] = dict(raw)
    try:
        base = SupervisorLimits.from_plant(plant)
        machines = overrides.pop("machines", None)
        if machines is not None:
            overrides["machines"] = _merge_machines(base, machines)
        return SupervisorLimits.from_plant(plant, overrides)
    except SupervisorConfigError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:]] or [str(error)]
        raise ValueError(f"{where}: {'; '.join(lines)}") from None


def _merge_machines(base: SupervisorLimits, machines: object) -> dict[str, Any]:
    if not isinstance(machines, Mapping):
        raise SupervisorConfigError(
            f"invalid supervisor limits:\n  machines: expected a mapping of machine -> "
            f"limits (got {machines!r})"
        )
    merged: dict[str, Any] = {name: m.model_dump() for name, m in base.machines.items()}
    for name, values in machines.items():
        if name not in merged:
            raise SupervisorConfigError(
                f"invalid supervisor limits:\n  machines.{name}: no such machine in the plant "
                f"(machines: {', '.join(merged)})"
            )
        if not isinstance(values, Mapping):
            raise SupervisorConfigError(
                f"invalid supervisor limits:\n  machines.{name}: expected a mapping of limits "
                f"(got {values!r})"
            )
        merged[name] = {**merged[name], **values}
    return merged


def prepare_run(
    config: str | Path,
    *,
    plant: str | None,
    endpoint: str | None,
    nodemap_path: Path | None,
    cert_dir: Path | None,
    limits_file: Path | None,
    nats: Callable[[str], NatsEndpoint],
    token: str | None,
) -> SupervisorRun:
    """Check and load everything ``supervisor run`` needs, without touching the plant.

    ``nats`` finds the bus given the plant name (it is the node map's unless ``plant``).

    Raises:
        ValueError: the first bad input, as one line that names it.
    """
    plant_config = load_plant(config)
    limits = load_limits(plant_config, limits_file)
    certs = (cert_dir or default_cert_dir(plant or plant_config.name)).expanduser()
    path = nodemap_path or certs / "nodemap.json"
    nodemap = load_nodemap(path)
    if endpoint is not None:
        if not endpoint.startswith("opc.tcp://"):
            raise ValueError(
                f"--endpoint: expected an opc.tcp://host:port/... URL, got {endpoint!r}"
            )
        nodemap = dataclasses.replace(nodemap, endpoint=endpoint)
    name = plant or nodemap.plant
    check_token(name, "--plant")
    missing = [m for m in limits.machines if m not in nodemap.machines]
    if missing:
        raise NodeMapError(
            f"node map {str(path)!r} lacks machine(s) {', '.join(missing)} of plant config "
            f"{str(config)!r}"
        )
    credentials = PlantCredentials.from_cert_dir(certs)
    if token:
        secret, source = token, "--token / AUTOFAB_OPERATOR_TOKEN"
    else:
        secret, source = ensure_operator_token(name), str(operator_token_file(name))
    return SupervisorRun(
        plant=name,
        limits=limits,
        nodemap=nodemap,
        nodemap_path=path,
        credentials=credentials,
        nats=nats(name),
        operator_token=secret,
        token_source=source,
    )


async def probe_plant(run: SupervisorRun, timeout: float) -> None:
    """Log in to the plant once, so an unreachable endpoint or a refused login is an error
    now instead of a reconnect loop later.

    Raises:
        ConnectionError: with one line saying what failed.
    """
    writer = PlantWriter(run.nodemap, run.credentials, timeout_s=timeout)
    url = run.nodemap.endpoint
    try:
        await asyncio.wait_for(writer.connect(), timeout + 1.0)
    except TimeoutError:
        raise ConnectionError(f"no answer from the plant at {url} within {timeout:g} s") from None
    except ua.UaStatusCodeError as error:
        code = type(error).__name__
        if code in ("BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected"):
            raise ConnectionError(
                f"the plant at {url} refused the supervisor login {run.credentials.username!r} "
                f"({code}); check supervisor.json in --cert-dir"
            ) from None
        raise ConnectionError(f"the plant at {url} refused the session: {code}") from None
    except NodeMapError as error:
        raise ConnectionError(f"the plant at {url} does not match the node map: {error}") from None
    except OSError as error:
        detail = error.strerror or str(error) or type(error).__name__
        raise ConnectionError(f"cannot reach the plant at {url}: {detail}") from None
    except Exception as error:  # asyncua raises many kinds; the CLI reports one line
        detail = " ".join(str(error).split()) or type(error).__name__
        raise ConnectionError(f"cannot open a secure session to {url}: {detail}") from None
    finally:
        await writer.disconnect()


def status_line(stats: SupervisorStats, connected: bool) -> str:
    """The live status: requests by outcome, heartbeats, the plant link, and audit records
    that could not be stored (only when there are any: they need a person's attention)."""
    by_outcome = {"applied": 0, "clamped": 0, "rejected": 0}
    for (outcome, _reason), count in stats.decisions.items():
        by_outcome[outcome] = by_outcome.get(outcome, 0) + count
    link = "up" if connected else "DOWN (reconnecting)"
    lost = f"; AUDIT RECORDS LOST: {stats.audit_failed}" if stats.audit_failed else ""
    return (
        f"requests: {by_outcome['applied']} applied, {by_outcome['clamped']} clamped, "
        f"{by_outcome['rejected']} rejected; heartbeats: {stats.heartbeats}; "
        f"writes: {sum(stats.writes.values())}; link: {link}{lost}"
    )


async def serve_supervisor(
    run: SupervisorRun,
    stop: asyncio.Event,
    *,
    timeout: float = 10.0,
    on_ready: Callable[[SupervisorRuntime], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    status_every_s: float = 0.5,
) -> SupervisorStats:
    """Probe the plant, run the supervisor until ``stop`` is set (or this is cancelled),
    stop it cleanly, and return its counters.

    Raises:
        ConnectionError: the plant or NATS could not be reached at start.
    """
    await probe_plant(run, timeout)
    sup = run.runtime()
    try:
        await asyncio.wait_for(sup.start(), timeout)
    except TimeoutError:
        await sup.stop()
        raise ConnectionError(
            f"could not connect to NATS at {run.nats.url} within {timeout:g} s"
        ) from None
    except BaseException:
        await sup.stop()
        raise
    try:
        try:
            await sup.wait_connected(timeout)
        except TimeoutError:
            raise ConnectionError(
                f"the plant at {run.nodemap.endpoint} answered the probe but the supervisor "
                f"could not connect within {timeout:g} s"
            ) from None
        if on_ready is not None:
            on_ready(sup)
        while not stop.is_set():
            if on_status is not None:
                on_status(status_line(sup.stats, sup.connected))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), status_every_s)
    finally:
        await sup.stop()
    return sup.stats


def _ready_line(run: SupervisorRun) -> str:
    return (
        f"supervisor ready: endpoint {run.nodemap.endpoint}; security Basic256Sha256 "
        f"SignAndEncrypt as {run.credentials.username!r}; node map {run.nodemap_path}; "
        f"audit stream {audit_stream_name(run.plant)}; operator token {run.token_source}; "
        f"requests on {Subjects(run.plant).setpoint_request}"
    )


@supervisor_app.command("run")
def run_command(
    config: Annotated[
        str, typer.Argument(help="Plant config YAML, e.g. configs/demo.yaml.", show_default=False)
    ],
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            help="The plant's OPC UA endpoint, opc.tcp://... (default: the node map's).",
            show_default=False,
        ),
    ] = None,
    nodemap: Annotated[
        Path | None,
        typer.Option(
            "--nodemap",
            help="Node map JSON: machine and variable -> NodeId (default: in --cert-dir).",
            show_default=False,
        ),
    ] = None,
    cert_dir: Annotated[
        Path | None,
        typer.Option(
            "--cert-dir",
            help="Where supervisor.json (the plant login) and the client certificate are "
            "(default: the twin's, ~/.local/state/autofab/opcua/<plant>).",
            show_default=False,
        ),
    ] = None,
    limits: Annotated[
        Path | None,
        typer.Option(
            "--limits",
            help="YAML of limit overrides: speed_setpoint, power_cap, machines, operators.",
            show_default=False,
        ),
    ] = None,
    plant: Annotated[
        str | None,
        typer.Option(
            "--plant", help="Plant name in subjects (default: the node map's).", show_default=False
        ),
    ] = None,
    nats_url: UrlOption = None,
    user: UserOption = None,
    password: PasswordOption = None,
    token: TokenOption = None,
    timeout: Annotated[
        float,
        typer.Option("--timeout", min=0.1, help="Seconds to wait for NATS and the plant at start."),
    ] = 10.0,
) -> None:
    """Run the safety supervisor for CONFIG against a plant until Ctrl-C."""

    def find_nats(name: str) -> NatsEndpoint:
        return plant_endpoint(name, nats_url, user, password)

    with user_errors():
        prepared = prepare_run(
            config, plant=plant, endpoint=endpoint, nodemap_path=nodemap, cert_dir=cert_dir,
            limits_file=limits, nats=find_nats, token=token,
        )  # fmt: skip
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    live = Live(Text(""), console=console, auto_refresh=False, transient=False)

    def ready(_sup: SupervisorRuntime) -> None:
        console.print(_ready_line(prepared), markup=False, soft_wrap=True)
        live.start()

    def show(line: str) -> None:
        live.update(Text(line), refresh=True)

    async def main() -> SupervisorStats:
        return await serve_supervisor(
            prepared, asyncio.Event(), timeout=timeout, on_ready=ready, on_status=show
        )

    with quiet_bus():
        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            live.stop()
            err_console.print("stopped", markup=False)
        except ConnectionError as error:
            live.stop()
            fail(str(error))
