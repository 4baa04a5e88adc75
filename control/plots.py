"""Charts of schedules, drawn headless.

Figures are built on matplotlib's object API with an Agg canvas attached directly, never
through ``pyplot``: no GUI backend is chosen, no global figure registry grows, and the
code runs the same on a laptop, in CI and inside a Ray worker. Import this module only
where a chart is wanted; matplotlib takes about half a second to import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from autofab.envs.instances import Instance

__all__ = ["gantt_chart", "job_colors"]

#: Up to this many jobs get the qualitative ``tab20`` palette; beyond it, ``turbo``.
_QUALITATIVE_LIMIT = 20
#: Jobs in the legend and labels written inside bars stop past these sizes (unreadable).
_LEGEND_LIMIT = 20
_BAR_LABEL_LIMIT = 200


def job_colors(n_jobs: int) -> list[tuple[float, float, float, float]]:
    """One RGBA colour per job, fixed by the job index and the job count alone.

    The same job gets the same colour in every chart of an instance, whichever rule made
    the schedule, so charts can be compared side by side.
    """
    if n_jobs <= _QUALITATIVE_LIMIT:
        # tab20 comes in dark/light pairs of one hue: the first ten jobs take the dark
        # shades, the next ten the light ones, so neighbouring jobs differ in hue.
        cmap = colormaps["tab20"]
        return [tuple(cmap(2 * j if j < 10 else 2 * (j - 10) + 1)) for j in range(n_jobs)]
    cmap = colormaps["turbo"]
    return [tuple(cmap(x)) for x in np.linspace(0.05, 0.95, n_jobs)]


def gantt_chart(
    instance: Instance,
    schedule: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Draw ``schedule`` as a Gantt chart, one row per machine, and save it to ``path``.

    Bars are coloured per job (see :func:`job_colors`); a dashed line marks the makespan.
    The file format follows the suffix of ``path`` (``.png``, ``.svg``, ``.pdf`` ...).
    The schedule is drawn as given: validate it first
    (:func:`autofab.envs.validate.validate_schedule`) if it comes from an untrusted source.

    Args:
        instance: The instance the schedule is for; its machine names label the rows.
        schedule: Entries with keys ``job``, ``machine``, ``start``, ``end`` (and
            ``index``), as in ``info["schedule"]`` of ``autofab/JobShop-v0``.
        path: Where to write the image.
        title: Extra text put before the default title ("<instance>: makespan <value>").

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: The schedule is empty, names a job or machine outside the instance, or
            matplotlib does not know the file format.
        OSError: The file cannot be written.
    """
    path = Path(path)
    if not schedule:
        raise ValueError(f"cannot draw a Gantt chart of {instance.name!r}: the schedule is empty")
    job = np.array([int(e["job"]) for e in schedule])
    machine = np.array([int(e["machine"]) for e in schedule])
    start = np.array([float(e["start"]) for e in schedule])
    end = np.array([float(e["end"]) for e in schedule])
    for what, values, count in (
        ("job", job, instance.n_jobs),
        ("machine", machine, instance.n_machines),
    ):
        bad = values[(values < 0) | (values >= count)]
        if len(bad):
            raise ValueError(
                f"schedule names {what} {int(bad[0])}, but {instance.name!r} has "
                f"{what}s 0..{count - 1}"
            )
    makespan = float(end.max())
    colors = job_colors(instance.n_jobs)

    n_machines = instance.n_machines
    fig = Figure(figsize=(12, max(3.0, 0.45 * n_machines + 1.6)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(
        machine,
        end - start,
        left=start,
        height=0.8,
        color=[colors[j] for j in job],
        edgecolor="black",
        linewidth=0.4,
    )
    if len(schedule) <= _BAR_LABEL_LIMIT:
        min_width = 0.025 * makespan
        for j, m, s, e in zip(job, machine, start, end, strict=True):
            if e - s >= min_width:
                ax.text((s + e) / 2, m, str(j), ha="center", va="center", fontsize=7, color="black")
    ax.axvline(makespan, color="crimson", linestyle="--", linewidth=1.2)
    ax.annotate(
        f"makespan {makespan:.8g}",
        xy=(makespan, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(0, 2),
        textcoords="offset points",
        ha="right",
        va="bottom",
        color="crimson",
        fontsize=8,
    )
    ax.set_yticks(range(n_machines), labels=list(instance.machine_names))
    ax.set_ylim(n_machines - 0.5, -0.5)
    ax.set_xlim(0, makespan * 1.02)
    ax.set_xlabel("time")
    ax.set_ylabel("machine")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    heading = f"{instance.name}: makespan {makespan:.8g}"
    ax.set_title(f"{title} \N{EM DASH} {heading}" if title else heading)
    if instance.n_jobs <= _LEGEND_LIMIT:
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color=colors[j], label=f"job {j}") for j in range(instance.n_jobs)],
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
        )
    fig.savefig(path, dpi=120)
    return path
