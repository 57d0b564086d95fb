"""Configuration: environment variables, flags, defaults and errors."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from helpers.cli import run_cli
from helpers.services import Spawn

from lastseen.cli.main import build_parser
from lastseen.config.arguments import INTERNAL, from_arguments
from lastseen.config.settings import OPTIONS, Settings
from lastseen.core.errors import ConfigError
from lastseen.devtools.launch import LASTSEEN


def test_defaults_are_the_documented_ones() -> None:
    """Without configuration, lastseen listens on 127.0.0.1:9090 and keeps objects 30 s."""
    settings = Settings.load({})
    assert settings.listen == ("127.0.0.1", 9090)
    assert settings.objects_url == "http://127.0.0.1:9010"
    assert settings.ttl == 30.0
    assert settings.database_url is None
    assert settings.max_body_bytes == 1024 * 1024


def test_environment_variables_are_read() -> None:
    """Each LASTSEEN_* variable sets its setting, fractions of seconds included."""
    settings = Settings.load(
        {
            "LASTSEEN_DATABASE_URL": "postgresql://u@h/db",
            "LASTSEEN_LISTEN": "0.0.0.0:8000",
            "LASTSEEN_OBJECTS_URL": "http://upstream:1234/",
            "LASTSEEN_TTL": "2.5",
            "LASTSEEN_DATA_DIR": "/tmp/x",
        }
    )
    assert settings.database_url == "postgresql://u@h/db"
    assert settings.listen == ("0.0.0.0", 8000)
    assert settings.objects_url == "http://upstream:1234"
    assert settings.ttl == 2.5
    assert str(settings.data_dir) == "/tmp/x"


def test_flags_override_the_environment() -> None:
    """A flag wins over its environment variable."""
    args = build_parser().parse_args(["serve", "--ttl", "5"])
    assert from_arguments(args, {"LASTSEEN_TTL": "7"}).ttl == 5.0
    args = build_parser().parse_args(["serve"])
    assert from_arguments(args, {"LASTSEEN_TTL": "7"}).ttl == 7.0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LASTSEEN_TTL", "0"),
        ("LASTSEEN_TTL", "soon"),
        ("LASTSEEN_TTL", "nan"),
        ("LASTSEEN_LEASE", "inf"),
        ("LASTSEEN_SHUTDOWN_GRACE", "-inf"),
        ("LASTSEEN_LISTEN", "9090"),
        ("LASTSEEN_DATABASE_URL", "mysql://x"),
        ("LASTSEEN_OBJECTS_URL", "ftp://x"),
        ("LASTSEEN_ROLE", "boss"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    """A bad value, a time that is not a finite number among them, is refused with the name of
    the variable to fix."""
    with pytest.raises(ConfigError, match=variable):
        Settings.load({variable: value})


def test_every_setting_has_a_flag_in_serve_help() -> None:
    """`lastseen serve --help` lists every setting with its variable, but the internal ones
    (set by lastseen itself), which it accepts without offering them."""
    out = subprocess.run(
        [*LASTSEEN, "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in OPTIONS:
        shown = option.field not in INTERNAL
        assert (option.flag in out) == shown, option.flag
        assert (option.env in out) == shown, option.env


def test_top_level_help_lists_the_commands() -> None:
    """`lastseen --help` names the subcommands."""
    out = subprocess.run([*LASTSEEN, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "dead-letters", "retry-dead-letters"):
        assert command in out


def test_the_configuration_reference_is_the_settings() -> None:
    """docs/reference/configuration.md is what the settings write (make docs): every variable
    in it with its flag, default and help, and nothing else."""
    from pathlib import Path

    from lastseen.config.reference import markdown

    page = Path(__file__).parent.parent / "docs" / "reference" / "configuration.md"
    assert page.read_text() == markdown(), "the settings changed: run make docs"
    assert all(f"| `{o.env}` |" in page.read_text() for o in OPTIONS if o.field not in INTERNAL)


async def test_every_process_runs_on_uvloop_unless_told_otherwise(
    db_url: str, spawn: Spawn
) -> None:
    """``lastseen serve`` runs on uvloop by default (measured cheaper per lookup and per durable
    callback), and on asyncio's own loop with ``LASTSEEN_EVENT_LOOP=asyncio``."""
    by_default = await spawn(env={"LASTSEEN_DATABASE_URL": db_url})
    assert by_default.events("listening")[0]["event_loop"] == "uvloop"
    told = await spawn(env={"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_EVENT_LOOP": "asyncio"})
    assert told.events("listening")[0]["event_loop"] == "asyncio"


async def test_a_busy_port_is_one_line_naming_the_address_and_the_flag(db_url: str) -> None:
    """``lastseen serve`` on a port another process holds: exit 2 and one line that names the
    address, the cause and ``--listen``; no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await run_cli(
            "serve", "--listen", f"127.0.0.1:{port}", "--role", "ingest",
            env={"LASTSEEN_DATABASE_URL": db_url, "LASTSEEN_LOG_FORMAT": "json"},
        )  # fmt: skip
    assert done.code == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = f"lastseen: LASTSEEN_LISTEN: cannot listen on 127.0.0.1:{port}: address already in use"
    assert line in done.stderr, done.stderr
    assert "--listen" in done.stderr.splitlines()[-1]


def test_spawned_processes_get_no_settings_of_the_developer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process the tools start runs with what they give it: a LASTSEEN_* variable of the
    shell that runs the tests (a developer's own database, say) does not reach it."""
    from lastseen.devtools.launch import clean_environment

    monkeypatch.setenv("LASTSEEN_DATABASE_URL", "postgresql://developer@elsewhere/db")
    env = clean_environment(LASTSEEN_TTL="3")
    assert "LASTSEEN_DATABASE_URL" not in env
    assert env["LASTSEEN_TTL"] == "3"
    assert env["PATH"] == os.environ["PATH"]
    assert env["LASTSEEN_EXIT_WITH"] == str(os.getpid())  # tied to the launcher


def test_the_embedded_server_s_user_cannot_log_in(db_url: str) -> None:
    """As root, the embedded PostgreSQL runs as a system user with no login shell (the
    wheel's own would get /bin/bash); the suite's server has started by now."""
    import pwd

    from lastseen.storage import embedded

    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    assert pwd.getpwnam(embedded.SYSTEM_USER).pw_shell == embedded.NO_LOGIN
