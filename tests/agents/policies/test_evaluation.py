"""Evaluation: instance lists, the results document, gaps and decision latency."""

from __future__ import annotations

import numpy as np
import pytest

from autofab.agents.policies.evaluation import (
    MethodResult,
    evaluate,
    expand_instances,
    load_instance_by_name,
    parse_methods,
)
from autofab.envs.instances import InstanceError, random_instance


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ft06", ["ft06"]),
        ("ta01-ta03,ft10", ["ta01", "ta02", "ta03", "ft10"]),
        ("ta09-ta11", ["ta09", "ta10", "ta11"]),
        (" FT06 , la01-la02 ", ["ft06", "la01", "la02"]),
        ("ta01-ta02,ta02,ta01-ta03", ["ta01", "ta02", "ta03"]),
        ("ta05-ta05", ["ta05"]),
        ("random:20x20:2,ft06", ["random-20x20-s0", "random-20x20-s1", "ft06"]),
        ("random-30x20-s7,random:30x20:1", ["random-30x20-s7", "random-30x20-s0"]),
    ],
)
def test_expand_instances(text, expected):
    assert expand_instances(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("ft06,,ft10", "empty entry"),
        ("ta10-ta01", "'ta10-ta01' is reversed"),
        ("ta01-la05", "'ta01-la05' mixes families"),
        ("ta01-ta02-ta03", "malformed instance range 'ta01-ta02-ta03'"),
        ("ta-tb", "malformed"),
        ("nope", "unknown benchmark instance 'nope'"),
        ("ta79-ta81", "'ta81' in range 'ta79-ta81'.*ta01..ta80"),
        ("la1-la3", "'la1' in range 'la1-la3'"),
        ("random:20x0:3", "'random:20x0:3' needs jobs, machines and count >= 1"),
    ],
)
def test_expand_instances_errors_name_the_token(text, match):
    with pytest.raises(InstanceError, match=match):
        expand_instances(text)


def test_random_instances_are_seeded_and_compared_by_makespan():
    inst = load_instance_by_name("random-6x4-s3")
    assert inst.name == "random-6x4-s3"
    assert inst.n_jobs == 6
    assert inst.n_machines == 4
    np.testing.assert_array_equal(inst.durations, random_instance(6, 4, 3).durations)
    doc = evaluate(["random-6x4-s3"], ["mwkr"], 1.0)
    entry = doc["instances"]["random-6x4-s3"]
    assert entry["best_known"] is None
    assert entry["methods"]["mwkr"]["gap"] is None
    assert entry["methods"]["mwkr"]["makespan"] > 0


def test_parse_methods():
    assert parse_methods("mwkr, CPSAT,mwkr") == ["mwkr", "cpsat"]
    with pytest.raises(ValueError, match="unknown baseline 'foo'"):
        parse_methods("mwkr,foo")
    with pytest.raises(ValueError, match="empty entry"):
        parse_methods("mwkr,")


def first_valid(obs: np.ndarray, mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def test_evaluate_ft06_writes_the_results_shape():
    seen: list[MethodResult] = []
    doc = evaluate(["ft06"], ["mwkr", "cpsat"], 2, policy=first_valid, on_result=seen.append)
    assert doc["settings"]["time_limit_s"] == 2
    assert doc["settings"]["cpsat_workers"] >= 1
    assert doc["settings"]["cpu_count"] >= 1
    assert doc["settings"]["methods"] == ["policy", "mwkr", "cpsat"]
    entry = doc["instances"]["ft06"]
    assert entry["best_known"] == 55
    assert set(entry["methods"]) == {"policy", "mwkr", "cpsat"}
    for method in ("policy", "mwkr", "cpsat"):
        result = entry["methods"][method]
        assert {"makespan", "gap", "seconds", "decision_ms_p99"} <= set(result)
        assert result["gap"] == pytest.approx(result["makespan"] / 55 - 1)
        assert result["seconds"] >= 0
    assert entry["methods"]["mwkr"]["makespan"] == 61
    assert entry["methods"]["cpsat"]["makespan"] == 55
    assert entry["methods"]["cpsat"]["gap"] == 0
    assert entry["methods"]["cpsat"]["status"] == "OPTIMAL"
    assert entry["methods"]["cpsat"]["decision_ms_p99"] is None
    assert entry["methods"]["policy"]["decision_ms_p99"] > 0
    assert entry["methods"]["mwkr"]["decision_ms_p99"] > 0
    assert doc["mean_gap"]["cpsat"] == 0
    assert [(r.instance, r.method) for r in seen] == [
        ("ft06", "policy"),
        ("ft06", "mwkr"),
        ("ft06", "cpsat"),
    ]
    assert all(len(r.schedule) == 36 for r in seen)


def test_evaluate_with_a_policy_factory_and_mean_over_instances():
    built = []

    def factory(env):
        built.append(env.instance.name)
        return first_valid

    doc = evaluate(["ft06", "la01"], ["spt"], 1, policy_factory=factory)
    assert built == ["ft06", "la01"]
    gaps = [doc["instances"][n]["methods"]["spt"]["gap"] for n in ("ft06", "la01")]
    assert doc["mean_gap"]["spt"] == pytest.approx(sum(gaps) / 2)


def test_evaluate_refuses_bad_arguments():
    with pytest.raises(ValueError, match="time limit"):
        evaluate(["ft06"], ["mwkr"], 0)
    with pytest.raises(ValueError, match="unknown baseline"):
        evaluate(["ft06"], ["best"], 1)
    with pytest.raises(InstanceError):
        evaluate(["nope"], ["mwkr"], 1)
    with pytest.raises(ValueError, match="not both"):
        evaluate(["ft06"], [], 1, policy=first_valid, policy_factory=lambda env: first_valid)
