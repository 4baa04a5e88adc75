"""The ``autofab`` command line.

``autofab schedule`` solves a job-shop instance with the dispatching-rule baselines,
``autofab simulate`` runs a shift of a plant config under a baseline policy, ``autofab
instances`` lists the classic benchmarks, ``autofab version`` names the release.

Exit codes: 0 on success; 2 for bad input (an unknown instance, config, rule or policy, a
malformed spec or duration, an output file that cannot be written), reported as one red
line on stderr, never a traceback; 1 when autofab itself fails a check (a rule produced an
invalid schedule, a policy an invalid decision: a bug to report).
matplotlib is imported only when a chart is asked for, so ``autofab --help`` stays quick.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import gymnasium as gym
import typer
import yaml
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import autofab.envs  # noqa: F401  (registers autofab/JobShop-v0 with Gymnasium)
from autofab.control.console import (
    EXIT_INTERNAL,
    console,
    err_console,
    fail,
    gap_text,
    num,
    user_errors,
)
from autofab.envs.baselines import FactoryPolicy, policy_from_spec, spec_help
from autofab.envs.factory_model import Decision, FactoryModel, run_shift
from autofab.envs.instances import (
    Instance,
    InstanceError,
    benchmark_names,
    load_benchmark,
    load_instance,
    random_instance,
)
from autofab.envs.model import InvalidActionError
from autofab.envs.plant import format_duration, load_plant, parse_duration
from autofab.envs.rules import RULE_DESCRIPTIONS, RULES, RulePolicy, run_episode
from autofab.envs.validate import ScheduleError, validate_schedule

__all__ = ["RuleResult", "app", "parse_rules", "resolve_instance", "run_rule", "simulate_shift"]

ENV_ID = "autofab/JobShop-v0"

_RANDOM_SPEC = re.compile(r"random:(\d+)x(\d+)(?::(\d+))?", re.IGNORECASE)


app = typer.Typer(
    name="autofab",
    help=(
        "autofab: multi-agent autonomous control for factories.\n\n"
        "autofab models a plant as a flexible job shop (the digital-twin core behind its "
        "Gymnasium environments) and schedules it with dispatching rules or learned "
        "policies; agents that negotiate the work and drive the plant through a safety "
        "supervisor build on the same model.\n\n"
        "Start with [bold]autofab instances ft[/bold] and "
        "[bold]autofab schedule ft06 --rule all[/bold]."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


# --------------------------------------------------------------------------- helpers


def package_version() -> str:
    """The installed autofab version, from the package metadata (one source of truth)."""
    try:
        return metadata.version("autofab")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _best_known_text(instance: Instance) -> str:
    """Where a gap comes from: the reference value and how much it can be trusted."""
    if instance.best_known is None:
        return f"no best-known makespan for {instance.name!r}"
    kind = "optimal" if instance.optimal else "upper bound, not proven optimal"
    return f"best known {num(instance.best_known)}, {kind}"


def resolve_instance(spec: str, seed: int = 0) -> Instance:
    """The instance named by a CLI argument.

    ``spec`` is a benchmark name (``ta01``), a JSON file path, or ``random:JxM[:SEED]``
    for a Taillard-style random instance; without ``:SEED`` the random instance uses
    ``seed``. Raises :class:`InstanceError` naming the spec when it is malformed.
    """
    if spec.lower().startswith("random:"):
        match = _RANDOM_SPEC.fullmatch(spec)
        if match is None:
            raise InstanceError(
                f"malformed random instance spec {spec!r}: expected random:JOBSxMACHINES[:SEED], "
                "e.g. random:15x15:3"
            )
        jobs, machines = int(match[1]), int(match[2])
        return random_instance(jobs, machines, seed if match[3] is None else int(match[3]))
    return load_instance(spec)


def parse_rules(text: str) -> list[RulePolicy]:
    """Policies for ``--rule``: one name, a comma list (``spt,mwkr``), or ``all``.

    Duplicates are dropped, order is kept. Raises ``ValueError`` naming an unknown rule.
    """
    if text.strip().lower() == "all":
        return [RulePolicy(name) for name in RULES]
    names = [part.strip().lower() for part in text.split(",")]
    if not all(names):
        raise ValueError(
            f"--rule {text!r} has an empty entry; give rule names separated by commas "
            f"({', '.join(RULES)}) or 'all'"
        )
    return [RulePolicy(name) for name in dict.fromkeys(names)]


@dataclass(frozen=True)
class RuleResult:
    """One rule's run on one instance: what the table, the JSON and the chart show."""

    rule: str
    makespan: float
    tardiness: float
    gap: float | None
    seconds: float
    schedule: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        """The result without its schedule, for the JSON file's per-rule list."""
        return {
            "rule": self.rule,
            "makespan": self.makespan,
            "gap": self.gap,
            "tardiness": self.tardiness,
            "seconds": self.seconds,
        }


