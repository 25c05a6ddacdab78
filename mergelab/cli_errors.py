"""How the command line shows a library error: on one line, with the Python arguments it names
spelled as this command's flags.

A `MergelabError` names an argument as a Python call would write it and lists it in `arguments`
(`errors.py`); the table argument -> flag is read from the parser itself, so a new flag needs no
entry:

    device='cuda:9': no CUDA device ...      ->  --device cuda:9: no CUDA device ...
    ... pass overwrite=True to replace it    ->  ... pass --overwrite to replace it
    max_rank: must be a positive integer     ->  --max-rank: must be a positive integer
"""

from __future__ import annotations

import argparse
import re

from mergelab.errors import MergelabError


def flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Argument -> flag over every subcommand (`shard_size` -> `--shard-size`); the long spelling first."""
    table: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                table.update(flags(sub))
        elif action.option_strings:
            table[action.dest] = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
    return table


def as_flags(exc: MergelabError, table: dict[str, str]) -> str:
    """`exc` on one line, each argument it names replaced by its flag."""
    text = " ".join(str(exc).split())
    for name in exc.arguments:
        if name in table:
            text = _spelled(name).sub(lambda m, flag=table[name]: _flag(m, flag), text)
    return text


def _spelled(name: str) -> re.Pattern[str]:
    """`name=True`, `name='value'`, `name=value` or `name:` (not part of a longer key such as `options.name`)."""
    return re.compile(rf"(?<![\w.'-]){re.escape(name)}(?:=(?:(True)\b|'([^']*)'|)|(?=:))")


def _flag(match: re.Match[str], flag: str) -> str:
    if match[1] is not None or not match[0].endswith(("=", "'")):  # a switch, or the key at fault
        return flag
    return f"{flag} {match[2] or ''}"  # the value follows (unquoted)
