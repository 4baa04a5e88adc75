"""``autofab order``: submit an order to a running plant and ask where it stands, as an MES.

``autofab order submit FILE.json`` sends an :class:`~autofab.agents.protocol.OrderSubmit` and
prints the scheduler's answer: the order id and its jobs, or the reason it was refused.
``autofab order status ID`` sends an :class:`~autofab.agents.protocol.OrderStatusQuery` for
a client order id and prints the :class:`~autofab.agents.protocol.OrderStatus`. Both are
NATS request/reply with a deadline (``--timeout``) on the plant's ``orders.submit`` and
``orders.query`` subjects.

The bus is found in the runtime file that a running ``autofab negotiate`` writes for its
plant (``--plant``, default ``demo``; see :mod:`autofab.control.negotiate_cmd`), or given
with ``--nats-url`` (and ``--user``/``--password``, or ``AUTOFAB_NATS_*`` variables).

FILE.json holds the order in the message's own field names, for example::

    {"client_order_id": "mes-42", "items": [{"product": "shaft", "quantity": 2}],
     "due_at": 14400}

``due_at`` is plant time in seconds since the plant started. The file is checked before
anything is sent, and an error names the field. Submitting the same ``client_order_id``
again makes nothing new: the plant answers with its first answer.

Exit codes: 0 for an answer (an acknowledgement or a status), 3 when the plant refused the
order, 2 for bad input or no answer (no file, no plant, no server, a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Final, NoReturn

import typer
from rich.markup import escape

from autofab.agents.protocol import (
    SCHEMA_VERSION,
    MessageBase,
    OrderAck,
    OrderRefused,
    OrderStatus,
    OrderStatusQuery,
    OrderSubmit,
    ProtocolError,
    Subjects,
    check_token,
    decode,
)
from autofab.control.bus import BusDisconnectedError, BusSettings, RequestTimeoutError
from autofab.control.console import console, fail
from autofab.control.natsd import NatsEndpoint

__all__ = ["EXIT_REFUSED", "load_order_file", "order_app"]

#: Exit code when the plant refused the order (the request itself went fine).
EXIT_REFUSED: Final = 3

order_app = typer.Typer(
    name="order",
    help="Submit orders to a running plant and ask where they stand (as an MES would).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)

PlantOption = Annotated[
    str,
    typer.Option("--plant", help="The running plant (its runtime file is found by this name)."),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--nats-url",
        envvar="AUTOFAB_NATS_URL",
        help="Talk to this NATS server instead of the plant's runtime file.",
        show_default=False,
    ),
]
UserOption = Annotated[
    str | None,
    typer.Option("--user", envvar="AUTOFAB_NATS_USER", help="NATS user for --nats-url."),
]
PasswordOption = Annotated[
    str | None,
    typer.Option(
        "--password",
        envvar="AUTOFAB_NATS_PASSWORD",
        help="NATS password for --nats-url (prefer the environment variable).",
    ),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.05, help="Seconds to wait for the answer.")
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the answer as the JSON message it came as.")
]


def load_order_file(path: Path) -> OrderSubmit:
    """The order in ``path``, checked as the scheduler would check it.

    Raises:
        ValueError: unreadable, not JSON, not an object, or a field that does not validate;
            the message names the file and the field.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read order file {str(path)!r}: {error.strerror}") from None
    except ValueError as error:
        raise ValueError(f"order file {str(path)!r} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"order file {str(path)!r} must hold a JSON object with client_order_id, items "
            f"and due_at; found {type(data).__name__}"
        )
    wire = {"schema": SCHEMA_VERSION, "type": "order_submit", **data}
    try:
        return decode(str(path), json.dumps(wire).encode(), OrderSubmit)
    except ProtocolError as error:
        raise ValueError(f"order file {str(path)!r}: {error.field}: {error.detail}") from None


@contextlib.contextmanager
def quiet_bus() -> Iterator[None]:
    """Keep the bus's reconnect warnings off the terminal: a CLI reports one line."""
    logger = logging.getLogger("autofab.control.bus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def plant_endpoint(
    plant: str, nats_url: str | None, user: str | None, password: str | None
) -> NatsEndpoint:
    """Where to send: ``--nats-url``, else the plant's runtime file (exit 2 if none)."""
    try:
        check_token(plant, "--plant")
    except ValueError as error:
        fail(str(error))
    if nats_url is not None:
        return NatsEndpoint(nats_url, user, password)
    if user is not None or password is not None:
        fail("--user and --password go with --nats-url (the runtime file has its own)")
    from autofab.control.negotiate_cmd import read_runtime_file

    try:
        return read_runtime_file(plant).endpoint
    except ValueError as error:
        fail(str(error))


