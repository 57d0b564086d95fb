"""What a setting is (its parser, default, help and group), and the parsers of the values
that only settings take."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from lastseen.core.parsers import positive


def postgresql_url(value: str) -> str:
    if urlsplit(value).scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its field name, how to parse it from text, its default (as text, the way
    an operator writes it), its help, and the group --help and the reference list it under."""

    field: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    group: str
    secret: bool = False

    @property
    def env(self) -> str:
        return "LASTSEEN_" + self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def label(value: str) -> str:
    if not value.strip() or len(value) > 200:
        raise ValueError(f"expected a name of 1 to 200 characters, got {value!r}")
    return value.strip()


def secret_text(value: str) -> str:
    # The error must not echo the value: it may be printed.
    if not value.strip():
        raise ValueError("expected a secret, got an empty value")
    return value.strip()


def header_line(value: str) -> str:
    # The error must not echo the value: it may carry a secret.
    name, colon, rest = value.partition(":")
    if not colon or not name.strip() or not rest.strip() or any(c in value for c in "\r\n"):
        raise ValueError("expected one header as 'Name: value'")
    if not name.strip().replace("-", "").isalnum():
        raise ValueError("the header's name must be letters, digits and '-'")
    return f"{name.strip()}: {rest.strip()}"


def setting(
    parse: Callable[[str], Any], default: str | None, help: str, group: str, *, secret: bool = False
) -> Any:
    """Declares a field of ``Settings`` as a setting: the field is the one declaration, and
    ``OPTIONS`` (flags, variables, --help, the reference page) is read off the fields."""
    spec = {"parse": parse, "default": default, "help": help, "group": group, "secret": secret}
    return dataclasses.field(repr=not secret, metadata={"setting": spec})


def options_of(cls: type) -> tuple[Option, ...]:
    """The settings a dataclass declares with ``setting``, in declaration order."""
    return tuple(
        Option(field.name, **field.metadata["setting"])
        for field in dataclasses.fields(cls)
        if "setting" in field.metadata
    )


seconds = positive(float)
positive_int = positive(int)
