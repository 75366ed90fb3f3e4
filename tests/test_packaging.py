"""The wheel, installed into a scratch environment, provides every subpackage under `loraplex`."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = [
    "loraplex.server",
    "loraplex.server.engine",
    "loraplex.adapters",
    "loraplex.adapters.trainer",
    "loraplex.clients",
    "loraplex.bench",
    "loraplex.proto",
]
GENERIC_NAMES = ["server", "adapters", "clients", "bench", "proto"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
    )
    (built,) = out.glob("loraplex-*.whl")
    return built


@pytest.fixture(scope="module")
def scratch_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("scratch-env")
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # The dependencies come from this environment's site-packages, added as a plain path so
    # that its own .pth files (the editable install's import hook among them) stay inactive.
    scratch_site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (scratch_site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
    )
    return python


def _run_isolated(python: Path, code: str, cwd: Path) -> str:
    result = subprocess.run(
        [str(python), "-I", "-c", code], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_subpackage_imports_from_the_installed_wheel(
    scratch_python: Path, tmp_path: Path
) -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    print(name, module.__file__)\n"
    )
    lines = _run_isolated(scratch_python, code, tmp_path).splitlines()
    assert [line.split()[0] for line in lines] == SUBPACKAGES
    site = scratch_python.parent.parent
    for line in lines:
        assert Path(line.split()[1]).is_relative_to(site), line


def test_no_generic_top_level_module_is_installed(scratch_python: Path, tmp_path: Path) -> None:
    """Not by loraplex: the scratch environment's own site-packages holds only its wheel
    (dependencies may bring such names, e.g. proto-plus's `proto`, from their own folder)."""
    code = (
        "import importlib.util, sysconfig\n"
        "own = sysconfig.get_path('purelib')\n"
        "specs = [(n, importlib.util.find_spec(n)) for n in " + repr(GENERIC_NAMES) + "]\n"
        "print([n for n, s in specs if s is not None and any(\n"
        "    str(p).startswith(own) for p in (s.submodule_search_locations or [s.origin]))])\n"
    )
    assert _run_isolated(scratch_python, code, tmp_path).strip() == "[]"


def test_wheel_ships_the_console_script(scratch_python: Path) -> None:
    script = scratch_python.parent / "loraplex"
    assert script.is_file()
    assert "loraplex.server.cli" in script.read_text()
