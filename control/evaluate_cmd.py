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

Instances can run side by side as Ray tasks (:func:`evaluate_instance` is one task, through
:func:`autofab.control.ray_tasks.map_tasks`): always with ``--ray-address`` or ``--ray``,
and by default when CP-SAT is among the methods, there are several instances and several
CPUs. Only CP-SAT is slow enough to gain: rules and policies finish in well under the few
seconds a local Ray takes to start. Each task's CP-SAT then uses the task's CPUs
(``--cpus-per-task``) as workers, and ``settings`` in results.json says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autofab.agents.policies import evaluation
from autofab.agents.policies.artifacts import load_policy, resolve_policy_path
from autofab.agents.policies.cpsat import CpSatError
from autofab.agents.policies.evaluation import (
    CPSAT,
    MethodResult,
    PolicyFn,
    expand_instances,
    mean_gaps,
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
from autofab.control.ray_tasks import RAY_REQUIREMENT, available_cpus, map_tasks, ray_available
from autofab.envs.jobshop import JobShopEnv
from autofab.envs.model import InvalidActionError
from autofab.envs.validate import ScheduleError

__all__ = ["InstanceJob", "evaluate", "evaluate_instance", "gap_chart", "merge_documents"]

RESULTS_FILE = "results.json"
GAPS_FILE = "gaps.png"


def evaluate(
    instances: Annotated[
        str,
        typer.Option(
            "--instances",
            "-i",
            help="Benchmark names and ranges within one family, e.g. ta01-ta10,ft10; "
            "random:20x20:5 adds five seeded random 20x20 instances (random-20x20-s0..s4).",
            show_default=False,
        ),
    ],
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            "-p",
            metavar="RUN",
            help="The policy to evaluate: a training run folder (runs/<run>), a dispatcher "
            ".npz, or 'default' for the dispatcher shipped with autofab.",
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
    improve: Annotated[
        float | None,
        typer.Option(
            "--improve",
            metavar="SECONDS",
            help="Also run the improvement mode: the best policy or rule schedule seeds "
            "CP-SAT (as a complete hint) for this many seconds.",
            show_default=False,
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples",
            metavar="K",
            help="Also report 'sampled': the best of K schedules built with the policy (a "
            "dispatcher .npz or self-labeling run), greedy one included; its schedule also "
            "seeds --improve.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="DIR", help="Folder for results.json, gaps.png, gantt_*.png."
        ),
    ] = Path("results"),
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDR",
            help="Evaluate the instances as tasks on this running Ray cluster (HOST:PORT, "
            "ray://HOST:PORT or auto); its nodes need autofab installed.",
            show_default=False,
        ),
    ] = None,
    use_ray: Annotated[
        bool | None,
        typer.Option(
            "--ray/--no-ray",
            help="Evaluate instances in parallel as Ray tasks, or one after another in this "
            "process. Default: in parallel when cpsat runs on several instances and CPUs.",
            show_default=False,
        ),
    ] = None,
    cpus_per_task: Annotated[
        int | None,
        typer.Option(
            "--cpus-per-task",
            metavar="N",
            help="CPUs (CP-SAT workers) per instance task when in parallel. Default: this "
            "machine's CPUs shared out among the instances.",
            show_default=False,
        ),
    ] = None,
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
        if improve is not None:
            if not improve > 0:
                raise ValueError(f"--improve must be a number of seconds > 0, got {improve:g}")
            if evaluation.IMPROVE not in methods:
                methods.append(evaluation.IMPROVE)
        if not time_limit > 0:
            raise ValueError(f"--time-limit must be a number of seconds > 0, got {time_limit:g}")
        if ray_address is not None and use_ray is False:
            raise ValueError("--ray-address and --no-ray contradict each other; drop one")
        if ray_address is not None and not ray_available():
            raise ValueError(f"--ray-address needs ray: pip install '{RAY_REQUIREMENT}'")
        if cpus_per_task is not None and cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task must be at least 1, got {cpus_per_task}")
        policies = _load_policies(policy, names) if policy is not None else None
        if samples is not None:
            _check_samples(samples, policies)

    parallel = _parallel(use_ray, ray_address, names, methods)
    if parallel and not ray_available():
        parallel = False
        err_console.print(
            f"ray is not installed (pip install '{RAY_REQUIREMENT}'): evaluating the "
            "instances one after another",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    workers = cpus_per_task or max(1, available_cpus() // min(len(names), available_cpus()))

    n_methods = len(methods) + (policies is not None) + (samples is not None)
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
            if parallel:
                doc = _evaluate_with_ray(
                    names,
                    methods,
                    time_limit,
                    improve,
                    policy,
                    workers,
                    ray_address,
                    on_result,
                    samples,
                )
            else:
                doc = evaluation.evaluate(
                    names,
                    methods,
                    time_limit,
                    improve_s=improve,
                    policy_factory=None if policies is None else _factory(policies),
                    on_result=on_result,
                    samples=samples,
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
    delays = evaluation.policy_delays(doc)
    if delays:
        console.print(
            f"[dim]policy: trained on delay schedules, run with JobShop-v0 delay="
            f"{', '.join(f'{d:g}' for d in delays)} (rules run non-delay)[/dim]"
        )
    if CPSAT in methods:
        ray_run = settings.get("ray")
        where = (
            f"per instance, {ray_run['tasks']} instance tasks on Ray ({ray_run['address']})"
            if ray_run
            else f"on {settings['cpu_count']} CPUs"
        )
        console.print(
            f"[dim]cpsat: time limit {settings['time_limit_s']:g} s, "
            f"{settings['cpsat_workers']} workers {escape(where)}[/dim]"
        )
    with user_errors(f"cannot write to --out folder {str(out)!r}"):
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULTS_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        gap_chart(doc, out / GAPS_FILE)
        from autofab.control.plots import gantt_chart

        for name, result in best.items():
            gantt_chart(
                evaluation.load_instance_by_name(name),
                result.schedule,
                out / f"gantt_{name}.png",
                title=f"best: {result.method}",
            )
    console.print(
        f"wrote {escape(RESULTS_FILE)}, {escape(GAPS_FILE)} and {len(best)} Gantt chart(s) "
        f"to {escape(str(out))}"
    )


@dataclass(frozen=True)
class InstanceJob:
    """One instance's evaluation as plain values, so a Ray task can receive it.

    The policy travels as its run folder, not as a loaded model: each task loads it (a
    torch model does not pickle cheaply, and the task may run on another machine).
    """

    name: str
    methods: tuple[str, ...]
    time_limit_s: float
    workers: int
    policy_run: str | None = None
    improve_s: float | None = None
    samples: int | None = None


def evaluate_instance(job: InstanceJob) -> tuple[dict[str, Any], list[MethodResult]]:
    """Evaluate every method on one instance: its one-instance document and the results.

    Top-level so a Ray worker imports it by name. CP-SAT runs with ``job.workers``
    workers, the CPUs Ray reserved for the task, and torch is held to as many threads.
    """
    factory: Callable[[JobShopEnv], PolicyFn] | None = None
    if job.policy_run is not None:
        try:
            import torch
        except ImportError:  # a numpy dispatcher needs no torch
            pass
        else:
            torch.set_num_threads(job.workers)
        run = Path(job.policy_run)

        def factory(env: JobShopEnv) -> PolicyFn:
            return load_policy(run, env)

    results: list[MethodResult] = []
    doc = evaluation.evaluate(
        [job.name],
        list(job.methods),
        job.time_limit_s,
        improve_s=job.improve_s,
        policy_factory=factory,
        workers=job.workers,
        on_result=results.append,
        samples=job.samples,
    )
    return doc, results


def merge_documents(
    parts: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """One results document from one-instance documents, in the order given.

    ``settings`` replaces theirs (each task saw only its own CPUs); the mean gaps are
    computed again over all instances.
    """
    doc: dict[str, Any] = {"settings": dict(settings), "instances": {}}
    for part in parts:
        doc["instances"].update(part["instances"])
    doc["mean_gap"] = mean_gaps(doc)
    return doc


def _parallel(
    use_ray: bool | None, ray_address: str | None, names: list[str], methods: list[str]
) -> bool:
    """Whether to spread the instances over Ray tasks (see the module docstring for why
    the default asks for CP-SAT: nothing else is slow enough to repay Ray's start)."""
    if use_ray is False:
        return False
    if ray_address is not None:
        return True
    if len(names) < 2:
        return False
    if use_ray:
        return True
    return CPSAT in methods and available_cpus() > 1 and ray_available()


def _evaluate_with_ray(
    names: list[str],
    methods: list[str],
    time_limit: float,
    improve_s: float | None,
    policy: Path | None,
    workers: int,
    ray_address: str | None,
    on_result: Callable[[MethodResult], None],
    samples: int | None = None,
) -> dict[str, Any]:
    """Every instance as its own Ray task with ``workers`` CPUs; the merged document.

    The progress bar moves as each instance finishes (its methods all at once). The
    settings record the per-task workers and the Ray run, so results.json states how
    CP-SAT actually ran.
    """
    run = None if policy is None else str(resolve_policy_path(policy).resolve())
    jobs = [
        InstanceJob(n, tuple(methods), time_limit, workers, run, improve_s, samples) for n in names
    ]

    def done(index: int, value: tuple[dict[str, Any], list[MethodResult]]) -> None:
        for result in value[1]:
            on_result(result)

    with user_errors():
        try:
            outcomes = map_tasks(
                evaluate_instance,
                jobs,
                ray_address=ray_address,
                num_cpus_per_task=workers,
                progress=done,
            )
        except ImportError as exc:
            raise ValueError(str(exc)) from None
    settings = dict(outcomes[0][0]["settings"])
    settings["cpsat_workers"] = workers
    settings["cpu_count"] = available_cpus()
    settings["ray"] = {
        "address": "local" if ray_address is None else ray_address,
        "tasks": len(jobs),
        "cpus_per_task": workers,
    }
    return merge_documents([doc for doc, _ in outcomes], settings)


def _check_samples(samples: int, policies: Mapping[str, PolicyFn] | None) -> None:
    """``--samples`` needs a dispatcher (its scores) and classic instances."""
    from autofab.agents.policies.dispatcher import DispatcherPolicy

    if samples < 1:
        raise ValueError(f"--samples must be at least 1, got {samples}")
    if policies is None:
        raise ValueError("--samples samples schedules from a policy; give --policy too")
    for name, loaded in policies.items():
        if not isinstance(loaded, DispatcherPolicy):
            raise ValueError(
                f"--samples needs a self-labeling dispatcher (--policy default, a .npz or a "
                f"self_labeling run); {name}'s policy is a {type(loaded).__name__}"
            )


def _load_policies(run: Path, names: list[str]) -> dict[str, PolicyFn]:
    """The run's policy for each instance, checked against each instance's spaces now.

    Loading up front turns a policy that does not fit an instance (another size) into an
    input error before minutes of CP-SAT, not after. Instances with the same spaces share
    one loaded model.
    """
    by_shape: dict[tuple[tuple[int, ...], int], PolicyFn] = {}
    out: dict[str, PolicyFn] = {}
    for name in names:
        env = JobShopEnv(evaluation.load_instance_by_name(name))
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
