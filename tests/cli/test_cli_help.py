"""``-h`` is ``--help`` on the command and on every subcommand (it was only on ``score``)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from crossent.cli.main import main


@pytest.mark.parametrize("command", [[], ["score"], ["demo"], ["bench"]], ids=lambda c: " ".join(c) or "crossent")
def test_short_help_option_is_help(command):
    short = CliRunner().invoke(main, [*command, "-h"])
    long = CliRunner().invoke(main, [*command, "--help"])
    assert short.exit_code == 0 and long.exit_code == 0, (short.output, long.output)
    assert short.output == long.output
    assert "Usage: " in short.output and "-h, --help" in short.output
