"""One help style for every ``flexcp`` command: plain text, line breaks kept, each option's default shown."""

from __future__ import annotations

import argparse


def _shown(value: object) -> str:
    """A default as a user would type it: lists space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; an option's help ends with its choices and its default.

    An option with choices shows its name in the usage line (``--masks MASKS``) and lists the
    choices in its help. No default is shown for flags, for a default of None (the help says
    what happens then) or when the help already names its default.
    """

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):
        if action.metavar is None and action.choices is not None and action.option_strings:
            return lambda size: (default_metavar,) * size
        return super()._metavar_formatter(action, default_metavar)

    def _get_help_string(self, action: argparse.Action) -> str:
        notes = []
        if action.choices is not None and action.option_strings:
            notes.append("choices: " + ", ".join(map(str, action.choices)))
        default = action.default
        if not (default is None or isinstance(default, bool) or default is argparse.SUPPRESS
                or "default" in (action.help or "")
                or (not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            notes.append(f"default: {_shown(default)}")
        text = (action.help or "").replace("%(", "\0")  # argparse formats help with %: keep its own %(...)s only
        return (f"{text} ({'; '.join(notes)})" if notes else text).replace("%", "%%").replace("\0", "%(")


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` in the one help style (:class:`HelpFormatter`)."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


__all__ = ["HelpFormatter", "new_parser"]
