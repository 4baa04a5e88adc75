"""The message protocol: round trips, refusals of bad input, and subjects."""

from __future__ import annotations

import json
import math
from typing import Any, Literal, get_args, get_origin

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from autofab.agents.protocol import (
    DEFAULT_MAX_BYTES,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    TOKEN_PATTERN,
    Accept,
    Bid,
    CallForProposals,
    Failure,
    HealthReport,
    InformDone,
    MaterialRelease,
    MaterialReorder,
    MaterialReserve,
    MaterialReserved,
    MaterialUnavailable,
    MessageBase,
    OrderAck,
    OrderItem,
    OrderRefused,
    OrderStatus,
    OrderStatusQuery,
    OrderSubmit,
    PolicyDeploy,
    PolicyDeployed,
    PowerDeny,
    PowerGrant,
    PowerRelease,
    PowerRequest,
    Proposal,
    ProposalBatch,
    ProtocolError,
    Reject,
    SetpointRequest,
    Subjects,
    Telemetry,
    check_token,
    decode,
    encode,
)

SUBJECT = "autofab.demo.cnp.bid.r-7"

PROPOSAL = Proposal(
    round_id="r-7", machine="mill-1", finish_at=1234.5, energy_cost=0.42, health_risk=0.01
)

#: One hand-written example of every message type.
EXAMPLES: list[MessageBase] = [
    CallForProposals(
        round_id="r-7",
        job="j12",
        op=1,
        capability="drill",
        ready_at=600.0,
        due_at=14_400.0,
        processing_seconds=360.0,
        load=1.2,
        material="steel-bar",
        quantity=1.0,
        deadline=1_764_000_000.25,
    ),
    PROPOSAL,
    ProposalBatch(
        round_id="r-7",
        host="host-0",
        bids=[
            Bid(machine="drill-1", finish_at=960.0, energy_cost=0.1, health_risk=0.0),
            Bid(machine="drill-2", finish_at=1020.0, energy_cost=0.09, health_risk=0.02),
        ],
    ),
    Accept(round_id="r-7", machine="drill-1", job="j12", op=1),
    Reject(round_id="r-7", machines=["drill-2", "mill-5"], reason="later finish"),
    InformDone(
        round_id="r-7",
        machine="drill-1",
        job="j12",
        op=1,
        started_at=600.0,
        finished_at=960.0,
        energy_j=1.44e6,
        defect=True,
    ),
    Failure(
        round_id="r-7", machine="drill-1", job="j12", op=1, failed_at=700.5, reason="breakdown"
    ),
    PowerRequest(
        request_id="q-1",
        machine="drill-1",
        job="j12",
        op=1,
        power_w=4000.0,
        start_at=600.0,
        duration_seconds=360.0,
    ),
    PowerGrant(request_id="q-1", machine="drill-1", power_w=4000.0, until_at=960.0),
    PowerDeny(request_id="q-1", machine="drill-1", reason="peak cap", retry_at=900.0),
    PowerRelease(request_id="q-1", machine="drill-1"),
    MaterialReserve(
        request_id="q-2", machine="mill-1", job="j12", op=0, material="steel-bar", quantity=1.0
    ),
    MaterialReserved(request_id="q-2", machine="mill-1", material="steel-bar", quantity=1.0),
    MaterialUnavailable(
        request_id="q-2", machine="mill-1", material="steel-bar", quantity=1.0, available_at=None
    ),
    MaterialRelease(request_id="q-2", machine="mill-1"),
    MaterialReorder(material="steel-bar", quantity=30.0, ordered_at=3600.0, available_at=10_800.0),
    Telemetry(
        machine="mill-1",
        plant_time=1800.0,
        status="running",
        speed_setpoint=1.1,
        load=1.0,
        run_seconds=5400.0,
        renewals=2,
        vibration_mm_s=2.4,
        temperature_c=41.5,
        power_w=12_500.0,
    ),
    HealthReport(
        machine="mill-1",
        plant_time=1800.0,
        rul_seconds=None,
        failure_probability=0.03,
        horizon_seconds=3600.0,
    ),
    SetpointRequest(
        request_id="sp-9",
        machine="mill-1",
        variable="speed_setpoint",
        value=1.2,
        requested_at=1_764_000_000.0,
        ttl_seconds=2.0,
        origin="scheduler",
    ),
    OrderSubmit(
        client_order_id="PO-4711",
        items=[OrderItem(product="bracket", quantity=3), OrderItem(product="shaft")],
        due_at=28_800.0,
    ),
    OrderAck(client_order_id="PO-4711", order="o-3", jobs=["j40", "j41", "j42", "j43"]),
    OrderRefused(client_order_id="PO-4712", reason="unknown product 'gearbox'"),
    OrderStatusQuery(client_order_id="PO-4711"),
    OrderStatus(
        client_order_id="PO-4711",
        order="o-3",
        status="in_progress",
        jobs_done=1,
        jobs_total=4,
        finish_at=20_000.0,
    ),
    PolicyDeploy(policy="runs/bidding/model.npz", requested_by="operator-anna"),
    PolicyDeployed(host="line-machining", ok=False, policy="x.npz", detail="no such file"),
]


