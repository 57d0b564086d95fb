"""One flag per setting: what a command offers in its --help, and settings from its flags."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from lastseen.config.settings import BY_FIELD, OPTIONS, Settings

# Set by lastseen itself, or for its benchmark: accepted, not offered in --help.
INTERNAL = frozenset({"parent_pid", "exit_with", "port_share", "noop_route"})


def add_arguments(
    parser: argparse.ArgumentParser,
    groups: Sequence[str] | None = None,
    *,
    fields: Sequence[str] | None = None,
) -> None:
    """Adds one flag per setting, or per setting of ``groups``, or per one of ``fields``
    (the settings a command uses, so that its --help lists only those) to ``parser``."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        if groups is not None and option.group not in groups:
            continue
        if fields is not None and option.field not in fields:
            continue
        section = sections.get(option.group)
        if section is None:
            section = sections[option.group] = parser.add_argument_group(f"{option.group} settings")
        default = "none" if option.default is None else option.default
        section.add_argument(
            option.flag,
            dest=option.field,
            type=option.parse,
            default=None,
            metavar=option.field.split("_")[-1].upper(),
            help=argparse.SUPPRESS
            if option.field in INTERNAL
            else f"{option.help} [env {option.env}, default {default}]",
        )


def from_arguments(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags (as added by ``add_arguments``) over the environment."""
    overrides = {field: getattr(args, field) for field in BY_FIELD if hasattr(args, field)}
    return Settings.load(env, overrides)
