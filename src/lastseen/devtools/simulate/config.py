"""The simulator's configuration: one typed object, built from its command-line flags.

The simulator is not part of the service and reads no ``LASTSEEN_*`` variables: everything it
does is on its command line, with the reference program's behaviour as the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lastseen.core.errors import ConfigError
from lastseen.core.parsers import at_least, http_url, loopback_host_port, share
from lastseen.devtools.simulate.producer import ProducerConfig
from lastseen.devtools.simulate.story import Story
from lastseen.devtools.simulate.upstream import UpstreamConfig, parse_online_rule

MODES = ("both", "upstream", "producer")


def _online(value: str) -> str:
    parse_online_rule(value)  # rejects a bad rule at parse time
    return value


_seconds = at_least(float, 0.0)
_at_least_one = at_least(int, 1)


@dataclasses.dataclass(frozen=True)
class SimulatorConfig:
    """What ``lastseen simulate`` (and the demo's simulator) runs, and where it records it."""

    mode: str = "both"
    upstream_listen: tuple[str, int] = ("127.0.0.1", 9010)
    upstream_reuse_port: bool = False
    upstream_tls: tuple[Path, Path] | None = None  # certificate and key: HTTPS
    upstream: UpstreamConfig = dataclasses.field(default_factory=UpstreamConfig)
    online_rule: str = "even"
    producer: ProducerConfig = dataclasses.field(default_factory=ProducerConfig)
    truth_dir: Path | None = None
    duration: float | None = None

    @property
    def story(self) -> Story | None:
        return self.producer.story

    def with_story(self, ttl: float) -> SimulatorConfig:
        """The same run telling the demo's story (story.py) for a service with this ``ttl``:
        the producer sends what it scripts, the upstream answers as it scripts (its faults on
        top of the configured ones)."""
        story = Story(ttl=ttl, period=self.producer.period)
        upstream = dataclasses.replace(
            self.upstream, online=story.online, scripted=story.fault, track_ids=False
        )
        return dataclasses.replace(
            self,
            upstream=upstream,
            online_rule="story",
            producer=dataclasses.replace(self.producer, story=story),
        )

    @property
    def runs_upstream(self) -> bool:
        return self.mode in ("both", "upstream")

    @property
    def runs_producer(self) -> bool:
        return self.mode in ("both", "producer")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> SimulatorConfig:
        """The configuration from flags added by ``add_arguments`` (absent ones: defaults)."""
        seed: int | None = args.seed
        upstream = UpstreamConfig(
            latency_min=args.latency_min,
            latency_max=max(args.latency_min, args.latency_max),
            online=parse_online_rule(args.online, seed or 0),
            content_type=args.content_type,
            error_5xx=args.error_5xx,
            hang=args.hang,
            malformed=args.malformed,
            invalid_400=args.invalid_400,
            wrong_id=args.wrong_id,
            drop=args.drop,
            hang_seconds=args.hang_seconds,
            seed=seed,
            track_ids=False,
        )
        producer = ProducerConfig(
            target=getattr(args, "target", ProducerConfig.target),
            period=args.period,
            timeout=args.timeout,
            max_ids=args.max_ids_per_callback,
            id_universe=args.id_universe,
            rate=args.rate,
            connections=args.connections,
            # Distinct streams: the producer's draws do not mirror the upstream's.
            seed=None if seed is None else seed + 1,
        )
        return cls(
            mode=getattr(args, "mode", "both"),
            upstream_listen=args.upstream_listen,
            upstream_reuse_port=getattr(args, "upstream_reuse_port", False),
            upstream_tls=_tls(
                getattr(args, "upstream_cert", None), getattr(args, "upstream_key", None)
            ),
            upstream=upstream,
            online_rule=args.online,
            producer=producer,
            truth_dir=args.truth_dir,
            duration=args.duration,
        )


def _tls(cert: Path | None, key: Path | None) -> tuple[Path, Path] | None:
    if (cert is None) != (key is None):
        raise ConfigError("--upstream-cert", "goes with --upstream-key")
    return None if cert is None or key is None else (cert, key)


def add_arguments(parser: argparse.ArgumentParser, *, standalone: bool = True) -> None:
    """The simulator's flags. ``standalone`` adds --mode and --target, which the demo sets."""
    run = parser.add_argument_group("simulation run")
    if standalone:
        run.add_argument(
            "--mode",
            choices=MODES,
            default="both",
            help="what to run: both (default), only the upstream, or only the producer",
        )
    run.add_argument(
        "--duration",
        type=_seconds,
        metavar="SECONDS",
        help="stop after this many seconds [default: run until Ctrl-C or SIGTERM]"
        if standalone
        else "stop after this many seconds [default: the story's length, 2 x TTL; with "
        "--scenario reference, until Ctrl-C or SIGTERM]",
    )
    run.add_argument(
        "--truth-dir",
        type=Path,
        metavar="DIR",
        help="record every callback sent and every upstream answer here (JSON lines), "
        "for lastseen verify [default: record nothing]"
        if standalone
        else "where the ground truth is recorded [default: DATA_DIR/demo/truth]",
    )
    run.add_argument("--seed", type=int, help="seed of the random draws, for a repeatable run")

    up = parser.add_argument_group("simulated upstream (GET /objects/{id})")
    up.add_argument(
        "--upstream-listen",
        type=loopback_host_port,
        default=("127.0.0.1", 9010),
        metavar="HOST:PORT",
        help="where the upstream listens; port 0 picks a free one [127.0.0.1:9010]",
    )
    if standalone:
        up.add_argument(
            "--upstream-reuse-port",
            action="store_true",
            help="share the port with other upstream processes (SO_REUSEPORT), which the "
            "kernel spreads connections over: one process may hold only so many sockets",
        )
        up.add_argument(
            "--upstream-cert",
            type=Path,
            metavar="PEM",
            help="speak HTTPS with this certificate (and --upstream-key) [plain HTTP]",
        )
        up.add_argument("--upstream-key", type=Path, metavar="PEM", help="its private key")
    up.add_argument(
        "--latency-min",
        type=_seconds,
        default=0.3,
        metavar="SECONDS",
        help="least delay before every answer [0.3]",
    )
    up.add_argument(
        "--latency-max",
        type=_seconds,
        default=4.3,
        metavar="SECONDS",
        help="most delay before every answer; the delay is uniform in between [4.3]",
    )
    up.add_argument(
        "--online",
        type=_online,
        default="even",
        metavar="RULE",
        help="which objects are online: even (id %% 2 == 0, never changes), random:P (each id "
        "online with probability P, fixed), flip:SECONDS (every status flips each period) [even]",
    )
    up.add_argument(
        "--content-type",
        default="text/plain; charset=utf-8",
        help="Content-Type of the answers ['text/plain; charset=utf-8', like the reference]",
    )
    faults = (
        ("--error-5xx", "answer 503"),
        ("--hang", "never answer (for --hang-seconds)"),
        ("--malformed", "answer a body that is not JSON"),
        ("--invalid-400", "answer 400 'invalid id'"),
        ("--wrong-id", "answer about another id"),
        ("--drop", "close the connection without an answer"),
    )
    for flag, what in faults:
        up.add_argument(
            flag, type=share, default=0.0, metavar="P", help=f"share of requests that {what} [0]"
        )
    up.add_argument(
        "--hang-seconds",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="how long a hanging request hangs [3600]",
    )

    prod = parser.add_argument_group("simulated producer (POST /callback)")
    if standalone:
        prod.add_argument(
            "--target",
            type=http_url,
            default=ProducerConfig.target,
            metavar="URL",
            help=f"where callbacks are posted [{ProducerConfig.target}]",
        )
    prod.add_argument(
        "--period",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="reference mode: sleep between one POST's end and the next POST [5]",
    )
    prod.add_argument(
        "--timeout",
        type=at_least(float, 0.001),
        default=1.0,
        metavar="SECONDS",
        help="client timeout of each POST; a slower reply is a missed callback, never retried [1]",
    )
    prod.add_argument(
        "--max-ids-per-callback",
        type=at_least(int, 0),
        default=199,
        metavar="N",
        help="ids per callback: a uniform count from 0 to N [199]",
    )
    prod.add_argument(
        "--id-universe",
        type=_at_least_one,
        default=100,
        metavar="N",
        help="each id is uniform from 0 to N-1 (e.g. 10000000) [100]",
    )
    prod.add_argument(
        "--rate",
        type=_seconds,
        default=0.0,
        metavar="PER_SECOND",
        help="load mode: this many callbacks per second, open loop, instead of one per period "
        "[0: reference mode]",
    )
    prod.add_argument(
        "--connections",
        type=_at_least_one,
        default=50,
        metavar="N",
        help="load mode: most connections used at once [50]",
    )
