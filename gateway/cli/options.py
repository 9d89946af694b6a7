"""The ``serve`` options as data: flag, environment variable, default as shown, help.

``serve`` takes every :class:`~gateway.runtime.Settings` field as a flag and
as a ``REGIONGATE_*`` variable (flags win); repeatable flags take a
comma-separated list in their variable. ``check``, ``explain`` and ``diff``
take some of the same options, so that what they say is what a running
gateway with those flags would do. The parsers and ``docs/reference/cli.md``
(:mod:`gateway.cli.reference`) are both built from :data:`SERVE_OPTIONS`.

The flags default to None so that a flag given beats its variable, which
beats the default in :class:`~gateway.runtime.Settings`; help shows that
default, never the variable's value (it may be --log-key).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "REGIONGATE_"
# What check and explain say of themselves: they judge from files, not by asking a gateway.
LOCAL_HELP = (
    "It reads the policy and geo data itself: it does not ask a running gateway, so give it the "
    "same --policy/--geoip as the gateway (compare the sha256 with /readyz)."
)


def env(name: str, default: Any = None) -> Any:
    """``REGIONGATE_<name>``, or ``default``."""
    return os.environ.get(ENV_PREFIX + name, default)


def env_list(name: str) -> list[str]:
    """``REGIONGATE_<name>`` as a comma-separated list."""
    return split_list(os.environ.get(ENV_PREFIX + name, ""))


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True, slots=True)
class Option:
    """One ``serve`` option: its flag, the Settings field it sets, its help, and its default in words."""

    flag: str
    dest: str  # the Settings field
    help: str
    default: str  # as shown in --help and the reference: the Settings default, in words
    listed: bool = False  # repeatable; its variable takes a comma-separated list
    env: str = ""  # the variable, when it is not REGIONGATE_<DEST>
    action: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def variable(self) -> str:
        return self.env or ENV_PREFIX + self.dest.upper()

    def help_text(self) -> str:
        """What ``--help`` says: the help, then the variable and the default."""
        listed = ", comma-separated" if self.listed else ""
        return f"{self.help} (env {self.variable}{listed}; default: {self.default})"

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        kwargs: dict[str, Any] = {}
        if self.action is not None:
            kwargs["action"] = self.action
        if self.metavar is not None:
            kwargs["metavar"] = self.metavar
        if self.choices is not None:
            kwargs["choices"] = list(self.choices)
        parser.add_argument(self.flag, dest=self.dest, default=None, help=self.help_text(), **kwargs)


SERVE_OPTIONS: tuple[Option, ...] = (
    Option(
        flag="--policy",
        dest="policy",
        help="policy YAML",
        default="the shipped country-only OpenAI policy",
        metavar="FILE",
    ),
    Option(
        flag="--geoip",
        dest="geoip",
        help="MaxMind-format database, repeatable",
        default="the embedded iptocc country data",
        listed=True,
        action="append",
        metavar="MMDB",
    ),
    Option(
        flag="--trusted-proxy",
        dest="trusted_proxy",
        help="peer allowed to set the client address header, repeatable",
        default="nobody",
        listed=True,
        action="append",
        metavar="CIDR",
    ),
    Option(
        flag="--proxy-protocol-from",
        dest="proxy_protocol_from",
        help=(
            "load balancer that must open every connection with a PROXY protocol v1/v2 header, whose address then "
            "stands for the TCP peer; repeatable or comma-separated"
        ),
        default="nobody",
        listed=True,
        action="append",
        metavar="CIDR",
    ),
    Option(
        flag="--tls-cert",
        dest="tls_cert",
        help="PEM certificate chain: the proxy port speaks TLS 1.2+ (ALPN http/1.1); reloaded when the file changes",
        default="none: plain HTTP",
        metavar="FILE",
    ),
    Option(flag="--tls-key", dest="tls_key", help="PEM private key of --tls-cert", default="none", metavar="FILE"),
    Option(
        flag="--client-ip-header",
        dest="client_ip_header",
        help="X-Forwarded-For, Forwarded, or a single-value header like CF-Connecting-IP",
        default="X-Forwarded-For",
        metavar="NAME",
    ),
    Option(
        flag="--upstream",
        dest="upstream",
        help=(
            "URL of the upstream named 'default' when the policy defines none; no credentials in it (a key goes "
            "in a policy upstream's api_key_env)"
        ),
        default="https://api.openai.com",
        metavar="URL",
    ),
    Option(flag="--host", dest="host", help="proxy listen address", default="127.0.0.1", metavar="ADDRESS"),
    Option(
        flag="--port",
        dest="port",
        help="proxy listen port; 0: no proxy port (--authz-port alone)",
        default="8080",
        metavar="PORT",
    ),
    Option(
        flag="--admin-host",
        dest="admin_host",
        help="control-plane listen address",
        default="127.0.0.1",
        metavar="ADDRESS",
    ),
    Option(
        flag="--admin-port",
        dest="admin_port",
        help="control-plane listen port: /healthz /readyz /metrics",
        default="9090",
        metavar="PORT",
    ),
    # --- Envoy's ext_authz over gRPC (docs/edges/envoy.md) ---
    Option(
        flag="--authz-grpc-port",
        dest="authz_grpc_port",
        help=(
            "serve Envoy's ext_authz gRPC decision service (envoy.service.auth.v3.Authorization/Check, and "
            "grpc.health.v1) on this port; 0: off. Needs the envoy extra: pip install 'regiongate[envoy]'"
        ),
        default="0 (off)",
        metavar="PORT",
    ),
    Option(
        flag="--authz-grpc-host",
        dest="authz_grpc_host",
        help="listen address of --authz-grpc-port; only Envoy may reach it (a caller there can name any client)",
        default="127.0.0.1",
        metavar="ADDRESS",
    ),
    Option(
        flag="--authz-grpc-envoy-edge",
        dest="authz_grpc_envoy_edge",
        help=(
            "Envoy is the edge (use_remote_address: true): the client is the x-envoy-external-address Envoy "
            "writes, not the CheckRequest's source address"
        ),
        default="off",
        action="store_true",
    ),
    Option(
        flag="--authz-host",
        dest="authz_host",
        help="decision service listen address (docs/edges)",
        default="127.0.0.1",
        metavar="ADDRESS",
    ),
    Option(
        flag="--authz-port",
        dest="authz_port",
        help=(
            "decision service listen port: /authz/forward (Traefik, Caddy), /authz/nginx (auth_request), "
            "/authz/envoy (ext_authz HTTP); with --port 0, the decision service alone"
        ),
        default="off",
        metavar="PORT",
    ),
    Option(
        flag="--authz-client-header",
        dest="authz_client_header",
        help=(
            "CONTRACT=HEADER: the header that carries the client for a contract of the decision service "
            "(forward, nginx, envoy_http), walked from the right past --trusted-proxy and the calling proxy"
        ),
        default="forward=x-forwarded-for nginx=x-forwarded-for envoy_http=x-envoy-external-address",
        listed=True,
        action="append",
        metavar="CONTRACT=HEADER",
    ),
    Option(
        flag="--authz-body",
        dest="authz_body",
        help=(
            "a contract whose proxy sends the request body (Traefik forwardBody, Envoy with_request_body), "
            "repeatable; through any other, model rules see an unknown model, and serve and check warn"
        ),
        default="none",
        listed=True,
        action="append",
        metavar="CONTRACT",
    ),
    Option(
        flag="--allow-trust-all",
        dest="allow_trust_all",
        help=(
            "accept a --trusted-proxy list that covers every public address (refused without it: then any caller "
            "can choose its country)"
        ),
        default="off",
        action="store_true",
    ),
    Option(flag="--workers", dest="workers", help="worker processes", default="1", metavar="N"),
    Option(
        flag="--access-log",
        dest="access_log",
        help="'-' for stdout, 'off', or a file to append to",
        default="-",
        metavar="DEST",
    ),
    Option(
        flag="--access-log-buffer",
        dest="access_log_buffer",
        help="log bytes that may wait for a slow log destination; past it lines are dropped and counted",
        default="8388608 (8 MiB)",
        metavar="BYTES",
    ),
    Option(
        flag="--allow-method",
        dest="allow_methods",
        help="HTTP method forwarded upstream, repeatable; others get a 405; TRACE and CONNECT are never allowed",
        default="GET HEAD OPTIONS POST DELETE",
        listed=True,
        action="append",
        metavar="METHOD",
    ),
    Option(
        flag="--log-address",
        dest="log_address",
        help="how the access log writes client addresses",
        default="full",
        choices=("full", "truncated", "hashed"),
    ),
    Option(
        flag="--log-key",
        dest="log_key",
        help="key for --log-address hashed, so hashes are stable across restarts",
        default="a random key per start",
        metavar="KEY",
    ),
    Option(
        flag="--shadow-policy",
        dest="shadow_policy",
        help=(
            "a candidate policy judged beside the active one on every request, never enforced; reloaded like the policy"
        ),
        default="none",
        metavar="FILE",
    ),
    Option(
        flag="--no-watch",
        dest="watch",
        help="do not watch the policy and GeoIP files; reload only on SIGHUP or POST /admin/reload (variable: 0 or 1)",
        default="watch",
        action="store_false",
    ),
    Option(
        flag="--pid-file",
        dest="pid_file",
        help="write the supervising process's pid here (the one SIGHUP reloads), removed at exit",
        default="none",
        metavar="FILE",
    ),
    Option(
        flag="--geoip-max-age",
        dest="geoip_max_age",
        help="a GeoIP database built longer ago than this (45d, 12h, 30m, 90s) is reported stale in /readyz",
        default="none: never stale",
        metavar="AGE",
    ),
    Option(
        flag="--stale-geoip-not-ready",
        dest="stale_geoip_not_ready",
        help="stale GeoIP data makes /readyz answer 503",
        default="off: stale is a warning",
        action="store_true",
    ),
    Option(
        flag="--header-timeout",
        dest="header_timeout",
        help="seconds a client may take to send a request's headers",
        default="10",
    ),
    Option(
        flag="--idle-timeout",
        dest="idle_timeout",
        help="seconds a client connection may stay open with no request",
        default="30",
    ),
    Option(
        flag="--max-connections",
        dest="max_connections",
        help="concurrent proxy connections",
        default="0: as many as the open-file limit allows with room for the control plane",
        metavar="N",
    ),
    Option(
        flag="--upstream-connections",
        dest="upstream_connections",
        help="connections per upstream, busy and idle",
        default="0: as many as proxy connections",
        metavar="N",
    ),
    Option(
        flag="--upstream-keepalive",
        dest="upstream_keepalive",
        help="seconds an idle upstream connection is kept; keep it below the upstream's own keep-alive timeout",
        default="4",
    ),
    Option(
        flag="--redis",
        dest="redis",
        help=(
            "Redis shared by every replica for runtime overrides: redis://host:6379/0, rediss:// (TLS), "
            "unix:///path.sock, redis+sentinel://host:26379,host:26379/service, "
            "redis+cluster://host:7000,host:7001; no password in it (REGIONGATE_REDIS_PASSWORD)"
        ),
        default="none: overrides live in this process's memory",
        env="REGIONGATE_REDIS_URL",
        metavar="URL",
    ),
    Option(
        flag="--redis-prefix",
        dest="redis_prefix",
        help="prefix of every Redis key, so several gateways can share one Redis",
        default="regiongate:",
        metavar="PREFIX",
    ),
    Option(
        flag="--redis-timeout",
        dest="redis_timeout",
        help="seconds a Redis call may take before it counts as failed (the request path never waits on Redis)",
        default="0.05",
        metavar="SECONDS",
    ),
    Option(
        flag="--keys-file",
        dest="keys_file",
        help=(
            "the gateway's client keys (regiongate keys) in this file, for a gateway without --redis: "
            "written with mode 0600, read again when it changes; with --redis they are kept in Redis"
        ),
        default="none: client keys in Redis with --redis, else none",
        metavar="PATH",
    ),
    Option(
        flag="--audit",
        dest="audit",
        help="what goes to the Redis audit stream <prefix>audit (needs --redis)",
        default="refusals",
        choices=("off", "refusals", "all"),
    ),
    Option(
        flag="--record-usage",
        dest="record_usage",
        help=(
            "which forwarded requests are read for the provider's token usage (regiongate_tokens_total,"
            " the access log's usage fields): all on a known usage path, or only those a token budget limits"
        ),
        default="all",
        choices=("all", "budgeted"),
    ),
    Option(
        flag="--audit-maxlen",
        dest="audit_maxlen",
        help="the audit stream is capped at about this many entries (XADD MAXLEN ~)",
        default="100000",
        metavar="N",
    ),
    Option(
        flag="--log-level",
        dest="log_level",
        help="server log level (stderr)",
        default="warning",
        choices=("debug", "info", "warning", "error"),
    ),
)


def add_serve_options(parser: argparse.ArgumentParser, only: frozenset[str] | None = None) -> None:
    """The serve options (or those whose Settings field is in ``only``) on ``parser``."""
    for option in SERVE_OPTIONS:
        if only is None or option.dest in only:
            option.add_to(parser)


def add_redis_options(parser: argparse.ArgumentParser) -> None:
    """``--redis`` and ``--redis-prefix``, for the commands that read or write a gateway's Redis themselves."""
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=env("REDIS_URL"),
        help="Redis, as serve --redis (env REGIONGATE_REDIS_URL; password in REGIONGATE_REDIS_PASSWORD)",
    )
    parser.add_argument("--redis-prefix", default=env("REDIS_PREFIX", "regiongate:"), help="as serve --redis-prefix")


def serve_values(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The serve options given as flags or variables, and where each came from."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in SERVE_OPTIONS:
        dest = option.dest
        given = getattr(args, dest, None)
        if given is not None:
            values[dest], sources[dest] = given, option.flag
            continue
        text = os.environ.get(option.variable, "")
        if text.strip():
            values[dest] = split_list(text) if option.listed else text
            sources[dest] = option.variable
    return values, sources


def geoip(args: argparse.Namespace) -> list[str]:
    """``--geoip``, else ``REGIONGATE_GEOIP``."""
    given: list[str] | None = args.geoip
    return given if given is not None else env_list("GEOIP")


def policy_path(args: argparse.Namespace) -> str | None:
    """``--policy``, else ``REGIONGATE_POLICY``."""
    given: str | None = args.policy
    return given if given is not None else (env("POLICY") or None)