async def _ask(
    endpoint: NatsEndpoint, subject: str, message: MessageBase, timeout: float
) -> MessageBase:
    from autofab.control.negotiate_cmd import connect_bus

    settings = BusSettings(name="autofab-order", connect_timeout_s=min(timeout, 2.0))
    bus = await connect_bus(endpoint, settings=settings, timeout=timeout)
    try:
        return await bus.request(subject, message, timeout=timeout)
    finally:
        await bus.close()


def _request(
    endpoint: NatsEndpoint, subject: str, message: MessageBase, timeout: float
) -> MessageBase:
    """Send ``message`` and return the answer; exit 2 when none comes."""
    with quiet_bus():
        try:
            answer = asyncio.run(_ask(endpoint, subject, message, timeout))
        except ConnectionError as error:  # BusDisconnectedError is one
            if isinstance(error, BusDisconnectedError):
                fail(f"the NATS link to {endpoint.url} went down; nothing was sent")
            fail(str(error))
        except RequestTimeoutError as error:
            fail(f"no answer from the scheduler: {error}")
        except ProtocolError as error:
            fail(f"the answer is not a valid message: {error}")
    return answer


def _unexpected(answer: MessageBase) -> NoReturn:
    fail(f"the scheduler answered with an unexpected {answer.type!r} message")


def _print_json(message: MessageBase) -> None:
    console.print_json(message.model_dump_json(by_alias=True))


@order_app.command("submit")
def submit(
    file: Annotated[
        Path,
        typer.Argument(
            help='The order as JSON: {"client_order_id", "items": [{"product", "quantity"}], '
            '"due_at"}.',
            show_default=False,
        ),
    ],
    plant: PlantOption = "demo",
    nats_url: UrlOption = None,
    user: UserOption = None,
    password: PasswordOption = None,
    timeout: TimeoutOption = 5.0,
    as_json: JsonOption = False,
) -> None:
    """Submit the order in FILE.json and print the plant's answer.

    A repeated client_order_id is answered with the first answer; nothing is made twice.
    """
    try:
        order = load_order_file(file)
    except ValueError as error:
        fail(str(error))
    endpoint = plant_endpoint(plant, nats_url, user, password)
    subject = Subjects(plant).orders_submit
    answer = _request(endpoint, subject, order, timeout)
    if not isinstance(answer, OrderAck | OrderRefused):
        _unexpected(answer)
    if as_json:
        _print_json(answer)
    elif isinstance(answer, OrderAck):
        console.print(
            f"accepted: client order {escape(answer.client_order_id)} is order "
            f"{escape(answer.order)}, {len(answer.jobs)} job(s): {escape(', '.join(answer.jobs))}",
            soft_wrap=True,
        )
    else:
        console.print(
            f"refused: client order {escape(answer.client_order_id)}: {escape(answer.reason)}",
            soft_wrap=True,
        )
    if isinstance(answer, OrderRefused):
        raise typer.Exit(EXIT_REFUSED)


@order_app.command("status")
def status(
    order_id: Annotated[
        str, typer.Argument(help="The client order id it was submitted under.", show_default=False)
    ],
    plant: PlantOption = "demo",
    nats_url: UrlOption = None,
    user: UserOption = None,
    password: PasswordOption = None,
    timeout: TimeoutOption = 5.0,
    as_json: JsonOption = False,
) -> None:
    """Print where the order submitted as ORDER_ID stands."""
    try:
        query = OrderStatusQuery(client_order_id=order_id)
    except ValueError:
        fail(f"ORDER_ID {order_id!r} is not a valid client order id (a subject token)")
    endpoint = plant_endpoint(plant, nats_url, user, password)
    answer = _request(endpoint, Subjects(plant).orders_query, query, timeout)
    if not isinstance(answer, OrderStatus):
        _unexpected(answer)
    if as_json:
        _print_json(answer)
        return
    text = f"{escape(answer.client_order_id)}: {answer.status}"
    if answer.order is not None:
        text += f", order {escape(answer.order)}, {answer.jobs_done}/{answer.jobs_total} jobs done"
    if answer.finish_at is not None:
        word = "finished" if answer.status == "done" else "expected to finish"
        text += f", {word} at plant time {answer.finish_at / 3600:.2f} h"
    console.print(text, soft_wrap=True)
