"""`loraplex bench SUITE ...` hands the rest of the command line to that benchmark."""

from __future__ import annotations

import pytest

from loraplex.server.cli import BENCH_SUITES, main


@pytest.mark.parametrize("suite", sorted(BENCH_SUITES))
def test_each_suite_parses_its_own_options(suite: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", suite, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: loraplex bench {suite}" in capsys.readouterr().out


def test_an_unknown_suite_or_option_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "engine", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
