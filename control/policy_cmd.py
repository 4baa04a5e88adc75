"""``autofab policy deploy``: swap the machine agents' bidding policy while the plant runs.

The request goes over NATS (the running plant's runtime file says where, as for
``autofab order``) to every machine host; each loads the policy itself and answers. A host
that cannot load it keeps its current policy and says why, so a bad file never leaves a
machine without a policy. Agents finish the decision they are making and use the new
policy from the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from autofab.agents.protocol import (
    PolicyDeploy,
    PolicyDeployed,
    ProtocolError,
    Subjects,
    check_token,
    decode,
    encode,
)
from autofab.control.bus import BusSettings
from autofab.control.console import EXIT_INTERNAL, console, fail
from autofab.control.natsd import NatsEndpoint
from autofab.control.order_cmd import (
    PasswordOption,
    PlantOption,
    UrlOption,
    UserOption,
    plant_endpoint,
    quiet_bus,
)

__all__ = ["deploy_policy", "policy_app"]

policy_app = typer.Typer(
    name="policy",
    help="Deploy a bidding policy to the machine agents of a running plant.",
    no_args_is_help=True,
    add_completion=False,
)


async def deploy_policy(
    endpoint: NatsEndpoint,
    plant: str,
    policy: str,
    wait_s: float,
    requested_by: str,
    expected: int | None = None,
) -> list[PolicyDeployed]:
    """Ask every machine host of ``plant`` to use ``policy``; the answers that came within
    ``wait_s`` seconds (or until ``expected`` hosts answered), one per host."""
    from autofab.control.negotiate_cmd import connect_bus

    settings = BusSettings(name="autofab-policy", connect_timeout_s=min(wait_s, 2.0))
    bus = await connect_bus(endpoint, settings=settings, timeout=max(wait_s, 1.0))
    answers: dict[str, PolicyDeployed] = {}
    enough = asyncio.Event()
    try:
        inbox = bus.client.new_inbox()

        async def on_answer(msg: object) -> None:
            try:
                answer = decode(inbox, msg.data)  # type: ignore[attr-defined]
            except ProtocolError:
                return
            if isinstance(answer, PolicyDeployed):
                answers[answer.host] = answer
                if expected is not None and len(answers) >= expected:
                    enough.set()

        sub = await bus.client.subscribe(inbox, cb=on_answer)
        request = PolicyDeploy(policy=policy, requested_by=requested_by)
        await bus.client.publish(Subjects(plant).policy_deploy, encode(request), reply=inbox)
        await bus.client.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), wait_s)
        await sub.unsubscribe()
    finally:
        await bus.close()
    return [answers[h] for h in sorted(answers)]


@policy_app.command("deploy")
def deploy(
    policy: Annotated[
        str,
        typer.Argument(
            help="A bidding policy file, 'default' (the shipped one) or 'rules'.",
            show_default=False,
        ),
    ],
    plant: PlantOption = "demo",
    nats_url: UrlOption = None,
    user: UserOption = None,
    password: PasswordOption = None,
    wait: Annotated[
        float, typer.Option("--wait", min=0.1, help="Seconds to collect the hosts' answers.")
    ] = 2.0,
) -> None:
    """Swap the bidding policy of every machine agent of the running plant.

    Each machine host loads POLICY itself; one that cannot keeps its policy and says why.
    Exit 0 when every host that answered took it, 1 otherwise, 2 when none answered.
    """
    try:
        check_token(plant, "--plant")
    except ValueError as error:
        fail(str(error))
    endpoint = plant_endpoint(plant, nats_url, user, password)
    operator = getpass.getuser() if getpass.getuser().isidentifier() else "operator"
    with quiet_bus():
        try:
            answers = asyncio.run(deploy_policy(endpoint, plant, policy, wait, operator))
        except ConnectionError as error:
            fail(str(error))
    if not answers:
        fail(f"no machine host of plant {plant!r} answered within {wait:g} s")
    table = Table(title=f"policy {escape(policy)}")
    for column in ("host", "result", "detail"):
        table.add_column(column)
    for a in answers:
        table.add_row(escape(a.host), "in use" if a.ok else "refused", escape(a.detail))
    console.print(table)
    if not all(a.ok for a in answers):
        raise typer.Exit(EXIT_INTERNAL)
