"""``jaxformer --help`` as a user reads it: every command listed, plain text."""

from __future__ import annotations

import re

from jaxformer.cli import COMMANDS
from tests.command_line import jaxformer


def test_top_level_help_lists_every_command_in_plain_text():
    out = jaxformer("--help")
    assert out.returncode == 0, out.stderr
    listed = re.findall(r"^    (\w+)\s+\S", out.stdout, flags=re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS)  # attention too, each with its help
    assert "`" not in out.stdout  # no reST markup in what argparse prints as is
    for command in COMMANDS:
        sub = jaxformer(command, "--help")
        assert sub.returncode == 0 and "`" not in sub.stdout, command