def wire(message: MessageBase) -> dict[str, Any]:
    """The message as the JSON object that goes on the wire, to edit into bad input."""
    return json.loads(encode(message))


def refused(data: bytes, expected: type[MessageBase] | None = None) -> ProtocolError:
    """The error that decoding ``data`` on :data:`SUBJECT` raises."""
    with pytest.raises(ProtocolError) as info:
        decode(SUBJECT, data, expected)
    err = info.value
    assert err.subject == SUBJECT
    assert SUBJECT in str(err)
    assert str(err).startswith(f"bad message on {SUBJECT!r}: {err.field}: ")
    return err


# --- Round trips ----------------------------------------------------------------------


def test_examples_cover_every_message_type() -> None:
    assert sorted(m.type for m in EXAMPLES) == sorted(MESSAGE_TYPES)
    assert all(MESSAGE_TYPES[m.type] is type(m) for m in EXAMPLES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.type)
def test_round_trip(message: MessageBase) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    assert decode(SUBJECT, data) == message
    assert decode(SUBJECT, data, type(message)) == message
    obj = json.loads(data)
    assert obj["schema"] == SCHEMA_VERSION
    assert obj["type"] == message.type
    assert "schema_version" not in obj


def test_wire_format_of_a_proposal_is_compact_json() -> None:
    assert encode(PROPOSAL) == (
        b'{"schema":1,"type":"proposal","round_id":"r-7","machine":"mill-1",'
        b'"finish_at":1234.5,"energy_cost":0.42,"health_risk":0.01}'
    )


def test_integers_are_accepted_for_float_fields() -> None:
    # JSON has one number type; 1800 is a valid plant time, not a coercion.
    obj = wire(PROPOSAL) | {"finish_at": 1800}
    assert decode(SUBJECT, json.dumps(obj).encode()).finish_at == 1800.0  # type: ignore[union-attr]


def test_batch_and_single_proposals_agree() -> None:
    batch = EXAMPLES[2]
    assert isinstance(batch, ProposalBatch)
    singles = batch.proposals()
    assert [p.bid() for p in singles] == batch.bids
    assert {p.round_id for p in singles} == {batch.round_id}


def test_empty_batch_says_a_host_has_no_bid() -> None:
    empty = ProposalBatch(round_id="r-7", host="host-3", bids=[])
    assert decode(SUBJECT, encode(empty)) == empty


def test_setpoint_request_expiry_is_wall_time() -> None:
    request = EXAMPLES[18]
    assert isinstance(request, SetpointRequest)
    assert request.expires_at == 1_764_000_002.0


# --- Property: random valid messages round-trip ----------------------------------------

_tokens = st.from_regex(TOKEN_PATTERN, fullmatch=True)
_plant_time = st.floats(min_value=0, max_value=1e9)
_wall_time = st.floats(min_value=0, max_value=4e9)
_positive = st.floats(min_value=0, max_value=1e7, exclude_min=True)
_amount = st.floats(min_value=0, max_value=1e12)
_probability = st.floats(min_value=0, max_value=1)
_count = st.integers(min_value=0, max_value=10**6)

