"""``autofab plant serve CONFIG``: serve a plant config as an OPC UA plant twin.

The twin (:mod:`autofab.control.opcua.twin`) runs the plant model in accelerated time
(``--speedup``) behind an OPC UA server on loopback, secured by default (Basic256Sha256 and
Aes256_Sha256_RsaPss with SignAndEncrypt; anonymous sessions may read, only the supervisor
login may write). When it is ready it prints its endpoint, the node map file and where the
supervisor's login is; Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from autofab.control.console import console, err_console, user_errors
from autofab.control.opcua.twin import PlantTwin, TwinSettings
from autofab.envs.plant import load_plant

__all__ = ["plant_app", "serve"]

plant_app = typer.Typer(help="Serve the plant model as an OPC UA plant twin.", no_args_is_help=True)


@plant_app.command()
def serve(
    config: Annotated[str, typer.Argument(help="Plant config YAML, e.g. configs/demo.yaml.")],
    port: Annotated[int, typer.Option(help="Loopback port; 0 picks a free one.")] = 0,
    speedup: Annotated[float, typer.Option(help="Plant seconds per wall second.")] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of the plant model.")] = 0,
    cert_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the certificate, key and supervisor login are kept (generated on "
            "first run). Default: ~/.local/state/autofab/opcua/<plant>.",
            show_default=False,
        ),
    ] = None,
    nodemap: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the node map JSON (default: in --cert-dir).", show_default=False
        ),
    ] = None,
    watchdog_timeout: Annotated[
        float,
        typer.Option(help="Wall seconds without a new heartbeat before the safe state; 0: off."),
    ] = 5.0,
    safe_state: Annotated[
        str, typer.Option(help="What the watchdog does: 'stop' or 'safe_speed'.")
    ] = "stop",
    insecure_dev: Annotated[
        bool,
        typer.Option(
            "--insecure-dev",
            help="Also offer a NoSecurity endpoint (development only; writes still need the "
            "supervisor login).",
        ),
    ] = False,
) -> None:
    """Serve CONFIG as an OPC UA plant twin until Ctrl-C."""
    with user_errors():
        plant = load_plant(config)
        settings = TwinSettings(
            port=port,
            speedup=speedup,
            seed=seed,
            cert_dir=cert_dir,
            nodemap_path=nodemap,
            insecure_dev=insecure_dev,
            watchdog_timeout_s=watchdog_timeout,
            safe_state=safe_state,  # type: ignore[arg-type]  (checked by TwinSettings)
        )
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    twin = PlantTwin(plant, settings)

    async def main() -> None:
        async with twin:
            console.print(f"endpoint: {twin.endpoint}", markup=False, soft_wrap=True)
            console.print(f"node map: {twin.nodemap_path}", markup=False, soft_wrap=True)
            console.print(
                f"supervisor login: {twin.cert_dir / 'supervisor.json'}",
                markup=False,
                soft_wrap=True,
            )
            security = "SignAndEncrypt" + (" + NoSecurity (--insecure-dev)" if insecure_dev else "")
            console.print(f"security: {security}; speedup {speedup:g}x; ready", markup=False)
            await twin.serve_forever()

    with user_errors("cannot serve the plant twin"):
        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            err_console.print("stopped", markup=False)
