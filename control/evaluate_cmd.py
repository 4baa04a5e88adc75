"""``autofab evaluate``: a policy against dispatching rules and CP-SAT, on benchmarks.

Registered in :mod:`autofab.control.cli` with ``app.command("evaluate")(evaluate)``. The
work is :func:`autofab.agents.policies.evaluation.evaluate`; this module adds the command
line: the progress bar, the table, and the files in ``--out``:

* ``results.json``: the evaluation document (settings, per-instance makespan, gap,
  seconds, decision latency p99, and the mean gap per method);
* ``gaps.png``: gap to best known per instance, one bar per method;
* ``gantt_<instance>.png``: the best schedule found for each instance.

Exit codes follow ``autofab``'s contract: 2 for bad input (one red line on stderr), 1 when
a method produces an invalid schedule or decision, or CP-SAT finds nothing in time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autofab.agents.policies import evaluation
from autofab.agents.policies.cpsat import CpSatError
from autofab.agents.policies.evaluation import (
    CPSAT,
    MethodResult,
    PolicyFn,
    expand_instances,
    parse_methods,
)
from autofab.control.console import (
    EXIT_INTERNAL,
    console,
    err_console,
    fail,
    gap_text,
    num,
    user_errors,
)
from autofab.envs.instances import load_benchmark
from autofab.envs.jobshop import JobShopEnv
from autofab.envs.model import InvalidActionError
from autofab.envs.validate import ScheduleError

__all__ = ["evaluate", "gap_chart"]

RESULTS_FILE = "results.json"
GAPS_FILE = "gaps.png"


def evaluate(
    instances: Annotated[
        str,
        typer.Option(
            "--instances",
            "-i",
            help="Benchmark names and ranges within one family, e.g. ta01-ta10,ft10.",
            show_default=False,
        ),
    ],
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            "-p",
            metavar="RUN",
            help="A training run folder (runs/<run>) whose policy to evaluate.",
            show_default=False,
        ),
    ] = None,
    baselines: Annotated[
        str,
        typer.Option(
            "--baselines",
            "-b",
            help="Comma list of dispatching rules and/or cpsat (OR-Tools CP-SAT).",
        ),
    ] = "spt,mwkr,mopnr",
    time_limit: Annotated[
        float,
        typer.Option("--time-limit", metavar="SECONDS", help="CP-SAT time limit per instance."),
    ] = 10.0,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="DIR", help="Folder for results.json, gaps.png, gantt_*.png."
        ),
    ] = Path("results"),
) -> None:
    """Compare a policy with baselines on benchmarks: makespan and gap to best known.

    Prints a table (one column per method, a MEAN row of gaps) and writes results.json,
    gaps.png and a Gantt chart of the best schedule per instance into --out. CP-SAT runs
    with --time-limit seconds on every CPU this process may use; both are recorded.

    Example: [bold]autofab evaluate --policy runs/ta01 --instances ta01-ta10,ft10
    --baselines spt,mwkr,mopnr,cpsat --time-limit 10 --out results/[/bold]
    """
    with user_errors():
        names = expand_instances(instances)
        methods = parse_methods(baselines)
        if not time_limit > 0:
            raise ValueError(f"--time-limit must be a number of seconds > 0, got {time_limit:g}")
        policies = _load_policies(policy, names) if policy is not None else None

    n_methods = len(methods) + (policies is not None)
    best: dict[str, MethodResult] = {}
    with Progress(
        TextColumn("evaluating {task.fields[current]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("evaluate", total=len(names) * n_methods, current="")

        def on_result(result: MethodResult) -> None:
            progress.update(task, advance=1, current=f"{result.instance} {result.method}")
            kept = best.get(result.instance)
            if kept is None or result.makespan < kept.makespan:
                best[result.instance] = result

        try:
            doc = evaluation.evaluate(
                names,
                methods,
                time_limit,
                policy_factory=None if policies is None else _factory(policies),
                on_result=on_result,
            )
        except (ScheduleError, InvalidActionError) as exc:
            fail(
                f"a method produced an invalid schedule or decision; this is a bug, please "
                f"report it. {exc}",
                code=EXIT_INTERNAL,
            )
        except CpSatError as exc:
            fail(str(exc), code=EXIT_INTERNAL)

    console.print(_table(doc))
    settings = doc["settings"]
    if CPSAT in methods:
        console.print(
            f"[dim]cpsat: time limit {settings['time_limit_s']:g} s, "
            f"{settings['cpsat_workers']} workers on {settings['cpu_count']} CPUs[/dim]"
        )
    with user_errors(f"cannot write to --out folder {str(out)!r}"):
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        gap_chart(doc, out / GAPS_FILE)
        from autofab.control.plots import gantt_chart

        for name, result in best.items():
            gantt_chart(
                load_benchmark(name),
                result.schedule,
                out / f"gantt_{name}.png",
                title=f"best: {result.method}",
            )
    console.print(
        f"wrote {escape(RESULTS_FILE)}, {escape(GAPS_FILE)} and {len(best)} Gantt chart(s) "
        f"to {escape(str(out))}"
    )


def _load_policies(run: Path, names: list[str]) -> dict[str, PolicyFn]:
    """The run's policy for each instance, checked against each instance's spaces now.

    Loading up front turns a policy that does not fit an instance (another size) into an
    input error before minutes of CP-SAT, not after. Instances with the same spaces share
    one loaded model.
    """
    try:
        from autofab.agents.policies.artifacts import load_policy
    except ImportError as exc:
        raise ValueError(
            f"--policy needs autofab.agents.policies.artifacts, which cannot be imported "
            f"({exc}); evaluate baselines only, without --policy"
        ) from None
    by_shape: dict[tuple[tuple[int, ...], int], PolicyFn] = {}
    out: dict[str, PolicyFn] = {}
    for name in names:
        env = JobShopEnv(load_benchmark(name))
        key = (env.observation_space.shape, int(env.action_space.n))
        if key not in by_shape:
            try:
                by_shape[key] = load_policy(run, env)
            except ValueError as exc:
                raise ValueError(f"--policy {str(run)!r} on {name}: {exc}") from None
        out[name] = by_shape[key]
    return out


def _factory(policies: Mapping[str, PolicyFn]) -> Callable[[JobShopEnv], PolicyFn]:
    """Hand each instance's environment the policy loaded for it."""

    def factory(env: JobShopEnv) -> PolicyFn:
        return policies[env.instance.name]

    return factory