#: A strategy for every field name. One name means one thing, so one strategy per name
#: serves every message; a field added without one fails the property test loudly.
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    **dict.fromkeys(
        [
            "round_id",
            "job",
            "machine",
            "host",
            "capability",
            "material",
            "request_id",
            "origin",
            "client_order_id",
            "order",
            "product",
        ],
        _tokens,
    ),
    **dict.fromkeys(
        [
            "ready_at",
            "due_at",
            "finish_at",
            "started_at",
            "finished_at",
            "failed_at",
            "start_at",
            "until_at",
            "retry_at",
            "available_at",
            "ordered_at",
            "plant_time",
        ],
        _plant_time,
    ),
    **dict.fromkeys(["deadline", "requested_at"], _wall_time),
    **dict.fromkeys(
        ["processing_seconds", "duration_seconds", "ttl_seconds", "horizon_seconds", "load"],
        _positive,
    ),
    **dict.fromkeys(["run_seconds", "rul_seconds", "energy_cost", "energy_j", "power_w"], _amount),
    **dict.fromkeys(["health_risk", "failure_probability"], _probability),
    **dict.fromkeys(["op", "renewals", "jobs_done", "jobs_total"], _count),
    "quantity": _amount,
    "reason": st.text(max_size=500),
    "defect": st.booleans(),
    "speed_setpoint": st.floats(min_value=0, max_value=10),
    "vibration_mm_s": st.floats(min_value=0, max_value=100),
    "temperature_c": st.floats(min_value=-50, max_value=500),
    "variable": st.from_regex(r"^[a-z][a-z0-9_]{0,63}$", fullmatch=True),
    "value": st.floats(allow_nan=False, allow_infinity=False),
    "machines": st.lists(_tokens, min_size=1, max_size=8),
    "jobs": st.lists(_tokens, min_size=1, max_size=8),
    "plant_job": st.integers(min_value=0, max_value=10**6),
    "last_plant_job": st.integers(min_value=0, max_value=10**6),
    "plant_op": st.integers(min_value=0, max_value=100),
    "last_plant_op": st.integers(min_value=0, max_value=100),
    "ops_done": st.integers(min_value=0, max_value=10**6),
    "last_defect": st.booleans(),
    "policy": st.text(min_size=1, max_size=50),
    "requested_by": _tokens,
    "host": _tokens,
    "ok": st.booleans(),
    "detail": st.text(max_size=50),
}


def _strategy(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Random valid instances of ``model``, built from :data:`FIELD_STRATEGIES`."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in model.model_fields.items():
        if name in ("schema_version", "type"):
            continue
        annotation = info.annotation
        if name == "bids":
            base: st.SearchStrategy[Any] = st.lists(
                _strategy(Bid), max_size=12, unique_by=lambda b: b.machine
            )
        elif name == "items":
            base = st.lists(_strategy(OrderItem), min_size=1, max_size=4)
        elif get_origin(annotation) is Literal:
            base = st.sampled_from(get_args(annotation))
        elif model is OrderSubmit and name == "plant_job":
            base = st.none()  # only valid on one-unit orders; tested on its own
        elif model is OrderItem and name == "quantity":
            base = st.integers(min_value=1, max_value=10**6)
        else:
            base = FIELD_STRATEGIES[name]
        fields[name] = st.none() | base if type(None) in get_args(annotation) else base
    return st.fixed_dictionaries(fields).map(lambda kwargs: model(**kwargs))


_any_message = st.sampled_from(sorted(MESSAGE_TYPES)).flatmap(
    lambda tag: _strategy(MESSAGE_TYPES[tag])
)


@settings(max_examples=300, deadline=None)
@given(_any_message)
def test_random_messages_round_trip(message: MessageBase) -> None:
    data = encode(message)
    assert decode(SUBJECT, data) == message
    assert decode(SUBJECT, data, type(message)) == message


# --- Refusals ---------------------------------------------------------------------------


def test_protocol_error_is_a_value_error_with_fields_for_metrics() -> None:
    err = refused(b"{")
    assert isinstance(err, ValueError)
    assert (err.field, err.reason) == ("<message>", "malformed_json")


def test_oversized_message_is_refused_before_parsing() -> None:
    err = refused(b" " * (DEFAULT_MAX_BYTES + 1))
    assert (err.field, err.reason) == ("<message>", "too_large")
    assert str(DEFAULT_MAX_BYTES) in str(err)
    data = encode(PROPOSAL)
    with pytest.raises(ProtocolError, match="more than the limit"):
        decode(SUBJECT, data, max_bytes=len(data) - 1)
    assert decode(SUBJECT, data, max_bytes=len(data)) == PROPOSAL


def test_encode_refuses_a_message_receivers_would_refuse() -> None:
    batch = EXAMPLES[2]
    with pytest.raises(ProtocolError) as info:
        encode(batch, max_bytes=50)
    assert info.value.reason == "too_large"
    assert "proposal_batch" in info.value.subject


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe{}", encode(PROPOSAL).replace(b"mill-1", b"mill-\xe9")],
    ids=["bom", "latin-1 inside a string"],
)
def test_non_utf8_is_refused(data: bytes) -> None:
    err = refused(data)
    assert (err.field, err.reason) == ("<message>", "not_utf8")


