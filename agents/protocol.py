"""The agents' message protocol: message models, NATS subjects, and pure encode/decode.

Agents talk over NATS, but nothing here knows NATS: this module only turns messages into
bytes and back, and names the subjects they travel on. ``control/bus.py`` moves the bytes.

Messages
--------
Every message is a frozen pydantic model with two fixed fields on the wire: ``"schema"``
(the protocol version, :data:`SCHEMA_VERSION`) and ``"type"`` (which model it is; see
:data:`MESSAGE_TYPES`). Validation is strict, because a message comes from another process
that may be older, newer or wrong: no coercion (``"12"`` is not ``12``, ``true`` is not
``1``), no unknown fields, no NaN or infinity, and every id that ends up in a subject is a
valid subject token (see :func:`check_token`).

Families, and the subject each travels on (a :class:`Subjects` method of the same name):

* Contract net: :class:`CallForProposals` (``cfp``), :class:`Proposal` or
  :class:`ProposalBatch` (``bid``), :class:`Accept` and :class:`Reject` (``award``),
  :class:`InformDone` and :class:`Failure` (``result``). A host of many machine agents
  answers one call with one :class:`ProposalBatch`, so a round with 100 bidders costs the
  scheduler a few decodes, not 100.
* Power budgets (the energy agent): :class:`PowerRequest`, :class:`PowerGrant`,
  :class:`PowerDeny`, :class:`PowerRelease`.
* Material (the supply agent): :class:`MaterialReserve`, :class:`MaterialReserved`,
  :class:`MaterialUnavailable`, :class:`MaterialRelease`, :class:`MaterialReorder`.
* Machine state: :class:`Telemetry`, :class:`HealthReport`.
* Plant writes: :class:`SetpointRequest`, which only the safety supervisor acts on.
* Orders from an MES: :class:`OrderSubmit`, :class:`OrderAck`, :class:`OrderRefused`,
  :class:`OrderStatusQuery`, :class:`OrderStatus`.

Names and units
---------------
One name means one thing in every message: ``machine`` and ``host`` are agent names, ``job``
and ``op`` identify an operation (the job's id and the operation's index in its route),
``round_id`` a contract-net round, ``request_id`` a request and its replies. Two clocks
exist (see ARCHITECTURE.md, "Time"). **Wall time**, Unix seconds, the clock of network
timeouts, is in ``deadline`` and ``requested_at`` only. Every other time (``plant_time``
and the other ``*_at`` fields) is **plant time**, in plant seconds, the clock that due
dates, tariffs and maintenance follow. Durations end in ``_seconds``, power is in watts
(``power_w``), energy in joules (``energy_j``), money in the plant's currency.

Errors
------
:func:`decode` raises one error class, :class:`ProtocolError`, for every bad input: too
large, not UTF-8, not JSON, wrong schema version, unknown type, or a field that does not
validate. Its text names the subject and the field; its ``reason`` is a short fixed code
(:data:`ErrorReason`) for counting in metrics.

Speed
-----
Encoding and decoding go straight through pydantic-core (``to_json`` and ``validate_json``),
with no Python dicts in between. Measured with ``timeit`` on the development box (2 cores,
Python 3.11, pydantic 2.14): encode + decode of a :class:`Proposal` takes about 2.6 us, of a
:class:`CallForProposals` about 3.7 us, and of a :class:`ProposalBatch` of 100 bids (7.6 kB)
about 115 us, against about 270 us for 100 single proposals.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal, TypeAlias, TypeVar, get_args, overload

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "TOKEN_PATTERN",
    "Accept",
    "Bid",
    "CallForProposals",
    "ErrorReason",
    "Failure",
    "HealthReport",
    "InformDone",
    "MachineStatusName",
    "MaterialRelease",
    "MaterialReorder",
    "MaterialReserve",
    "MaterialReserved",
    "MaterialUnavailable",
    "Message",
    "MessageBase",
    "OrderAck",
    "OrderItem",
    "OrderRefused",
    "OrderStatus",
    "OrderStatusQuery",
    "OrderSubmit",
    "PolicyDeploy",
    "PolicyDeployed",
    "PowerDeny",
    "PowerGrant",
    "PowerRelease",
    "PowerRequest",
    "Proposal",
    "ProposalBatch",
    "ProtocolError",
    "Reject",
    "SetpointRequest",
    "Subjects",
    "Telemetry",
    "check_token",
    "decode",
    "encode",
]

#: The protocol version every message carries as ``"schema"``. Bump it when a change would
#: make an old agent misread a new message (a renamed, retyped or newly required field).
SCHEMA_VERSION: Final = 1

#: Largest message :func:`decode` accepts by default: a batch of a few hundred bids, with
#: room to spare, and far below the NATS default max payload (1 MiB).
DEFAULT_MAX_BYTES: Final = 64 * 1024

#: A subject token: printable ASCII without space, ``.`` (the separator), ``*`` or ``>``
#: (the wildcards). Plant, machine, capability, material and round names must match it.
TOKEN_PATTERN: Final = r"^[!-)+-\-/-=?-~]{1,128}$"
_TOKEN_RE: Final = re.compile(TOKEN_PATTERN)
_TOKEN_MAX_LENGTH: Final = 128
_TOKEN_RULE: Final = (
    "not a valid subject token (1 to 128 characters of printable ASCII, "
    "without spaces, '.', '*' or '>')"
)

#: Why a message was refused; a fixed set, so it can label a metric.
ErrorReason: TypeAlias = Literal[
    "too_large",  # more bytes than the limit
    "not_utf8",  # bytes that are not UTF-8 text
    "malformed_json",  # not JSON, or truncated
    "not_an_object",  # JSON, but not an object
    "schema_version",  # "schema" missing or not this module's SCHEMA_VERSION
    "unknown_type",  # "type" missing or not in MESSAGE_TYPES
    "unexpected_type",  # a known type, but not the one the caller expected
    "invalid_field",  # a field missing, unknown, or of the wrong type or range
]

#: What :attr:`ProtocolError.field` holds when the whole message is at fault.
_WHOLE: Final = "<message>"


class ProtocolError(ValueError):
    """A message that cannot be encoded or decoded.

    The text names the subject and the field, for people. ``subject``, ``field`` and
    ``reason`` are there for code that counts and logs refusals: ``reason`` is one of
    :data:`ErrorReason`, ``field`` a dotted path such as ``bids[3].machine`` (or
    ``"<message>"`` when the message as a whole is at fault).
    """

    def __init__(self, subject: str, field: str, reason: ErrorReason, detail: str) -> None:
        super().__init__(f"bad message on {subject!r}: {field}: {detail}")
        self.subject = subject
        self.field = field
        self.reason: ErrorReason = reason
        self.detail = detail


def check_token(value: str, what: str = "token") -> str:
    """Return ``value`` if it can be one token of a NATS subject, else raise ValueError.

    A space, ``.``, ``*`` or ``>`` inside a name would silently change which subjects a
    message reaches (``mill.1`` is two tokens; ``*`` matches every machine), so names are
    checked where subjects are built. ``what`` names the value in the error, e.g.
    ``"machine"``.
    """
    if _TOKEN_RE.match(value):
        return value
    if not value:
        problem = "it is empty"
    elif len(value) > _TOKEN_MAX_LENGTH:
        problem = f"it is longer than {_TOKEN_MAX_LENGTH} characters"
    else:
        bad = next(c for c in value if not _TOKEN_RE.match(c))
        problem = f"it contains {bad!r}"
    raise ValueError(f"{what} {value!r} is {_TOKEN_RULE}: {problem}")


# Field types. Each carries its meaning and bounds once, so each message field is one line.

#: A name that may appear in a subject: machine, host, capability, material, round, job.
Token = Annotated[str, StringConstraints(pattern=TOKEN_PATTERN)]
#: A point in plant time, plant seconds (the plant model's clock; 0 = start of the run).
PlantTime = Annotated[float, Field(ge=0)]
#: A point in wall time, Unix seconds (``time.time()``), for network deadlines.
WallTime = Annotated[float, Field(ge=0)]
#: A duration in seconds.
Seconds = Annotated[float, Field(ge=0)]
#: A strictly positive duration in seconds.
PositiveSeconds = Annotated[float, Field(gt=0)]
#: A probability.
Probability = Annotated[float, Field(ge=0, le=1)]
#: A non-negative quantity: watts, joules, money, material units.
Amount = Annotated[float, Field(ge=0)]
#: An operation's index in its job's route.
OpIndex = Annotated[int, Field(ge=0)]
#: The plant's own number for a production order (one unit), where the plant runs numbered
#: orders, as the OPC UA twin does: it travels from the order through the calls and awards,
#: so the winning machine can name it when it asks the plant to start the operation.
PlantJob = Annotated[int | None, Field(ge=0)]
#: Free text for people (reasons); bounded so one message cannot carry a novel.
Text = Annotated[str, StringConstraints(max_length=500)]
#: A plant variable's name as the supervisor and the OPC UA node map spell it.
VariableName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]

#: A machine's status, as :class:`autofab.envs.factory_model.MachineStatus` names it.
MachineStatusName: TypeAlias = Literal["idle", "running", "down", "maintenance"]


class _Strict(BaseModel):
    """Frozen, strict, closed, finite: what every protocol model (and part of one) is."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
        # The wire spells the version "schema", and only that; Python code never sets it.
        validate_by_name=False,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class MessageBase(_Strict):
    """Base of every message: the schema version, and (in each subclass) the ``type`` tag.

    The version is ``schema`` on the wire; the attribute is ``schema_version`` because
    ``BaseModel.schema`` already exists. Building a message in Python fills it in;
    :func:`decode` insists that the wire carries it.
    """

    # Bounds, not a validator function: the version check stays in pydantic-core (Rust).
    schema_version: int = Field(
        SCHEMA_VERSION, alias="schema", ge=SCHEMA_VERSION, le=SCHEMA_VERSION
    )
    type: str


