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
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
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

if TYPE_CHECKING:
    from stable_baselines3.common.callbacks import BaseCallback

__all__ = ["parse_seeds", "train"]


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
            "--algo", help="Algorithm: maskable_ppo (sb3-contrib), ppo, a2c or dqn (Discrete)."
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
            train_one,
        )
        from autofab.envs.model import InvalidActionError

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
    if len(specs) > 1:
        why = (
            "ray is not installed"
            if importlib.util.find_spec("ray") is None
            else "parallel Ray training is not wired in yet"
        )
        err_console.print(
            f"{why}: training seeds {', '.join(map(str, seed_list))} one after another",
            style="yellow",
            markup=False,
            soft_wrap=True,
        )
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
        results = []
        for spec in specs:
            bar = _progress_callback(progress, f"{spec.algo} seed {spec.seed}")
            with user_errors():
                try:
                    results.append(train_one(spec, [bar]))
                except InvalidActionError as exc:
                    fail(
                        f"{spec.algo} made an invalid action; this is a bug in autofab, "
                        f"please report it. {exc}",
                        code=EXIT_INTERNAL,
                    )
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
