"""Commands start without noise on stderr: nothing a user did not ask about."""

from __future__ import annotations

import subprocess
import sys


def stderr_of(*args: str) -> str:
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stderr


def test_help_writes_nothing_to_stderr() -> None:
    assert stderr_of("-m", "loraplex.server.cli", "--help") == ""
    assert stderr_of("-m", "loraplex.server.cli", "train-adapter", "--help") == ""


def test_importing_bitsandbytes_under_loraplex_says_nothing() -> None:
    """bitsandbytes' hub-kernel warning (AVX512-BF16 CPUs) is off once loraplex is loaded."""
    assert stderr_of("-c", "import loraplex.server, bitsandbytes") == ""