# --- Contract net ---------------------------------------------------------------------


class CallForProposals(MessageBase):
    """The scheduler announces a ready operation; machines with ``capability`` may bid.

    Bids go to ``Subjects.bid(round_id)`` before ``deadline`` (wall time). An operation
    announced again (no bids, a timeout, a lost machine) gets a new ``round_id``, so a late
    bid can never win a later round.
    """

    type: Literal["cfp"] = "cfp"
    round_id: Token
    job: Token
    op: OpIndex
    capability: Token
    ready_at: PlantTime = Field(description="When the operation can start (plant time).")
    due_at: PlantTime = Field(description="The job's due date (plant time).")
    processing_seconds: PositiveSeconds = Field(
        description="Processing time at the rated speed (speed 1); a machine divides by its speed."
    )
    load: float = Field(1.0, gt=0, description="Relative load; 1 = the machine's rated load.")
    material: Token | None = Field(None, description="Raw material consumed at the start.")
    quantity: Amount = Field(0.0, description="Units of ``material`` consumed.")
    deadline: WallTime = Field(description="Bids arriving later are ignored (wall time).")
    plant_job: PlantJob = None


class Bid(_Strict):
    """One machine's offer inside a :class:`ProposalBatch` (a :class:`Proposal` without the
    round, which the batch carries once)."""

    machine: Token
    finish_at: PlantTime = Field(description="Estimated finish of the operation (plant time).")
    energy_cost: Amount = Field(description="Estimated energy cost, in the plant's currency.")
    health_risk: Probability = Field(
        description="Probability that the machine breaks down during the operation."
    )


