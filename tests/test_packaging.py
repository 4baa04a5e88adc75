"""The distribution installs the three top-level folders under the one import name."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_import_under_autofab() -> None:
    import autofab.agents
    import autofab.control
    import autofab.envs

    for module, folder in (
        (autofab.envs, "envs"),
        (autofab.agents, "agents"),
        (autofab.control, "control"),
    ):
        assert module.__file__ is not None
        assert Path(module.__file__).parent.name in (folder, module.__name__.split(".")[-1])


def test_wheel_maps_folders_into_autofab(tmp_path: Path) -> None:
    """A regular (non-editable) build puts envs/ at autofab/envs/ and nothing at top level."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("autofab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "autofab/envs/__init__.py",
        "autofab/envs/model.py",
        "autofab/envs/py.typed",
        "autofab/agents/__init__.py",
        "autofab/control/__init__.py",
        "autofab/agents/policies/pdm.py",
        "autofab/configs/demo.yaml",
        "autofab/configs/plant100.yaml",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    top = {n.split("/")[0] for n in names if not n.startswith("autofab-")}
    assert top == {"autofab"}, f"unexpected top-level entries in the wheel: {top}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "autofab = autofab.control.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()
