"""Gantt charts of schedules."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import pytest

from autofab.control.plots import gantt_chart, job_colors
from autofab.envs.instances import load_instance, random_instance
from autofab.envs.rules import RulePolicy, run_episode


def schedule_of(instance):
    env = gym.make("autofab/JobShop-v0", instance=instance)
    return run_episode(env, RulePolicy("spt"), seed=0)["schedule"]


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_gantt_chart_writes_the_format_of_the_suffix(tmp_path: Path, suffix: str):
    inst = load_instance("ft06")
    path = gantt_chart(inst, schedule_of(inst), tmp_path / f"g.{suffix}", title="spt")
    assert path == tmp_path / f"g.{suffix}"
    head = path.read_bytes()[:200]
    if suffix == "png":
        assert head.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert head.startswith(b"<?xml")


def test_gantt_chart_many_jobs(tmp_path: Path):
    inst = random_instance(30, 5, 1)
    path = gantt_chart(inst, schedule_of(inst), str(tmp_path / "big.png"))
    assert path.stat().st_size > 1000


def test_job_colors_are_stable_and_distinct():
    assert job_colors(6) == job_colors(6)
    assert job_colors(6) == job_colors(12)[:6]
    for n in (6, 20, 50):
        assert len(set(job_colors(n))) == n


def test_gantt_chart_rejects_bad_schedules(tmp_path: Path):
    inst = load_instance("ft06")
    with pytest.raises(ValueError, match="empty"):
        gantt_chart(inst, [], tmp_path / "x.png")
    bad = [{"job": 0, "index": 0, "machine": 9, "start": 0, "end": 1}]
    with pytest.raises(ValueError, match="machine 9"):
        gantt_chart(inst, bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