def test_every_truncation_is_refused() -> None:
    data = encode(EXAMPLES[2])
    for end in range(len(data)):
        err = refused(data[:end])
        assert err.reason == "malformed_json"


@pytest.mark.parametrize("data", [b"", b"not json", b'{"schema":1,}', b"{'schema': 1}"], ids=repr)
def test_malformed_json_is_refused(data: bytes) -> None:
    assert refused(data).reason == "malformed_json"


@pytest.mark.parametrize("data", [b"[]", b"1", b'"proposal"', b"null"])
def test_json_that_is_not_an_object_is_refused(data: bytes) -> None:
    err = refused(data)
    assert (err.field, err.reason) == ("<message>", "not_an_object")
    assert refused(data, Proposal).reason == "not_an_object"


@pytest.mark.parametrize("found", [2, 0, 99])
@pytest.mark.parametrize("expected", [None, Proposal])
def test_wrong_schema_version_names_expected_and_found(
    found: int, expected: type[MessageBase] | None
) -> None:
    # Even with other fields wrong (a future version may rename them), the version is what
    # the error reports: it explains the rest.
    obj = wire(PROPOSAL) | {"schema": found, "finish_time": 1.0}
    err = refused(json.dumps(obj).encode(), expected)
    assert (err.field, err.reason) == ("schema", "schema_version")
    assert f"expected schema version {SCHEMA_VERSION}, found {found}" in str(err)


@pytest.mark.parametrize("found", ['"1"', "true", "1.0", "null"])
def test_schema_version_of_the_wrong_json_type_is_refused(found: str) -> None:
    data = encode(PROPOSAL).replace(b'"schema":1', f'"schema":{found}'.encode())
    err = refused(data)
    assert (err.field, err.reason) == ("schema", "schema_version")
    assert f"found {json.loads(found)!r}" in str(err)


def test_schema_version_has_one_spelling_on_the_wire() -> None:
    obj = wire(PROPOSAL)
    obj["schema_version"] = obj.pop("schema")
    err = refused(json.dumps(obj).encode())
    assert (err.field, err.reason) == ("schema_version", "invalid_field")
    assert "unknown field" in str(err)


@pytest.mark.parametrize("expected", [None, Proposal])
def test_missing_schema_version_is_refused(expected: type[MessageBase] | None) -> None:
    obj = wire(PROPOSAL)
    del obj["schema"]
    err = refused(json.dumps(obj).encode(), expected)
    assert (err.field, err.reason) == ("schema", "schema_version")
    assert "missing" in str(err)


def test_unknown_type_is_refused() -> None:
    err = refused(json.dumps(wire(PROPOSAL) | {"type": "gossip"}).encode())
    assert (err.field, err.reason) == ("type", "unknown_type")
    assert "'gossip'" in str(err)
    obj = wire(PROPOSAL)
    del obj["type"]
    assert refused(json.dumps(obj).encode()).reason == "unknown_type"
    assert refused(json.dumps(wire(PROPOSAL) | {"type": "gossip"}).encode(), Proposal).reason == (
        "unknown_type"
    )