def _table(doc: Mapping[str, Any]) -> Table:
    """Instance rows, one makespan (gap) column per method; the best per row in green."""

    def cell(result: Mapping[str, Any], low: float) -> str:
        text = f"{num(result['makespan'])} ({gap_text(result['gap'])})"
        return f"[bold green]{text}[/bold green]" if result["makespan"] <= low else text

    methods: list[str] = doc["settings"]["methods"]
    table = Table(title="Makespan (gap to best known)")
    table.add_column("Instance")
    table.add_column("Best known", justify="right")
    for method in methods:
        table.add_column(method, justify="right")
    for name, entry in doc["instances"].items():
        results = entry["methods"]
        low = min(results[m]["makespan"] for m in methods)
        cells = [cell(results[m], low) for m in methods]
        best_known = "n/a" if entry["best_known"] is None else num(entry["best_known"])
        table.add_row(escape(name), best_known, *cells)
    table.add_section()
    table.add_row("MEAN", "", *(gap_text(doc["mean_gap"][m]) for m in methods), style="bold")
    return table


def gap_chart(doc: Mapping[str, Any], path: str | Path) -> Path:
    """Draw the gaps of ``doc`` (an evaluation document) as grouped bars; save to ``path``.

    One group per instance, one bar per method, in percent. Methods without a gap on an
    instance (no best known) leave their slot empty. Drawn headless, like
    :mod:`autofab.control.plots`.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    methods: list[str] = doc["settings"]["methods"]
    names = list(doc["instances"])
    x = np.arange(len(names))
    width = 0.8 / max(len(methods), 1)
    fig = Figure(figsize=(max(6.0, 0.6 * len(names) * max(len(methods), 2) / 2 + 2), 4))
    fig.set_layout_engine("constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["tab10"]
    for i, method in enumerate(methods):
        gaps = [doc["instances"][n]["methods"][method]["gap"] for n in names]
        heights = [np.nan if g is None else 100 * g for g in gaps]
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width, heights, width, label=method, color=cmap(i)
        )
    ax.set_xticks(x, labels=names, rotation=45 if len(names) > 8 else 0)
    ax.set_ylabel("gap to best known (%)")
    ax.set_title("Gap to best-known makespan")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", linestyle=":", linewidth=0.5)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120)
    return path