class Proposal(MessageBase):
    """One machine's bid for one round (a machine hosted alone answers with this)."""

    type: Literal["proposal"] = "proposal"
    round_id: Token
    machine: Token
    finish_at: PlantTime
    energy_cost: Amount
    health_risk: Probability

    def bid(self) -> Bid:
        """The same offer as a :class:`Bid`, for code that handles batches and singles alike."""
        return Bid(
            machine=self.machine,
            finish_at=self.finish_at,
            energy_cost=self.energy_cost,
            health_risk=self.health_risk,
        )


class ProposalBatch(MessageBase):
    """The bids of every machine on one ``host`` for one round, in one message.

    A host answers each call it hears with exactly one batch, even an empty one: then the
    scheduler knows that host is done and can close a round before its deadline.
    """

    type: Literal["proposal_batch"] = "proposal_batch"
    round_id: Token
    host: Token
    bids: list[Bid]

    @field_validator("bids")
    @classmethod
    def _one_bid_per_machine(cls, bids: list[Bid]) -> list[Bid]:
        # Two bids from one machine would let one round award it twice.
        if len({bid.machine for bid in bids}) < len(bids):
            seen: set[str] = set()
            for bid in bids:
                if bid.machine in seen:
                    raise ValueError(f"machine {bid.machine!r} bids twice")
                seen.add(bid.machine)
        return bids

    def proposals(self) -> list[Proposal]:
        """The batch as single :class:`Proposal` messages."""
        return [
            Proposal(
                round_id=self.round_id,
                machine=b.machine,
                finish_at=b.finish_at,
                energy_cost=b.energy_cost,
                health_risk=b.health_risk,
            )
            for b in self.bids
        ]


