"""``--config run.yaml``: any flag of the command line, in a YAML mapping.

Keys are flag names without the leading dashes, spelt with ``-`` or ``_`` (``global_batch_size: 512``);
values are what the flag takes (a list for a flag taking several values, ``true`` for a switch, ``false``
for its ``--no-`` form or nothing). The file's flags come first, so the command line overrides them.
A key that is no flag, or a value the flag refuses, is an ``ArgumentError`` naming the key and the file.
"""

from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence, Tuple

from tri_megatron.config.errors import ArgumentError

FLAG = "--config"


def split_config(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """(the --config path or None, argv without it); ArgumentError when it is given twice or has no value."""
    path, rest, i = None, [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a == FLAG or a.startswith(FLAG + "="):
            if path is not None:
                raise ArgumentError(f"{FLAG} given twice; pass one file")
            if a == FLAG:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ArgumentError(f"{FLAG} needs a file: {FLAG} run.yaml")
                path, i = argv[i + 1], i + 2
            else:
                path, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    return path, rest


def _opposite(parser: argparse.ArgumentParser, action: argparse.Action) -> Optional[argparse.Action]:
    """The switch that sets the same destination the other way (``--no-x`` for ``--x``)."""
    for other in parser._actions:
        if other is not action and other.dest == action.dest and other.nargs == 0 and other.const != action.const:
            return other
    return None


def config_tokens(parser: argparse.ArgumentParser, path: str) -> List[str]:
    """The command-line tokens the YAML file ``path`` stands for."""
    import yaml

    where = f"{FLAG} {path}"
    if not os.path.isfile(path):
        raise ArgumentError(f"{where}: no such file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ArgumentError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ArgumentError(f"{where}: must be a mapping of flag names to values (e.g. 'global_batch_size: 512')")
    tokens: List[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None or flag in ("--help", FLAG):
            raise ArgumentError(f"{where}: unknown key '{key}' (no flag {flag}); see pretrain_tri.py --help")
        if value is None:
            continue
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ArgumentError(f"{where}: key '{key}' is a switch; give true or false, not {value!r}")
            if value:
                tokens.append(flag)
            else:
                other = _opposite(parser, action)
                if other is not None:
                    tokens.append(other.option_strings[0])
            continue
        if isinstance(value, list):
            if action.nargs not in ("*", "+") and not isinstance(action.nargs, int):
                raise ArgumentError(f"{where}: key '{key}' takes one value, not a list")
            tokens += [flag, *map(str, value)]
        elif isinstance(value, dict):
            raise ArgumentError(f"{where}: key '{key}' takes a value, not a mapping")
        else:
            tokens += [flag, str(value)]
    try:  # the file's values alone, so a bad one is reported with the file's name
        parser.parse_known_args(tokens)
    except ArgumentError as e:
        raise ArgumentError(f"{where}: {e}") from None
    return tokens


def expand(parser: argparse.ArgumentParser, argv: Sequence[str]) -> List[str]:
    """``argv`` with its ``--config FILE`` replaced by the file's flags, placed first (the command line wins)."""
    path, rest = split_config(argv)
    return rest if path is None else config_tokens(parser, path) + rest
