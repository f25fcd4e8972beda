"""Settings for every service: one frozen dataclass each, from flags over `RELAY_*`
environment variables over defaults.

Each field `name` is read from the flag `--name-with-dashes`, else from the variable
`RELAY_NAME`, else its default. Field metadata declares the checks (`url`, `port`,
`min`), the help text, and what must not be logged (`secret`, `url`). What every
service connecting to NATS is told is declared once, in `NatsSettings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn


@dataclass(frozen=True, kw_only=True)
class NatsSettings:
    """The settings every service shares: where NATS is, how its storage is made, how it logs."""

    nats_url: str = field(
        default="nats://127.0.0.1:4222",
        metadata={"help": "NATS server URL(s), comma-separated; may carry user:password@", "url": True},
    )
    nats_ping_interval_ms: int = field(
        default=5_000,
        metadata={"min": 100, "help": "how often the NATS connection is pinged; after two unanswered pings (two to three intervals) it is taken for dead and made again elsewhere"},
    )
    kv_replicas: int = field(default=1, metadata={"min": 1, "help": "replicas of the KV buckets and the usage stream, when they are created (3 in a production cluster)"})
    tiers_file: str = field(default="", metadata={"help": "TOML file overriding the tiers' limits (see the README); give every service the same one"})
    log_format: str = field(default="text", metadata={"choices": ("text", "json"), "help": "log lines as text, or as one JSON object per line (for a log collector)"})
    log_level: str = field(default="info", metadata={"choices": ("debug", "info", "warning", "error"), "help": "the least severe level logged"})

    def __post_init__(self) -> None:
        check_fields(self)

    def described(self) -> str:
        """The settings in one readable line, secrets masked: `name=value, …`."""
        return ", ".join(f"{name}={value}" for name, value in self.redacted().items())

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logs."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = "***" if value else ""
            elif f.metadata.get("url"):
                value = redact_urls(value)
            out[f.name] = value
        return out


def redact_urls(urls: str) -> str:
    """`urls` (comma-separated) with any password or token in them masked, for logs."""
    masked = []
    for url in urls.split(","):
        scheme, sep, rest = url.strip().partition("://")
        userinfo, at, host = rest.rpartition("@")
        if sep and at:
            user, colon, _ = userinfo.partition(":")
            userinfo = f"{user}:***" if colon else "***"
            url = f"{scheme}://{userinfo}@{host}"
        masked.append(url.strip())
    return ",".join(masked)


_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
_BOOL_WORDS = "true|false (also 1|0, yes|no, on|off)"


def nats_url_problem(urls: str) -> str | None:
    """Why `urls` (comma-separated NATS server URLs) cannot be used, or None if it can.

    Caught at start: nats-py would otherwise retry a malformed URL forever."""
    listed = [u.strip() for u in urls.split(",")]
    if not any(listed):
        return "nats_url is empty: give a NATS server URL such as nats://127.0.0.1:4222"
    for url in listed:
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port  # raises ValueError if out of range or not a number
        except ValueError as exc:
            return f"nats_url {redact_urls(url)!r} is not a usable URL ({exc})"
        if parsed.scheme not in _NATS_SCHEMES or not parsed.hostname:
            return (
                f"nats_url {redact_urls(url)!r} is not a NATS server URL: "
                f"expected {'|'.join(_NATS_SCHEMES)}://HOST[:PORT], e.g. nats://127.0.0.1:4222"
            )
        if port == 0:
            return f"nats_url {redact_urls(url)!r}: port 0 is not a server's port"
    return None


def check_fields(settings: Any) -> None:
    """Check what field metadata declares (`url`: NATS URLs; `port`: 0–65535; `min`: a
    lower bound; `choices`: the values allowed); raise ValueError naming the setting, its flag and its variable."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        where = f"{f.name} (--{f.name.replace('_', '-')} / RELAY_{f.name.upper()})"
        if f.metadata.get("url"):
            problem = nats_url_problem(value)
            if problem:
                raise ValueError(problem.replace("nats_url", where, 1))
        if f.metadata.get("port") and not 0 <= value <= 65_535:
            raise ValueError(f"{where} must be a port number from 0 to 65535, got {value}")
        if "min" in f.metadata and value < f.metadata["min"]:
            raise ValueError(f"{where} must be at least {f.metadata['min']}, got {value}")
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ValueError(f"{where} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")


def load_settings(
    cls: type[Any], argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, prog: str | None = None
) -> Any:
    """Build a settings dataclass `cls` from flags (`argv`) over environment (`environ`) over defaults."""
    parser = settings_parser(prog, cls.__doc__)
    add_setting_flags(parser, cls)
    return settings_from_args(cls, parser, parser.parse_args(argv), environ)


def settings_parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    """An argument parser whose errors are one line (argparse's usage line of forty flags
    would bury the reason) and whose help ends with where settings come from."""
    parser = OneLineErrorParser(
        prog=prog,
        description=description,
        usage="%(prog)s [options]",
        epilog="Each option can also be set by the environment variable named beside it; a flag wins over the variable.",
    )
    return parser


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad command line in one line, then exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def add_setting_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[Any]) -> None:
    """Add a `--name-with-dashes` flag for each field of `cls` (for tools with their own parser)."""
    for f in dataclasses.fields(cls):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=_metavar(f),
            help=f"{f.metadata.get('help', '')} [default: {_shown_default(f)}; env RELAY_{f.name.upper()}]".replace("%", "%%"),
        )


def _kind(f: dataclasses.Field[Any]) -> type:
    return f.type if isinstance(f.type, type) else {"int": int, "str": str, "float": float, "bool": bool}.get(str(f.type), str)


def _metavar(f: dataclasses.Field[Any]) -> str:
    if "metavar" in f.metadata:
        return f.metadata["metavar"]
    kind = _kind(f)
    if kind is bool:
        return "true|false"
    return {int: "N", float: "X"}.get(kind, f.name.split("_")[-1].upper())


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        default = f.default
        if isinstance(default, bool):
            return "true" if default else "false"
        return repr(default) if default == "" else str(default)
    return f.metadata.get("default_help", "computed at start")


def settings_from_args(
    cls: type[Any], parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> Any:
    """`cls` from parsed flags over `RELAY_*` variables over defaults; a bad value exits via `parser.error`."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(f"RELAY_{f.name.upper()}")
        if raw is None or raw == "":
            continue
        kind = _kind(f)
        try:
            values[f.name] = _parse(kind, raw)
        except ValueError:
            expected = _BOOL_WORDS if kind is bool else {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
            parser.error(f"--{f.name.replace('_', '-')} / RELAY_{f.name.upper()}: expected {expected}, got {raw!r}")
    try:
        return cls(**values)
    except ValueError as exc:
        parser.error(str(exc))


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    return kind(raw)