class Accept(MessageBase):
    """The scheduler awards round ``round_id`` to ``machine``: start ``job``/``op``."""

    type: Literal["accept"] = "accept"
    round_id: Token
    machine: Token
    job: Token
    op: OpIndex
    plant_job: PlantJob = None


class Reject(MessageBase):
    """The scheduler turns down the bids of ``machines`` in round ``round_id``.

    One message for all losers of a round, as one batch carried many of their bids.
    """

    type: Literal["reject"] = "reject"
    round_id: Token
    machines: list[Token] = Field(min_length=1)
    reason: Text = ""


class InformDone(MessageBase):
    """``machine`` finished ``job``/``op``, the work it won in ``round_id``."""

    type: Literal["inform_done"] = "inform_done"
    round_id: Token
    machine: Token
    job: Token
    op: OpIndex
    started_at: PlantTime
    finished_at: PlantTime
    energy_j: Amount
    defect: bool = False


class Failure(MessageBase):
    """``machine`` could not do ``job``/``op`` (breakdown, interlock, missing material...);
    the scheduler announces the operation again."""

    type: Literal["failure"] = "failure"
    round_id: Token
    machine: Token
    job: Token
    op: OpIndex
    failed_at: PlantTime
    reason: Text


# --- Power budgets ----------------------------------------------------------------------


class PowerRequest(MessageBase):
    """``machine`` asks the energy agent for ``power_w`` from ``start_at`` for
    ``duration_seconds`` (plant time), to run ``job``/``op``.

    An operation may start only with its power granted (ARCHITECTURE.md).
    """

    type: Literal["power_request"] = "power_request"
    request_id: Token
    machine: Token
    job: Token
    op: OpIndex
    power_w: Amount
    start_at: PlantTime
    duration_seconds: PositiveSeconds


class PowerGrant(MessageBase):
    """The energy agent reserves ``power_w`` for ``request_id`` under the plant peak cap,
    until the machine sends :class:`PowerRelease` or ``until_at`` (plant time) passes."""

    type: Literal["power_grant"] = "power_grant"
    request_id: Token
    machine: Token
    power_w: Amount
    until_at: PlantTime


class PowerDeny(MessageBase):
    """No power for ``request_id`` now; ``retry_at`` (plant time) is when the energy agent
    expects headroom, ``None`` if it cannot say."""

    type: Literal["power_deny"] = "power_deny"
    request_id: Token
    machine: Token
    reason: Text
    retry_at: PlantTime | None = None


class PowerRelease(MessageBase):
    """``machine`` no longer needs the power granted for ``request_id``."""

    type: Literal["power_release"] = "power_release"
    request_id: Token
    machine: Token


# --- Material ---------------------------------------------------------------------------


class MaterialReserve(MessageBase):
    """``machine`` asks the supply agent to set ``quantity`` of ``material`` aside for
    ``job``/``op``. An operation may start only with its material reserved."""

    type: Literal["material_reserve"] = "material_reserve"
    request_id: Token
    machine: Token
    job: Token
    op: OpIndex
    material: Token
    quantity: Amount


class MaterialReserved(MessageBase):
    """The supply agent has set the material of ``request_id`` aside."""

    type: Literal["material_reserved"] = "material_reserved"
    request_id: Token
    machine: Token
    material: Token
    quantity: Amount


class MaterialUnavailable(MessageBase):
    """Not enough ``material`` for ``request_id``; ``available_at`` (plant time) is when a
    delivery is expected to cover it, ``None`` if none is on its way."""

    type: Literal["material_unavailable"] = "material_unavailable"
    request_id: Token
    machine: Token
    material: Token
    quantity: Amount
    available_at: PlantTime | None = None


