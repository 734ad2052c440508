"""``jaxformer --help`` as a user reads it: every command listed, plain text."""

from __future__ import annotations

import re

import pytest

from jaxformer.cli import COMMANDS, main
from tests.command_line import jaxformer


def test_top_level_help_lists_every_command_in_plain_text(capsys):
    out = jaxformer("--help")
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^    (\w+)\s+\S", out.stdout, flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS)  # attention too, each with its help
    assert "`" not in out.stdout  # no reST markup in what argparse prints as is
    for command in COMMANDS:  # in process: one interpreter start is enough to show the above
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and text.startswith("usage: jaxformer " + command), command
        assert "`" not in text, command
