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
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Annotated, Final

import typer
from rich.markup import escape

from autofab.agents.protocol import ProtocolError
from autofab.control.bus import BusDisconnectedError, BusSettings, RequestTimeoutError
from autofab.control.console import console, fail
from autofab.control.natsd import NatsEndpoint
from autofab.control.order_cmd import (
    PasswordOption,
    PlantOption,
    TimeoutOption,
    UrlOption,
    UserOption,
    plant_endpoint,
    quiet_bus,
)
from autofab.control.supervisor_runtime import (
    OperatorAction,
    OperatorCommand,
    OperatorReply,
    operator_subject,
    operator_token_file,
    read_operator_token,
)

__all__ = ["EXIT_REFUSED", "supervisor_app"]

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