def test_a_known_but_unexpected_type_is_refused() -> None:
    accept = encode(EXAMPLES[3])
    err = refused(accept, Proposal)
    assert (err.field, err.reason) == ("type", "unexpected_type")
    assert "expected type 'proposal', found 'accept'" in str(err)


@pytest.mark.parametrize(
    ("change", "field", "found"),
    [
        ({"finish_at": "12"}, "finish_at", "'12'"),  # no string-to-number coercion
        ({"finish_at": True}, "finish_at", "True"),
        ({"finish_at": -1.0}, "finish_at", "-1.0"),
        ({"health_risk": 1.5}, "health_risk", "1.5"),
        ({"machine": 7}, "machine", "7"),
        ({"machine": "mill 1"}, "machine", "'mill 1'"),  # would break the subject
        ({"machine": "mill.1"}, "machine", "'mill.1'"),
        ({"machine": "*"}, "machine", "'*'"),
        ({"round_id": ""}, "round_id", "''"),
        ({"finish_at": None}, "finish_at", "None"),
        ({"bid_price": 3.0}, "bid_price", None),
    ],
)
def test_invalid_field_is_named(change: dict[str, Any], field: str, found: str | None) -> None:
    err = refused(json.dumps(wire(PROPOSAL) | change).encode())
    assert (err.field, err.reason) == (field, "invalid_field")
    if found is not None:
        assert f"(found {found})" in str(err)
    else:
        assert "unknown field" in str(err)


def test_missing_field_is_named() -> None:
    obj = wire(PROPOSAL)
    del obj["energy_cost"]
    err = refused(json.dumps(obj).encode())
    assert (err.field, err.reason) == ("energy_cost", "invalid_field")
    assert "required" in str(err)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_are_refused(literal: bytes) -> None:
    data = encode(PROPOSAL).replace(b"1234.5", literal)
    err = refused(data)
    assert (err.field, err.reason) in {
        ("finish_at", "invalid_field"),
        ("<message>", "malformed_json"),
    }


def test_non_finite_numbers_cannot_be_built_either() -> None:
    with pytest.raises(ValueError, match="finite"):
        Proposal(round_id="r", machine="m", finish_at=math.inf, energy_cost=0.0, health_risk=0.0)
    with pytest.raises(ValueError, match="finite"):
        SetpointRequest(
            request_id="q",
            machine="m",
            variable="speed_setpoint",
            value=math.nan,
            requested_at=1.0,
            ttl_seconds=1.0,
            origin="a",
        )


def test_nested_fields_are_named_by_path() -> None:
    obj = wire(EXAMPLES[2])
    obj["bids"][1]["machine"] = "drill 2"
    err = refused(json.dumps(obj).encode())
    assert err.field == "bids[1].machine"
    assert "not a valid subject token" in str(err)


def test_one_bid_per_machine_in_a_batch() -> None:
    obj = wire(EXAMPLES[2])
    obj["bids"][1]["machine"] = obj["bids"][0]["machine"]
    err = refused(json.dumps(obj).encode())
    assert err.field == "bids"
    assert "'drill-1' bids twice" in str(err)


def test_integer_fields_refuse_floats_and_booleans() -> None:
    for bad in (1.0, True, "1"):
        obj = wire(EXAMPLES[3]) | {"op": bad}
        assert refused(json.dumps(obj).encode()).field == "op"


def test_messages_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        PROPOSAL.finish_at = 0.0  # type: ignore[misc]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _outcome(data: bytes, expected: type[MessageBase] | None = None) -> ProtocolError | None:
    """The error decoding ``data`` raises, ``None`` if it decodes; any other error escapes."""
    try:
        decode(SUBJECT, data, expected)
    except ProtocolError as err:
        return err
    return None


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(EXAMPLES), _json_values, st.booleans())
def test_any_field_value_is_decoded_or_refused(
    data: st.DataObject, message: MessageBase, value: Any, typed: bool
) -> None:
    # An agent's handler needs one `except ProtocolError`: nothing else may escape.
    obj = wire(message)
    obj[data.draw(st.sampled_from(sorted(obj)) | st.text(max_size=12))] = value
    err = _outcome(json.dumps(obj).encode(), type(message) if typed else None)
    assert err is None or (err.subject == SUBJECT and err.field)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_decoded_or_refused(data: bytes) -> None:
    err = _outcome(data)
    assert err is None or err.field