def run_rule(instance: Instance, policy: RulePolicy, seed: int) -> RuleResult:
    """Run ``policy`` for one episode of ``autofab/JobShop-v0`` and check the schedule.

    The rule acts on the same environment a learned policy would, so the numbers compare
    directly. Raises :class:`ScheduleError` if the schedule breaks a hard invariant.
    """
    env = gym.make(ENV_ID, instance=instance)
    try:
        started = time.perf_counter()
        info = run_episode(env, policy, seed=seed)
        seconds = time.perf_counter() - started
    finally:
        env.close()
    validate_schedule(instance, info["schedule"])
    return RuleResult(
        rule=policy.name,
        makespan=float(info["makespan"]),
        tardiness=float(info["tardiness"]),
        gap=info.get("gap"),
        seconds=seconds,
        schedule=info["schedule"],
    )


def _print_results(instance: Instance, results: list[RuleResult], best: RuleResult) -> None:
    size = (
        f"{instance.n_jobs} jobs x {instance.n_machines} machines, {instance.n_ops} operations"
        + (", flexible" if instance.is_flexible else "")
    )
    console.print(f"[bold]{escape(instance.name)}[/bold]: {size}")
    if len(results) > 1:
        table = Table(title=f"Dispatching rules on {escape(instance.name)}")
        table.add_column("Rule")
        table.add_column("Makespan", justify="right")
        table.add_column("Gap", justify="right")
        table.add_column("Tardiness", justify="right")
        table.add_column("Seconds", justify="right")
        for r in results:
            table.add_row(
                r.rule,
                num(r.makespan),
                gap_text(r.gap),
                num(round(r.tardiness, 6)),
                f"{r.seconds:.3f}",
                style="bold green" if r is best else None,
            )
        console.print(table)
        console.print(f"best rule: [bold]{best.rule}[/bold]")
    else:
        console.print(f"rule: [bold]{best.rule}[/bold] ({RULE_DESCRIPTIONS[best.rule]})")
    console.print(f"makespan: [bold]{num(best.makespan)}[/bold]")
    console.print(f"gap to best known: {gap_text(best.gap)} ({escape(_best_known_text(instance))})")
    console.print(
        f"[dim]schedule valid: {len(best.schedule)} operations checked for precedence, "
        "overlap and eligibility[/dim]"
    )


def _write_json(
    path: Path, instance: Instance, seed: int, best: RuleResult, results: list[RuleResult]
) -> None:
    payload = {
        "instance": instance.name,
        "jobs": instance.n_jobs,
        "machines": instance.n_machines,
        "rule": best.rule,
        "seed": seed,
        "makespan": best.makespan,
        "best_known": instance.best_known,
        "optimal": instance.optimal,
        "gap": best.gap,
        "tardiness": best.tardiness,
        "results": [r.summary() for r in results],
        "schedule": best.schedule,
    }
    with user_errors(f"cannot write --json file {str(path)!r}"):
        path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    console.print(f"wrote result to {escape(str(path))}")


def _write_gantt(path: Path, instance: Instance, best: RuleResult) -> None:
    from autofab.control.plots import gantt_chart  # matplotlib only when asked for

    with user_errors(f"cannot write --gantt file {str(path)!r}"):
        gantt_chart(instance, best.schedule, path, title=f"rule {best.rule}")
    console.print(f"wrote Gantt chart to {escape(str(path))}")


# --------------------------------------------------------------------------- commands


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"autofab {package_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the autofab version and exit.",
        ),
    ] = False,
) -> None:
    # The group callback exists to hold --version; the help text is the Typer app's.
    pass


