"""``autofab train``: train an RL policy on an autofab environment, rl-baselines3-zoo style.

The flags keep the zoo's names (``--algo --env --env-kwargs -n --seed --eval-freq
--eval-episodes -f --hyperparams --conf-file``), so a zoo user needs no new habits::

    autofab train --algo maskable_ppo --env autofab/JobShop-v0 \\
        --env-kwargs '{"instance": {"jobs": 15, "machines": 15}}' \\
        -n 200000 --seed 0 --eval-freq 10000 -f runs/

The work itself is :func:`autofab.agents.policies.training.train_one`; this module adds
only the terminal: a progress bar over timesteps, and bad input as one red line with exit
code 2. torch and SB3 are imported when the command runs, so ``autofab --help`` stays
quick. Registered in :mod:`autofab.control.cli` with ``app.command("train")(train)``.

Several seeds (``--seeds 0,1,2,3``) train in parallel as Ray tasks, one CPU each, through
:func:`autofab.control.ray_tasks.map_tasks`: on a local Ray by default, or on a running
cluster with ``--ray-address``. ``--no-ray`` (or no ray installed) trains them one after
another in this process, with the per-step bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from autofab.control.console import (
    EXIT_INTERNAL,
    console,
    err_console,
    fail,
    user_errors,
)
from autofab.control.ray_tasks import RAY_REQUIREMENT, map_tasks, ray_available

if TYPE_CHECKING:
    from stable_baselines3.common.callbacks import BaseCallback

    from autofab.agents.policies.training import TrainResult, TrainSpec

__all__ = ["parse_seeds", "train", "train_in_task"]

#: CPUs reserved per training task: SB3 on small MLPs with DummyVecEnv is one core's work,
#: and more torch threads per process only fight each other when seeds run side by side.
CPUS_PER_TRAIN_TASK = 1


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of distinct integers, in the order given."""
    seeds: list[int] = []
    for part in text.split(","):
        item = part.strip()
        try:
            seed = int(item)
        except ValueError:
            raise ValueError(
                f"--seeds must be a comma list of integers like 0,1,2; got {text!r}"
            ) from None
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def _progress_callback(progress: Progress, label: str) -> BaseCallback:
    """An SB3 callback that moves a rich progress bar over the run's timesteps (the total
    is read from ``learn()`` when training starts, so it also covers a config's value)."""
    from stable_baselines3.common.callbacks import BaseCallback

    class RichProgress(BaseCallback):
        def _on_training_start(self) -> None:
            self.task = progress.add_task(label, total=self.locals.get("total_timesteps"))

        def _on_step(self) -> bool:
            progress.update(self.task, completed=self.num_timesteps)
            return True

        def _on_training_end(self) -> None:
            progress.update(self.task, completed=self.num_timesteps)

    return RichProgress()


def train_in_task(spec: TrainSpec) -> TrainResult:
    """Train one seed inside a Ray task (top-level, so workers import it by name).

    torch is limited to the task's CPUs first: by default each process would start a
    thread per core, and N seeds on N cores would then run N x N threads.
    """
    import torch

    from autofab.agents.policies.training import train_one

    torch.set_num_threads(CPUS_PER_TRAIN_TASK)
    return train_one(spec)


def _command_words(params: dict[str, Any]) -> list[str]:
    """The command as run, rebuilt from the parsed options (recorded in ``policy.json``)."""
    words = ["autofab", "train"]
    for flag, key in (
        ("--algo", "algo"),
        ("--env", "env"),
        ("--env-kwargs", "env_kwargs"),
        ("-n", "n_timesteps"),
        ("--seed", "seed"),
        ("--seeds", "seeds"),
        ("--eval-freq", "eval_freq"),
        ("--eval-episodes", "eval_episodes"),
        ("-f", "log_folder"),
        ("--conf-file", "conf_file"),
    ):
        value = params.get(key)
        if value is not None:
            words += [flag, str(value)]
    for item in params.get("hyperparams") or []:
        words += ["--hyperparams", item]
    return words


