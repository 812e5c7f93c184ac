from __future__ import annotations

import click
import pytest

from uproxy.cli import cli


@pytest.mark.parametrize("command", ["run", "check", "cleanup", "status", "demo"])
def test_every_option_says_what_it_does(command: str) -> None:
    group = cli
    assert isinstance(group, click.Group)
    cmd = group.commands[command]
    empty = [
        p.opts[0]
        for p in cmd.params
        if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()
    ]
    assert empty == []