@app.command()
def schedule(
    instance: Annotated[
        str,
        typer.Argument(
            help="A benchmark name (ft06, ta01 ...), a JSON instance file, or "
            "random:JOBSxMACHINES[:SEED] (e.g. random:15x15:3).",
            show_default=False,
        ),
    ],
    rule: Annotated[
        str,
        typer.Option(
            "--rule",
            "-r",
            help=f"Dispatching rule ({', '.join(RULES)}), a comma list, or 'all'.",
        ),
    ] = "mwkr",
    gantt: Annotated[
        Path | None,
        typer.Option(
            "--gantt", metavar="PNG", help="Write a Gantt chart of the best schedule here."
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json",
            metavar="JSON",
            help="Write the result here: instance, rule, makespan, best_known, gap (a "
            "fraction), tardiness, per-rule results and the schedule.",
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed for the episode, and for random:JxM specs without a seed."
        ),
    ] = 0,
) -> None:
    """Schedule an instance with dispatching rules; report makespan and gap to best known.

    Several rules (--rule spt,mwkr or --rule all) give a table; outputs take the best one.

    Every schedule is checked against the hard invariants before it is reported.

    Example: [bold]autofab schedule ta01 --rule all --gantt ta01.png[/bold]
    """
    with user_errors():
        inst = resolve_instance(instance, seed)
        policies = parse_rules(rule)
    results: list[RuleResult] = []
    for policy in policies:
        try:
            results.append(run_rule(inst, policy, seed))
        except ScheduleError as exc:
            fail(
                f"rule {policy.name} produced an invalid schedule on {inst.name!r}; this is "
                f"a bug in autofab, please report it. {exc}",
                code=EXIT_INTERNAL,
            )
    best = min(results, key=lambda r: r.makespan)
    _print_results(inst, results, best)
    if json_path is not None:
        _write_json(json_path, inst, seed, best, results)
    if gantt is not None:
        _write_gantt(gantt, inst, best)