def train(
    algo: Annotated[
        str,
        typer.Option(
            "--algo",
            help="Algorithm: maskable_ppo (sb3-contrib), ppo, a2c, dqn (Discrete), or "
            "self_labeling (the job-shop dispatcher, trained on random instances).",
        ),
    ] = "maskable_ppo",
    env: Annotated[
        str, typer.Option("--env", help="Environment id: autofab/JobShop-v0 or autofab/Factory-v0.")
    ] = "autofab/JobShop-v0",
    env_kwargs: Annotated[
        str | None,
        typer.Option(
            "--env-kwargs",
            metavar="JSON",
            help='Environment arguments as a JSON object, e.g. \'{"instance": "ft06"}\'.',
            show_default=False,
        ),
    ] = None,
    n_timesteps: Annotated[
        int | None,
        typer.Option(
            "-n",
            "--n-timesteps",
            help="Environment steps to train for (default: n_timesteps of the config).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the run.")] = 0,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            metavar="LIST",
            help="Several seeds, comma separated (0,1,2); overrides --seed. One run folder each.",
            show_default=False,
        ),
    ] = None,
    eval_freq: Annotated[
        int,
        typer.Option(
            "--eval-freq",
            help="Evaluate every this many steps (0: only at the end) into evaluations.csv.",
        ),
    ] = 10_000,
    eval_episodes: Annotated[
        int, typer.Option("--eval-episodes", help="Episodes per evaluation.")
    ] = 5,
    log_folder: Annotated[
        Path, typer.Option("-f", "--log-folder", help="Folder for the run folders.")
    ] = Path("runs"),
    hyperparams: Annotated[
        list[str] | None,
        typer.Option(
            "--hyperparams",
            "-params",
            metavar="KEY:VALUE",
            help="Override a hyperparameter (repeatable), e.g. --hyperparams n_steps:128 "
            "--hyperparams 'policy_kwargs:{net_arch: [32, 32]}'. Values are YAML, never code.",
            show_default=False,
        ),
    ] = None,
    conf_file: Annotated[
        Path | None,
        typer.Option(
            "--conf-file",
            "-conf",
            help="Hyperparameter YAML keyed by env id (default: configs/train/ALGO.yml).",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[int, typer.Option("--verbose", help="SB3 verbosity (0, 1, 2).")] = 0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDR",
            help="Train the seeds as tasks on this running Ray cluster (HOST:PORT, "
            "ray://HOST:PORT or auto); its nodes need autofab and should share -f's folder.",
            show_default=False,
        ),
    ] = None,
    use_ray: Annotated[
        bool,
        typer.Option(
            "--ray/--no-ray",
            help="Train several seeds in parallel as Ray tasks (a local Ray unless "
            "--ray-address); --no-ray trains them one after another.",
        ),
    ] = True,
) -> None:
    """Train a policy with SB3 on an autofab environment; write a run folder per seed.

    Each run folder (LOG_FOLDER/ENV__ALGO__SEED__TIME) holds config.yml, model.zip, the
    observation normaliser if used, evaluations.csv and policy.json (env id and version,
    space signatures, command, autofab version), which autofab's policy loader reads.

    Example: [bold]autofab train --algo maskable_ppo --env autofab/JobShop-v0
    --env-kwargs '{"instance": "ft06"}' -n 50000[/bold]
    """

    with user_errors():
        from autofab.agents.policies.training import (
            TrainSpec,
            parse_env_kwargs,
            parse_hyperparam_overrides,
        )

        seed_list = parse_seeds(seeds) if seeds is not None else [seed]
        words = _command_words(
            {
                "algo": algo,
                "env": env,
                "env_kwargs": env_kwargs,
                "n_timesteps": n_timesteps,
                "seed": None if seeds is not None else seed,
                "seeds": seeds,
                "eval_freq": eval_freq,
                "eval_episodes": eval_episodes,
                "log_folder": log_folder,
                "conf_file": conf_file,
                "hyperparams": hyperparams,
            }
        )
        specs = [
            TrainSpec(
                algo=algo,
                env_id=env,
                seed=s,
                n_timesteps=n_timesteps,
                env_kwargs=parse_env_kwargs(env_kwargs),
                hyperparams=parse_hyperparam_overrides(hyperparams or []),
                eval_freq=eval_freq,
                eval_episodes=eval_episodes,
                log_folder=str(log_folder),
                command=words,
                conf_file=None if conf_file is None else str(conf_file),
                verbose=verbose,
            )
            for s in seed_list
        ]
        if ray_address is not None and not use_ray:
            raise ValueError("--ray-address and --no-ray contradict each other; drop one")
        if ray_address is not None and not ray_available():
            raise ValueError(f"--ray-address needs ray: pip install '{RAY_REQUIREMENT}'")
    parallel = use_ray and (ray_address is not None or len(specs) > 1)
    if parallel:
        # Check the settings here, before Ray starts (seconds) and in one line, instead
        # of once per task. train_one checks again in the task; that check is the cheap
        # part (no folder, no model yet).
        from autofab.agents.policies.training import check_spec

        with user_errors():
            check_spec(specs[0])
    if parallel and not ray_available():
        parallel = False
        err_console.print(
            f"ray is not installed (pip install '{RAY_REQUIREMENT}'): training seeds "
            f"{', '.join(map(str, seed_list))} one after another",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
    results = _train_with_ray(specs, ray_address) if parallel else _train_here(specs)
    for result in results:
        for warning in result.warnings:
            err_console.print(f"warning: {warning}", style="yellow", markup=False, soft_wrap=True)
        makespan = (
            "" if result.mean_makespan is None else f", mean makespan {result.mean_makespan:g}"
        )
        console.print(
            f"seed {result.seed}: {result.timesteps} steps, mean return "
            f"{result.mean_return:.4g}{makespan}"
        )
        console.print(f"run folder: {escape(result.run_dir)}", soft_wrap=True)


def _train_here(specs: list[TrainSpec]) -> list[TrainResult]:
    """Train the seeds one after another in this process, with a bar over timesteps."""
    from autofab.agents.policies.training import train_one
    from autofab.envs.model import InvalidActionError

    results = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as progress:
        for spec in specs:
            label = f"{spec.algo} seed {spec.seed}"
            bar = _progress_callback(progress, label)
            task = progress.add_task(label, total=None, visible=False)

            def moved(done: int, total: int, task: TaskID = task) -> None:
                progress.update(task, completed=done, total=total, visible=True)

            with user_errors():
                try:
                    results.append(train_one(spec, [bar], on_progress=moved))
                except InvalidActionError as exc:
                    _invalid_action(spec.algo, exc)
    return results


def _train_with_ray(specs: list[TrainSpec], ray_address: str | None) -> list[TrainResult]:
    """Train every seed as its own Ray task; a line on stderr as each seed finishes.

    Run folders go to the absolute form of ``-f``: a Ray worker's working directory is
    not this one, and on a cluster the path must name a shared folder anyway.
    """
    from dataclasses import replace

    from autofab.envs.model import InvalidActionError

    specs = [replace(s, log_folder=str(Path(s.log_folder).resolve())) for s in specs]
    where = "a local Ray" if ray_address is None else f"the Ray cluster at {ray_address}"
    err_console.print(
        f"training seeds {', '.join(str(s.seed) for s in specs)} in parallel on {where}",
        style="dim",
        markup=False,
        soft_wrap=True,
    )
    finished = 0

    def on_done(index: int, result: TrainResult) -> None:
        nonlocal finished
        finished += 1
        err_console.print(
            f"[{finished}/{len(specs)}] seed {result.seed} done: {result.timesteps} steps",
            style="dim",
            markup=False,
            soft_wrap=True,
        )

    with user_errors():
        try:
            return map_tasks(
                train_in_task,
                specs,
                ray_address=ray_address,
                num_cpus_per_task=CPUS_PER_TRAIN_TASK,
                progress=on_done,
            )
        except InvalidActionError as exc:
            _invalid_action(specs[0].algo, exc)
        except ImportError as exc:
            raise ValueError(str(exc)) from None


def _invalid_action(algo: str, exc: Exception) -> NoReturn:
    """An invalid action is autofab's bug, not bad input: exit 1, asking for a report."""
    fail(
        f"{algo} made an invalid action; this is a bug in autofab, please report it. {exc}",
        code=EXIT_INTERNAL,
    )