class MaterialRelease(MessageBase):
    """Give back the reservation of ``request_id`` unused (the operation did not start)."""

    type: Literal["material_release"] = "material_release"
    request_id: Token
    machine: Token


class MaterialReorder(MessageBase):
    """The supply agent ordered ``quantity`` of ``material`` from its supplier at
    ``ordered_at``; it should arrive at ``available_at`` (both plant time)."""

    type: Literal["material_reorder"] = "material_reorder"
    material: Token
    quantity: Amount
    ordered_at: PlantTime
    available_at: PlantTime


# --- Machine state ----------------------------------------------------------------------


class Telemetry(MessageBase):
    """One machine's observable state at ``plant_time``, as the telemetry gateway reads it.

    The fields follow :class:`autofab.agents.policies.pdm.SensorReading`; health itself is
    never observed. It is also how agents learn plant time (ARCHITECTURE.md, "Time").
    """

    type: Literal["telemetry"] = "telemetry"
    machine: Token
    plant_time: PlantTime
    status: MachineStatusName
    speed_setpoint: float = Field(ge=0)
    load: float = Field(ge=0)
    run_seconds: Seconds = Field(description="Cumulative running time.")
    renewals: int = Field(ge=0, description="Repairs and maintenance actions begun so far.")
    vibration_mm_s: float = Field(ge=0)
    temperature_c: float
    power_w: Amount
    ops_done: int | None = Field(
        None, ge=0, description="Operations finished so far (good and defective)."
    )
    plant_job: int | None = Field(None, ge=0, description="Production order running now.")
    plant_op: OpIndex | None = Field(None, description="Its operation index.")
    last_plant_job: int | None = Field(None, ge=0, description="Production order done last.")
    last_plant_op: OpIndex | None = Field(None, description="Its operation index.")
    last_defect: bool = Field(False, description="Whether that operation made a defect.")


class HealthReport(MessageBase):
    """The predictive-maintenance view of one machine at ``plant_time``.

    ``rul_seconds`` is the estimated remaining useful life in running time (``None`` before
    the monitor has seen enough), ``failure_probability`` the chance of a breakdown within
    the next ``horizon_seconds`` of running.
    """

    type: Literal["health_report"] = "health_report"
    machine: Token
    plant_time: PlantTime
    rul_seconds: Seconds | None
    failure_probability: Probability
    horizon_seconds: PositiveSeconds


# --- Plant writes -----------------------------------------------------------------------


class SetpointRequest(MessageBase):
    """An agent (``origin``) asks the safety supervisor to set ``variable`` of ``machine``
    to ``value``.

    ``requested_at`` is wall time: a request that waited in a reconnect buffer longer than
    ``ttl_seconds`` is stale, and the supervisor drops it (:attr:`expires_at`).
    """

    type: Literal["setpoint_request"] = "setpoint_request"
    request_id: Token
    machine: Token
    variable: VariableName = Field(description="For example 'speed_setpoint'.")
    value: float
    requested_at: WallTime
    ttl_seconds: PositiveSeconds
    origin: Token

    @property
    def expires_at(self) -> float:
        """Wall time after which the request must not be applied."""
        return self.requested_at + self.ttl_seconds


# --- Orders from an MES -----------------------------------------------------------------


class OrderItem(_Strict):
    """``quantity`` units of ``product`` (a product name from the plant config)."""

    product: Token
    quantity: int = Field(1, ge=1)


class OrderSubmit(MessageBase):
    """An MES submits an order under its own ``client_order_id``.

    Submitting the same ``client_order_id`` twice must not make the order twice: the plant
    answers the repeat with the first answer.
    """

    type: Literal["order_submit"] = "order_submit"
    client_order_id: Token
    items: list[OrderItem] = Field(min_length=1)
    due_at: PlantTime
    plant_job: PlantJob = None

    @model_validator(mode="after")
    def _one_unit_per_plant_job(self) -> OrderSubmit:
        if self.plant_job is not None and sum(i.quantity for i in self.items) != 1:
            raise ValueError("plant_job names one production order: the order must be one unit")
        return self


class OrderAck(MessageBase):
    """The plant took ``client_order_id`` as ``order``, made of ``jobs``."""

    type: Literal["order_ack"] = "order_ack"
    client_order_id: Token
    order: Token
    jobs: list[Token] = Field(min_length=1)