def simulate_shift(model: FactoryModel, policy: FactoryPolicy) -> dict[str, Any]:
    """Run ``model`` to the end of its shift under ``policy``; returns its KPIs.

    The policy is wrapped to move a progress bar in plant time (on a terminal only; it
    disappears when done). The wrapper only watches, so the result is exactly
    ``run_shift(model, policy)``'s.
    """
    horizon = format_duration(model.horizon)
    with Progress(
        TextColumn("simulating"),
        BarColumn(),
        TextColumn("{task.fields[clock]} of " + horizon),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("shift", total=model.horizon, clock="0s")

        def watched(m: FactoryModel, machine: int) -> Decision:
            progress.update(task, completed=m.now, clock=f"{m.now / 3600:.1f}h")
            return policy(m, machine)

        return run_shift(model, watched)


_POLICY_HELP = spec_help()[0].upper() + spec_help()[1:] + "."


def _run_folder(out: Path | None, plant: str, policy: str, seed: int) -> Path:
    """``--out``, or ``runs/{plant}__{policy}__{seed}__{unix time}`` (CleanRL's run naming)."""
    if out is not None:
        return out
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", policy)
    return Path("runs") / f"{plant}__{slug}__{seed}__{int(time.time())}"


@app.command()
def simulate(
    config: Annotated[
        str,
        typer.Argument(
            help="A plant YAML file, or a shipped plant name such as 'demo'.",
            show_default=False,
        ),
    ],
    policy: Annotated[
        str,
        typer.Option("--policy", "-p", help=_POLICY_HELP),
    ] = "rule:mwkr",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the shift: orders, conditions, failures.")
    ] = 0,
    horizon: Annotated[
        str | None,
        typer.Option(
            "--horizon",
            metavar="DURATION",
            help="Simulated time, like 8h, 90m or 2d (default: the config's horizon).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Folder for report.json, shift.png and config.yml "
            "(default: runs/PLANT__POLICY__SEED__TIME).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Simulate a shift of a plant under a baseline policy; report its KPIs.

    Prints the KPI table and writes into the run folder: report.json (KPIs, per-machine
    figures, every operation, events, the power curve), shift.png (a Gantt chart above
    the power curve against the cap) and config.yml (the plant as validated).

    Example: [bold]autofab simulate demo --policy rule:mwkr+cbm+tariff --seed 1[/bold]
    """
    with user_errors():
        plant = load_plant(config)
        horizon_s = None if horizon is None else _parse_horizon(horizon)
        chosen = policy_from_spec(policy)
        spec = chosen.spec
        model = FactoryModel.from_config(plant, seed=seed, horizon_s=horizon_s)
    try:
        kpis = simulate_shift(model, chosen)
    except InvalidActionError as exc:
        fail(
            f"policy {spec} made an invalid decision; this is a bug in autofab, please "
            f"report it. {exc}",
            code=EXIT_INTERNAL,
        )
    from autofab.control.report import kpi_rows, shift_chart, shift_report, write_json

    table = Table(
        title=f"{escape(plant.name)}: {escape(spec)}, seed {seed}, {format_duration(model.horizon)}"
    )
    table.add_column("KPI")
    table.add_column("Value", justify="right")
    table.add_column("Unit")
    for name, value, unit in kpi_rows(kpis, plant.energy.currency):
        table.add_row(escape(name), value, escape(unit))
    console.print(table)

    folder = _run_folder(out, plant.name, spec, seed)
    with user_errors(f"cannot write to --out folder {str(folder)!r}"):
        folder.mkdir(parents=True, exist_ok=True)
        report = write_json(
            shift_report(model, kpis, policy=spec, seed=seed), folder / "report.json"
        )
        (folder / "config.yml").write_text(
            yaml.safe_dump(plant.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
        )
        chart = shift_chart(model, folder / "shift.png", title=f"{plant.name}: {spec}, seed {seed}")
    console.print(f"wrote report to {escape(str(report))}")
    console.print(f"wrote chart to {escape(str(chart))}")


def _parse_horizon(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"--horizon: {exc}") from None


@app.command()
def instances(
    prefix: Annotated[
        str | None,
        typer.Argument(
            help="Only names starting with this, e.g. 'ta' or 'ft'.", show_default=False
        ),
    ] = None,
) -> None:
    """List the classic benchmark instances with their size and best-known makespan.

    The best known value is the proven optimum where one exists, else the best upper bound.
    """
    names = benchmark_names()
    if prefix:
        names = [n for n in names if n.startswith(prefix.lower())]
        if not names:
            families = sorted({n.rstrip("0123456789") for n in benchmark_names()})
            fail(
                f"no benchmark instance name starts with {prefix!r}; the families are "
                f"{', '.join(families)}"
            )
    table = Table(title="Benchmark instances", caption=f"{len(names)} instances")
    table.add_column("Name")
    table.add_column("Jobs x machines", justify="right")
    table.add_column("Best known", justify="right")
    table.add_column("Optimal")
    for name in names:
        inst = load_benchmark(name)
        best = "n/a" if inst.best_known is None else num(inst.best_known)
        table.add_row(
            name, f"{inst.n_jobs} x {inst.n_machines}", best, "yes" if inst.optimal else "no"
        )
    console.print(table)


@app.command()
def version() -> None:
    """Print the autofab version."""
    console.print(f"autofab {package_version()}")


# Commands that live in their own modules (they import this one's helpers lazily).
from autofab.control.evaluate_cmd import evaluate as _evaluate  # noqa: E402
from autofab.control.negotiate_cmd import negotiate as _negotiate  # noqa: E402
from autofab.control.order_cmd import order_app as _order_app  # noqa: E402
from autofab.control.plant_cmd import plant_app as _plant_app  # noqa: E402
from autofab.control.policy_cmd import policy_app as _policy_app  # noqa: E402
from autofab.control.run_cmd import run as _run  # noqa: E402
from autofab.control.supervisor_cmd import supervisor_app as _supervisor_app  # noqa: E402
from autofab.control.train_cmd import train as _train  # noqa: E402

app.command("run")(_run)
app.command("train")(_train)
app.command("evaluate")(_evaluate)
app.command("negotiate")(_negotiate)
app.add_typer(_order_app, name="order")
app.add_typer(_plant_app, name="plant")
app.add_typer(_policy_app, name="policy")
app.add_typer(_supervisor_app, name="supervisor")


if __name__ == "__main__":
    app()
