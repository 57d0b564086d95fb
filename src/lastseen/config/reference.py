"""The configuration reference (docs/reference/configuration.md), written from the settings
themselves so that the page cannot drift from them; a test compares the two.

    python -m lastseen.config.reference docs/reference/configuration.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from lastseen.config.arguments import INTERNAL
from lastseen.config.settings import OPTIONS

GROUPS = {
    "service": "Service",
    "ingest": "Taking callbacks in",
    "auth": "Authentication",
    "spool": "The spool",
    "database": "Database",
    "worker": "Claiming work",
    "lookups": "Lookups",
    "results": "Writing results",
    "housekeeping": "Housekeeping and shutdown",
    "logging": "Logging",
    "bench": "Benchmark",
}


# Defaults that depend on the machine, said the same way on every machine.
MACHINE_DEFAULTS = {"data_dir": "the user's data directory (`~/.local/share/lastseen` on Linux)"}


def _default(field: str, text: str | None) -> str:
    if field in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[field]
    return "unset" if text is None else f"`{text}`"


def markdown() -> str:
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable and a flag of the same name (`LASTSEEN_TTL`,",
        "`--ttl`); the flag wins. Secrets can be given as files (`..._FILE`), which is how",
        "container platforms mount them; a secret and its file together are refused. Every",
        "process of an instance runs with the settings the parent read: worker processes get",
        "them whole, secrets read from their files included.",
        "",
        "This page is written from the settings themselves (`make docs`); `lastseen serve",
        "--help` lists the same.",
    ]
    present = {option.group for option in OPTIONS}
    groups = [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))
    for group in groups:
        lines += ["", f"## {GROUPS.get(group, group.title())}", ""]
        lines += ["| Variable | Flag | Default | What it sets |", "|---|---|---|---|"]
        for option in OPTIONS:
            if option.group != group or option.field in INTERNAL:
                continue
            help = option.help.replace("|", "\\|")
            if option.secret:
                help += " (a secret: never logged)"
            default = _default(option.field, option.default)
            lines.append(f"| `{option.env}` | `{option.flag}` | {default} | {help} |")
    lines += ["", "## Set by lastseen itself", ""]
    lines += ["Accepted, not offered in `--help`:", ""]
    for option in OPTIONS:
        if option.field in INTERNAL:
            lines.append(f"- `{option.env}`: {option.help}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(markdown())