class OrderRefused(MessageBase):
    """The plant will not make ``client_order_id`` (unknown product, malformed, ...)."""

    type: Literal["order_refused"] = "order_refused"
    client_order_id: Token
    reason: Text


class OrderStatusQuery(MessageBase):
    """An MES asks where ``client_order_id`` stands; the answer is an :class:`OrderStatus`."""

    type: Literal["order_status_query"] = "order_status_query"
    client_order_id: Token


class OrderStatus(MessageBase):
    """Where ``client_order_id`` stands: ``order`` is ``None`` while ``status`` is
    ``"unknown"`` or ``"refused"``; ``finish_at`` (plant time) is the estimated finish
    while in progress and the actual finish once done."""

    type: Literal["order_status"] = "order_status"
    client_order_id: Token
    order: Token | None
    status: Literal["unknown", "refused", "queued", "in_progress", "done"]
    jobs_done: int = Field(ge=0)
    jobs_total: int = Field(ge=0)
    finish_at: PlantTime | None = None


class PolicyDeploy(MessageBase):
    """An operator asks the machine hosts to use another bidding policy: a policy file,
    ``"default"`` (the shipped learned one) or ``"rules"``. Each host answers with
    :class:`PolicyDeployed`; a host that cannot load it keeps its current policy."""

    type: Literal["policy_deploy"] = "policy_deploy"
    policy: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    requested_by: Token


class PolicyDeployed(MessageBase):
    """One host's answer to :class:`PolicyDeploy`: in use (``ok``) or refused, and why."""

    type: Literal["policy_deployed"] = "policy_deployed"
    host: Token
    ok: bool
    policy: Annotated[str, StringConstraints(max_length=4096)]
    detail: Text = ""


# --- The registry and the codec ---------------------------------------------------------

#: Any protocol message; ``type`` selects the model.
Message: TypeAlias = Annotated[
    CallForProposals
    | Proposal
    | ProposalBatch
    | Accept
    | Reject
    | InformDone
    | Failure
    | PowerRequest
    | PowerGrant
    | PowerDeny
    | PowerRelease
    | MaterialReserve
    | MaterialReserved
    | MaterialUnavailable
    | MaterialRelease
    | MaterialReorder
    | Telemetry
    | HealthReport
    | SetpointRequest
    | OrderSubmit
    | OrderAck
    | OrderRefused
    | OrderStatusQuery
    | OrderStatus
    | PolicyDeploy
    | PolicyDeployed,
    Field(discriminator="type"),
]

#: The wire ``type`` of each message model, and the model.
MESSAGE_TYPES: Final[Mapping[str, type[MessageBase]]] = MappingProxyType(
    {cls.model_fields["type"].default: cls for cls in get_args(get_args(Message)[0])}
)

_MESSAGE_ADAPTER: Final[TypeAdapter[Message]] = TypeAdapter(Message)

M = TypeVar("M", bound=MessageBase)


