"""What every agent is: a transport-free message handler with timers and saveable state.

An agent never touches NATS, asyncio or Ray. The runtime (``control/bus.py`` over NATS,
or a plain loop in a test) calls it and delivers what it returns:

* :meth:`Agent.handle` takes one decoded message, the subject it came on, the time
  ``now`` and, for a request, the subject to reply on, and returns the messages to send
  (:class:`Outgoing`; a reply is simply an ``Outgoing`` to ``reply_to``);
* :meth:`Agent.on_timer` is called once ``now.wall`` reaches :meth:`Agent.next_timer`
  (a bid deadline, a request timeout, a reorder check), and returns messages too;
* :meth:`Agent.subscriptions` says which subjects to deliver, and with which queue group
  when several replicas of the agent share the work;
* :meth:`Agent.snapshot` and :meth:`Agent.restore` turn the state that must survive a
  restart into plain JSON-able data; the runtime keeps it in the JetStream key-value store
  (compare-and-set on revision) and hands it back to a restarted agent.

``now`` carries both clocks of ARCHITECTURE.md ("Time"): ``wall`` (Unix seconds, for
network deadlines and TTLs) and ``plant`` (plant seconds, for due dates, tariffs and
maintenance). Handlers are deterministic given their inputs, so the same scenario replays
identically in a unit test, over a real nats-server and inside a Ray actor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autofab.agents.protocol import MessageBase, check_token

__all__ = ["Agent", "Now", "Outgoing", "Subscription"]


@dataclass(frozen=True)
class Now:
    """The two clocks at the moment a message or timer is handled."""

    #: Wall time, Unix seconds: deadlines and TTLs.
    wall: float
    #: Plant time, plant seconds: due dates, tariffs, maintenance.
    plant: float


@dataclass(frozen=True)
class Outgoing:
    """A message an agent wants sent on ``subject``.

    Delivery is the runtime's: publish, at most once, with no retry (the protocols
    themselves time out and ask again). ``ttl_seconds`` marks a *command* that must not be
    delivered late: the runtime drops it rather than send it after a reconnect once it is
    older than that.
    """

    subject: str
    message: MessageBase
    ttl_seconds: float | None = None


@dataclass(frozen=True)
class Subscription:
    """Deliver messages on ``subject`` (NATS wildcards allowed); with ``queue``, replicas
    in the same queue group share them, each message going to one."""

    subject: str
    queue: str | None = None


class Agent(ABC):
    """Base class of the scheduler, machine, energy and supply agents.

    Subclasses implement :meth:`subscriptions` and :meth:`handle`; the timer and state
    hooks default to "no timers" and "no state".
    """

    def __init__(self, name: str) -> None:
        #: The agent's name: a subject token, unique in the plant; its KV key.
        self.name = check_token(name, "agent name")
        #: Valid messages that made no sense when they came (a late bid, a duplicate),
        #: counted by reason: ignored, never an error.
        self.ignored: dict[str, int] = {}

    def _count(self, reason: str) -> None:
        """Count one ignored message under ``reason``."""
        self.ignored[reason] = self.ignored.get(reason, 0) + 1

    @abstractmethod
    def subscriptions(self) -> list[Subscription]:
        """The subjects this agent must receive."""

    @abstractmethod
    def handle(
        self, subject: str, message: MessageBase, now: Now, reply_to: str | None = None
    ) -> list[Outgoing]:
        """React to one message; return what to send. ``reply_to`` is set when the sender
        waits for an answer (NATS request/reply). Must not raise on any valid message (a
        message that makes no sense now, e.g. a late bid, is ignored and counted)."""

    def next_timer(self) -> float | None:
        """Wall time at which :meth:`on_timer` wants to run next, or None for no timer."""
        return None

    def on_timer(self, now: Now) -> list[Outgoing]:
        """Fire every timer due at ``now.wall``; return what to send."""
        return []

    def snapshot(self) -> dict[str, Any]:
        """The state that must survive a restart, as JSON-able data."""
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`snapshot` (of this agent's class) after a restart."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")
