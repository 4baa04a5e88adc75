"""``autofab order submit`` and ``autofab order status`` against a real ``nats-server``.

The scheduler runs on an event loop in a background thread (the CLI under test calls
``asyncio.run`` in the main one): alone on an :class:`AgentRunner`, or as part of a
running ``autofab negotiate`` in ``--serve`` mode. Runtime files go to a temporary
``XDG_RUNTIME_DIR``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from autofab.agents.scheduler import SchedulerAgent
from autofab.control import negotiate_cmd
from autofab.control.bus import AgentRunner, Bus
from autofab.control.cli import app
from autofab.control.natsd import EmbeddedNats
from autofab.control.negotiate_cmd import (
    NegotiationSettings,
    RuntimeInfo,
    runtime_file,
    write_runtime_file,
)
from autofab.control.order_cmd import EXIT_REFUSED
from autofab.envs.plant import load_plant

pytest.importorskip("nats")

DEMO = load_plant("demo")
T = TypeVar("T")


@pytest.fixture(autouse=True)
def runtime_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    for name in ("AUTOFAB_NATS_URL", "AUTOFAB_NATS_USER", "AUTOFAB_NATS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "autofab"


@pytest.fixture
def scheduler_plant(
    nats_server: EmbeddedNats, runtime_home: Path, loop_thread: Any
) -> Iterator[str]:
    """A scheduler alone on a runner, and the runtime file that leads to it."""
    plant = f"t{secrets.token_hex(4)}"
    config = DEMO.model_copy(update={"name": plant})
    loop = loop_thread(10.0)

    async def start() -> tuple[Bus, AgentRunner]:
        bus = await Bus(nats_server.endpoint).connect()
        agent = SchedulerAgent.from_plant("scheduler", config)
        runner = await AgentRunner(bus, [agent], plant=plant).start()
        return bus, runner

    bus, runner = loop.call(start())
    write_runtime_file(
        RuntimeInfo(
            plant, nats_server.url, nats_server.user, nats_server.password, os.getpid(), time.time()
        )
    )
    try:
        yield plant
    finally:

        async def stop() -> None:
            await runner.stop()
            await bus.close()

        loop.call(stop())


def order_file(tmp_path: Path, **fields: Any) -> Path:
    data = {"client_order_id": "mes-1", "items": [{"product": "shaft", "quantity": 2}]}
    data["due_at"] = 14_400
    data.update(fields)
    path = tmp_path / f"order-{secrets.token_hex(3)}.json"
    path.write_text(json.dumps(data))
    return path


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["order", *args])


# --- against a scheduler ------------------------------------------------------------------


def test_submit_is_acknowledged_and_a_repeat_gets_the_first_answer(
    scheduler_plant: str, tmp_path: Path
) -> None:
    path = order_file(tmp_path)
    first = cli("submit", str(path), "--plant", scheduler_plant)
    assert first.exit_code == 0, first.output
    assert "accepted: client order mes-1 is order o1, 2 job(s): o1-1, o1-2" in first.output
    again = cli("submit", str(path), "--plant", scheduler_plant, "--json")
    assert again.exit_code == 0, again.output
    answer = json.loads(again.output)
    assert (answer["type"], answer["order"], answer["jobs"]) == (
        "order_ack",
        "o1",
        ["o1-1", "o1-2"],
    )
    other = cli(
        "submit", str(order_file(tmp_path, client_order_id="mes-2")), "--plant", scheduler_plant
    )
    assert "is order o2" in other.output


def test_status_of_a_known_and_an_unknown_order(scheduler_plant: str, tmp_path: Path) -> None:
    assert cli("submit", str(order_file(tmp_path)), "--plant", scheduler_plant).exit_code == 0
    known = cli("status", "mes-1", "--plant", scheduler_plant)
    assert known.exit_code == 0, known.output
    assert "mes-1: queued, order o1, 0/2 jobs done" in known.output
    as_json = json.loads(cli("status", "mes-1", "--plant", scheduler_plant, "--json").output)
    assert (as_json["status"], as_json["jobs_total"]) == ("queued", 2)
    unknown = cli("status", "never-sent", "--plant", scheduler_plant)
    assert unknown.exit_code == 0
    assert "never-sent: unknown" in unknown.output


def test_a_refused_order_says_why_and_exits_3(scheduler_plant: str, tmp_path: Path) -> None:
    path = order_file(tmp_path, items=[{"product": "spaceship"}])
    result = cli("submit", str(path), "--plant", scheduler_plant)
    assert result.exit_code == EXIT_REFUSED
    assert "refused: client order mes-1: unknown products ['spaceship']" in result.output
    status = cli("status", "mes-1", "--plant", scheduler_plant)
    assert "mes-1: refused" in status.output


def test_explicit_url_and_credentials_work_without_a_runtime_file(
    nats_server: EmbeddedNats, scheduler_plant: str, tmp_path: Path
) -> None:
    runtime_file(scheduler_plant).unlink()
    args = ["--plant", scheduler_plant, "--nats-url", nats_server.url, "--user", nats_server.user]
    result = cli("status", "x", *args, "--password", nats_server.password)
    assert result.exit_code == 0, result.output
    wrong = cli("status", "x", *args, "--password", "wrong", "--timeout", "0.5")
    assert wrong.exit_code == 2
    assert "could not connect" in wrong.output


# --- bad input and no answer ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"due_at": None}, "due_at"),
        ({"items": [{"product": "shaft", "quantity": "2"}]}, "items[0].quantity"),
        ({"items": [{"product": "shaft", "quantity": 0}]}, "items[0].quantity"),
        ({"items": []}, "items"),
        ({"client_order_id": "has space"}, "client_order_id"),
        ({"colour": "red"}, "colour"),
        ({"schema": 7}, "schema"),
    ],
)
def test_a_bad_order_file_names_the_field(
    tmp_path: Path, fields: dict[str, Any], says: str
) -> None:
    data = {"client_order_id": "mes-1", "items": [{"product": "shaft"}], "due_at": 100}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "order.json"
    path.write_text(json.dumps(data))
    result = cli("submit", str(path), "--nats-url", "nats://127.0.0.1:1")
    assert result.exit_code == 2, result.output
    assert f"{says}:" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("text", "says"), [("{oops", "not JSON"), ("[1]", "JSON object")])
def test_an_order_file_that_is_not_an_object_is_refused(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "order.json"
    path.write_text(text)
    result = cli("submit", str(path))
    assert result.exit_code == 2
    assert says in result.output
    missing = cli("submit", str(tmp_path / "nope.json"))
    assert missing.exit_code == 2
    assert "cannot read order file" in missing.output


def test_no_plant_no_server_no_scheduler_are_clear_errors(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    path = order_file(tmp_path)
    no_file = cli("submit", str(path), "--plant", "nowhere")
    assert no_file.exit_code == 2
    assert "no running plant 'nowhere'" in no_file.output
    no_server = cli("status", "x", "--nats-url", "nats://127.0.0.1:1", "--timeout", "0.3")
    assert no_server.exit_code == 2
    assert "could not connect to NATS at nats://127.0.0.1:1" in no_server.output
    write_runtime_file(
        RuntimeInfo(
            "idle",
            nats_server.url,
            nats_server.user,
            nats_server.password,
            os.getpid(),
            time.time(),
        )
    )
    no_scheduler = cli("submit", str(path), "--plant", "idle", "--timeout", "0.5")
    assert no_scheduler.exit_code == 2
    assert "no answer from the scheduler" in no_scheduler.output
    stray = cli("status", "x", "--user", "u")
    assert stray.exit_code == 2
    assert "--nats-url" in stray.output


# --- against a running negotiate ----------------------------------------------------------


def test_orders_reach_a_running_negotiate_through_its_runtime_file(
    tmp_path: Path, runtime_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(negotiate_cmd, "console", Console(file=io.StringIO()))
    plant = f"t{secrets.token_hex(4)}"
    config = DEMO.model_copy(update={"name": plant})
    settings = NegotiationSettings(speedup=20_000.0, hosts=2, breakdowns=False)
    stop = threading.Event()
    outcome: list[Any] = []

    def serve() -> None:
        outcome.append(
            asyncio.run(
                negotiate_cmd._negotiate(config, settings, [], None, 60.0, serve=True, stop=stop)
            )
        )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15.0
        while not runtime_file(plant).exists():
            assert time.monotonic() < deadline, "negotiate wrote no runtime file"
            time.sleep(0.02)
        path = order_file(tmp_path)
        first = cli("submit", str(path), "--plant", plant)
        assert first.exit_code == 0, first.output
        assert "is order o1" in first.output
        while "mes-1: done" not in (status := cli("status", "mes-1", "--plant", plant)).output:
            assert time.monotonic() < deadline, status.output
            time.sleep(0.05)
        assert "2/2 jobs done" in status.output
        again = cli("submit", str(path), "--plant", plant)
        assert again.output == first.output
    finally:
        stop.set()
        thread.join(15.0)
    result, negotiation = outcome[0]
    assert result == "done"
    assert not runtime_file(plant).exists()
    assert len(negotiation.scheduler.jobs) == 2
    assert len(negotiation.world.finished) == 2 * len(DEMO.products[1].route)