def encode(message: MessageBase, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The message as compact UTF-8 JSON, ready to publish.

    Raises :class:`ProtocolError` (reason ``"too_large"``) for a message the receivers would
    refuse anyway, so the sender learns of it, not a log line on another host.
    """
    data = message.__pydantic_serializer__.to_json(message)
    if len(data) > max_bytes:
        raise ProtocolError(
            f"<outgoing {message.type}>",
            _WHOLE,
            "too_large",
            f"{len(data)} bytes, more than the limit of {max_bytes}",
        )
    return data


@overload
def decode(
    subject: str, data: bytes, expected: None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Message: ...
@overload
def decode(
    subject: str, data: bytes, expected: type[M], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> M: ...
def decode(
    subject: str,
    data: bytes,
    expected: type[MessageBase] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> MessageBase:
    """The message in ``data``, received on ``subject``; any message type, or only
    ``expected``.

    Raises :class:`ProtocolError` for anything else, so a handler needs one ``except``. The
    subject is only used to name the message in errors.
    """
    if len(data) > max_bytes:
        raise ProtocolError(
            subject, _WHOLE, "too_large", f"{len(data)} bytes, more than the limit of {max_bytes}"
        )
    try:
        if expected is None:
            message: MessageBase = _MESSAGE_ADAPTER.validate_json(data)
        else:
            message = expected.model_validate_json(data)
    except ValidationError as err:
        raise _protocol_error(subject, data, err, expected) from err
    if "schema_version" not in message.model_fields_set:
        raise ProtocolError(
            subject, "schema", "schema_version", f"missing; expected {SCHEMA_VERSION}"
        )
    return message


def _protocol_error(
    subject: str, data: bytes, err: ValidationError, expected: type[MessageBase] | None
) -> ProtocolError:
    """Turn pydantic's errors into one :class:`ProtocolError` about the most telling one.

    A wrong schema version explains every other error, and a wrong type most of them, so
    those come first; otherwise the first error, with its location as a dotted path.
    """
    errors = err.errors(include_url=False)
    first = errors[0]
    kind = first["type"]
    if kind == "json_invalid":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            return ProtocolError(subject, _WHOLE, "not_utf8", f"not UTF-8 text ({bad.reason})")
        return ProtocolError(subject, _WHOLE, "malformed_json", first["msg"])
    if kind in ("dict_type", "model_type"):
        return ProtocolError(
            subject, _WHOLE, "not_an_object", f"a JSON object expected, found {data[:40]!r}"
        )
    if kind == "union_tag_not_found":
        return ProtocolError(subject, "type", "unknown_type", "missing")
    if kind == "union_tag_invalid":
        found = first["ctx"]["tag"] if "ctx" in first else "?"
        return ProtocolError(subject, "type", "unknown_type", f"unknown message type {found!r}")

    def path(error: Any) -> tuple[str | int, ...]:
        loc: tuple[str | int, ...] = error["loc"]
        # Through the union, the first location item is the type tag; drop it.
        return loc[1:] if expected is None and loc and loc[0] in MESSAGE_TYPES else loc

    for error in errors:
        if path(error) == ("schema",):
            found = error.get("input")
            return ProtocolError(
                subject,
                "schema",
                "schema_version",
                f"expected schema version {SCHEMA_VERSION}, found {found!r}",
            )
    if expected is not None:
        for error in errors:
            if path(error) == ("type",):
                found = error.get("input")
                wanted = expected.model_fields["type"].default
                known = isinstance(found, str) and found in MESSAGE_TYPES
                reason: ErrorReason = "unexpected_type" if known else "unknown_type"
                return ProtocolError(
                    subject, "type", reason, f"expected type {wanted!r}, found {found!r}"
                )
    loc = path(first)
    field = _dotted(loc) or _WHOLE
    if kind == "extra_forbidden":
        detail = "unknown field"
    elif kind == "string_pattern_mismatch" and first.get("ctx", {}).get("pattern") == TOKEN_PATTERN:
        detail = _TOKEN_RULE
    else:
        detail = first["msg"].removeprefix("Value error, ")
    if kind not in ("missing", "extra_forbidden") and not isinstance(
        first.get("input"), dict | list
    ):
        detail += f" (found {first.get('input')!r})"
    return ProtocolError(subject, field, "invalid_field", detail)


def _dotted(loc: tuple[str | int, ...]) -> str:
    """``("bids", 3, "machine")`` as ``"bids[3].machine"``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# --- Subjects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Subjects:
    """Every subject of one plant, written here once: ``autofab.<plant>.<topic>...``.

    Methods that take a name (machine, capability, round) check it with
    :func:`check_token` and raise ValueError for a bad one. The ``*_all`` forms are
    wildcards for subscribing. Each docstring says which messages travel there.
    """

    plant: str

    def __post_init__(self) -> None:
        check_token(self.plant, "plant")

    @property
    def prefix(self) -> str:
        """``autofab.<plant>``: every subject of this plant starts with it."""
        return f"autofab.{self.plant}"

    @property
    def all(self) -> str:
        """Every subject of this plant (for monitoring and recording)."""
        return f"{self.prefix}.>"

    # Contract net.
    def cfp(self, capability: str) -> str:
        """:class:`CallForProposals` for operations that need ``capability``."""
        return f"{self.prefix}.cnp.cfp.{check_token(capability, 'capability')}"

    @property
    def cfp_all(self) -> str:
        """Calls for every capability."""
        return f"{self.prefix}.cnp.cfp.*"

    def bid(self, round_id: str) -> str:
        """:class:`Proposal` and :class:`ProposalBatch` answering round ``round_id``."""
        return f"{self.prefix}.cnp.bid.{check_token(round_id, 'round_id')}"

    @property
    def bid_all(self) -> str:
        """Bids of every round."""
        return f"{self.prefix}.cnp.bid.*"

    def award(self, round_id: str) -> str:
        """:class:`Accept` and :class:`Reject` closing round ``round_id``."""
        return f"{self.prefix}.cnp.award.{check_token(round_id, 'round_id')}"

    @property
    def award_all(self) -> str:
        """Awards of every round (what a machine host listens to)."""
        return f"{self.prefix}.cnp.award.*"

    def result(self, round_id: str) -> str:
        """:class:`InformDone` and :class:`Failure` for the work won in ``round_id``."""
        return f"{self.prefix}.cnp.result.{check_token(round_id, 'round_id')}"

    @property
    def result_all(self) -> str:
        """Results of every round (what the scheduler listens to)."""
        return f"{self.prefix}.cnp.result.*"

    # Power budgets.
    @property
    def energy_request(self) -> str:
        """:class:`PowerRequest`, to the energy agent."""
        return f"{self.prefix}.energy.request"

    def energy_reply(self, machine: str) -> str:
        """:class:`PowerGrant` and :class:`PowerDeny`, to ``machine``."""
        return f"{self.prefix}.energy.reply.{check_token(machine, 'machine')}"

    @property
    def energy_reply_all(self) -> str:
        """Power replies to every machine (what a machine host listens to)."""
        return f"{self.prefix}.energy.reply.*"

    @property
    def energy_release(self) -> str:
        """:class:`PowerRelease`, to the energy agent."""
        return f"{self.prefix}.energy.release"

    # Material.
    @property
    def material_reserve(self) -> str:
        """:class:`MaterialReserve`, to the supply agent."""
        return f"{self.prefix}.material.reserve"

    def material_reply(self, machine: str) -> str:
        """:class:`MaterialReserved` and :class:`MaterialUnavailable`, to ``machine``."""
        return f"{self.prefix}.material.reply.{check_token(machine, 'machine')}"

    @property
    def material_reply_all(self) -> str:
        """Material replies to every machine (what a machine host listens to)."""
        return f"{self.prefix}.material.reply.*"

    @property
    def material_release(self) -> str:
        """:class:`MaterialRelease`, to the supply agent."""
        return f"{self.prefix}.material.release"

    @property
    def material_reorder(self) -> str:
        """:class:`MaterialReorder`, from the supply agent to whoever plans with it."""
        return f"{self.prefix}.material.reorder"

    # Machine state.
    def telemetry(self, machine: str) -> str:
        """:class:`Telemetry` of ``machine``."""
        return f"{self.prefix}.telemetry.{check_token(machine, 'machine')}"

    @property
    def telemetry_all(self) -> str:
        """Telemetry of every machine."""
        return f"{self.prefix}.telemetry.*"

    def health(self, machine: str) -> str:
        """:class:`HealthReport` of ``machine``."""
        return f"{self.prefix}.health.{check_token(machine, 'machine')}"

    @property
    def health_all(self) -> str:
        """Health reports of every machine."""
        return f"{self.prefix}.health.*"

    # Plant writes.
    @property
    def setpoint_request(self) -> str:
        """:class:`SetpointRequest`, to the safety supervisor (the only plant writer)."""
        return f"{self.prefix}.setpoint.request"

    # Operations.
    @property
    def policy_deploy(self) -> str:
        """:class:`PolicyDeploy` to every machine host, answered with
        :class:`PolicyDeployed` by each (request, many replies)."""
        return f"{self.prefix}.policy.deploy"

    # Orders.
    @property
    def orders_submit(self) -> str:
        """:class:`OrderSubmit`, from the MES."""
        return f"{self.prefix}.orders.submit"

    @property
    def orders_query(self) -> str:
        """:class:`OrderStatusQuery`, from the MES."""
        return f"{self.prefix}.orders.query"

    @property
    def orders_reply(self) -> str:
        """:class:`OrderAck`, :class:`OrderRefused` and :class:`OrderStatus`, to the MES;
        ``client_order_id`` says which order each is about."""
        return f"{self.prefix}.orders.reply"
