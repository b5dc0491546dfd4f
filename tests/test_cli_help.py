"""Every ``flexcp`` command's --help: plain text, short, every option explained, every default shown."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io

import pytest

from flexcp.cli import BENCHES, COMMANDS, main

SUBCOMMANDS = [([name], module) for name, (module, _) in COMMANDS.items()] + \
              [(["bench", name], module) for name, (module, _) in BENCHES.items()]


def _help_of(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("argv, module", SUBCOMMANDS, ids=[" ".join(a) for a, _ in SUBCOMMANDS])
def test_every_option_has_plain_help_with_its_default(argv, module):
    parser = importlib.import_module(module).build_parser()
    text = _help_of(argv)
    assert text == parser.format_help()  # `flexcp ... --help` prints this parser's help
    for markup in ("``", ":func:", ":class:", ":meth:", ":data:"):
        assert markup not in text, f"flexcp {' '.join(argv)} --help shows reStructuredText {markup!r}"
    description = text.split("\n\n")[1]
    assert len(description.splitlines()) <= 12, f"flexcp {' '.join(argv)} --help: the description is an essay"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"flexcp {' '.join(argv)}: {name} has no help text"
        formatted = parser._get_formatter()._expand_help(action)
        shown = action.default is not None and not isinstance(action.default, bool) and action.option_strings
        assert not shown or "default" in formatted, f"flexcp {' '.join(argv)}: {name} does not show its default"