# --- Subjects ---------------------------------------------------------------------------


def test_subjects_of_the_demo_plant() -> None:
    s = Subjects("demo")
    assert s.prefix == "autofab.demo"
    assert s.all == "autofab.demo.>"
    assert s.cfp("mill") == "autofab.demo.cnp.cfp.mill"
    assert s.cfp_all == "autofab.demo.cnp.cfp.*"
    assert s.bid("r-7") == "autofab.demo.cnp.bid.r-7"
    assert s.bid_all == "autofab.demo.cnp.bid.*"
    assert s.award("r-7") == "autofab.demo.cnp.award.r-7"
    assert s.award_all == "autofab.demo.cnp.award.*"
    assert s.result("r-7") == "autofab.demo.cnp.result.r-7"
    assert s.result_all == "autofab.demo.cnp.result.*"
    assert s.energy_request == "autofab.demo.energy.request"
    assert s.energy_reply("mill-1") == "autofab.demo.energy.reply.mill-1"
    assert s.energy_reply_all == "autofab.demo.energy.reply.*"
    assert s.energy_release == "autofab.demo.energy.release"
    assert s.material_reserve == "autofab.demo.material.reserve"
    assert s.material_reply("mill-1") == "autofab.demo.material.reply.mill-1"
    assert s.material_reply_all == "autofab.demo.material.reply.*"
    assert s.material_release == "autofab.demo.material.release"
    assert s.material_reorder == "autofab.demo.material.reorder"
    assert s.telemetry("mill-1") == "autofab.demo.telemetry.mill-1"
    assert s.telemetry_all == "autofab.demo.telemetry.*"
    assert s.health("mill-1") == "autofab.demo.health.mill-1"
    assert s.health_all == "autofab.demo.health.*"
    assert s.setpoint_request == "autofab.demo.setpoint.request"
    assert s.orders_submit == "autofab.demo.orders.submit"
    assert s.orders_query == "autofab.demo.orders.query"
    assert s.orders_reply == "autofab.demo.orders.reply"


def test_subjects_differ_per_plant() -> None:
    assert Subjects("plant100").orders_submit == "autofab.plant100.orders.submit"
    assert Subjects("demo") == Subjects("demo")


BAD_TOKENS = [
    ("", "empty"),
    ("de mo", "' '"),
    ("de.mo", "'.'"),
    ("mill*", "'*'"),
    ("mill>", "'>'"),
    ("tab\there", "'\\t'"),
    ("é", "'é'"),
    ("x" * 129, "longer than 128"),
]


@pytest.mark.parametrize(("token", "problem"), BAD_TOKENS)
def test_bad_plant_name_is_refused(token: str, problem: str) -> None:
    with pytest.raises(ValueError, match=r"^plant .* is not a valid subject token") as info:
        Subjects(token)
    assert problem in str(info.value)


@pytest.mark.parametrize(("token", "problem"), BAD_TOKENS)
def test_bad_names_in_subjects_are_refused(token: str, problem: str) -> None:
    s = Subjects("demo")
    for build, what in [
        (s.cfp, "capability"),
        (s.bid, "round_id"),
        (s.award, "round_id"),
        (s.result, "round_id"),
        (s.energy_reply, "machine"),
        (s.material_reply, "machine"),
        (s.telemetry, "machine"),
        (s.health, "machine"),
    ]:
        with pytest.raises(ValueError, match=f"^{what} ") as info:
            build(token)
        assert problem in str(info.value)


@given(_tokens)
def test_token_rule_is_the_same_in_subjects_and_messages(token: str) -> None:
    assert check_token(token) == token
    assert Subjects("demo").telemetry(token).split(".")[-1] == token
    message = PROPOSAL.model_copy(update={"machine": token})
    assert decode(SUBJECT, encode(message)) == message
