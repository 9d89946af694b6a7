"""Everything a running gateway holds, loaded and checked before it listens.

Loading is all-or-nothing: geo data, then the policy against the facts that
data can provide, then upstreams and their keys. Any problem raises a
:class:`ConfigError` that says which file and what is wrong, and nothing is
served until all of it is good.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .accesslog import MAX_PENDING, AccessLog, AddressMode, AddressRedactor
from .authz.config import HTTP_CONTRACTS, AuthzConfig, blind_rules, parse_config, unenforced_budgets
from .cidrs import CidrSet
from .clientip import ClientIPConfig
from .dataplane.edge import Edge
from .dataplane.tls import Certificates, TlsError
from .evidence.chain import KEY_ENV, AuditKeyError, key_from_env
from .geo import Geo, GeoDataError
from .live.active import Active, PolicyVersion
from .policy import (
    DEFAULT_UPSTREAM_URL,
    Policy,
    UpstreamSpec,
    check_upstream_url,
    load_policy,
    parse_policy,
    plain_error,
)
from .policy.clientkeys import ClientKeyError
from .proxy.upstreams import UpstreamConfigError, UpstreamGroup, build_upstreams
from .reports import ReadyOut, ReloadStatusOut, WatcherOut, dump
from .shared.audit import Audit
from .shared.clientkeys import ClientKeys, open_keys
from .shared.redisconn import RedisConfigError
from .shared.store import OverrideStore, open_store
from .trust import WIDEST_PUBLIC, trusts_everyone, wide_public
from .yamlfile import FileError
from .yamlfile import read as read_yaml

DEFAULT_POLICY_NAME = "openai-supported-country-only.yaml"
# What OpenAI-compatible APIs use (GET, POST, DELETE), plus HEAD and OPTIONS
# (CORS preflight). TRACE would echo the injected upstream key back to the
# caller and CONNECT would open a tunnel, so neither can ever be allowed.
DEFAULT_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "DELETE")
NEVER_METHODS = frozenset({"TRACE", "CONNECT"})


class ConfigError(Exception):
    pass


class Settings(BaseModel):
    """``regiongate serve`` options; each has a ``REGIONGATE_*`` variable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str | None = None
    geoip: tuple[str, ...] = ()
    trusted_proxy: tuple[str, ...] = ()
    proxy_protocol_from: tuple[str, ...] = ()
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_trust_all: bool = False
    client_ip_header: str = "x-forwarded-for"
    upstream: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(9090, ge=0, le=65535)
    # Envoy's ext_authz over gRPC (gateway/authz/envoy_grpc.py; the envoy extra): off at port 0.
    authz_grpc_host: str = "127.0.0.1"
    authz_grpc_port: int = Field(0, ge=0, le=65535)
    authz_grpc_envoy_edge: bool = False
    workers: int = Field(1, ge=1, le=256)
    access_log: str = "-"
    access_log_buffer: int = Field(MAX_PENDING, ge=4096)
    log_address: AddressMode = "full"
    log_key: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    header_timeout: float = Field(10.0, gt=0)
    idle_timeout: float = Field(30.0, gt=0)
    max_connections: int = Field(0, ge=0)
    upstream_connections: int = Field(0, ge=0)
    upstream_keepalive: float = Field(4.0, gt=0)
    allow_methods: tuple[str, ...] = DEFAULT_METHODS
    shadow_policy: str | None = None
    watch: bool = True
    pid_file: str | None = None
    geoip_max_age: float | None = Field(None, gt=0, description="seconds")
    stale_geoip_not_ready: bool = False
    redis: str | None = None
    redis_prefix: str = Field("regiongate:", min_length=1, max_length=100)
    redis_timeout: float = Field(0.05, gt=0, le=5, description="seconds")
    keys_file: str | None = None
    audit: Literal["off", "refusals", "all"] = "refusals"
    record_usage: Literal["all", "budgeted"] = "all"
    audit_maxlen: int = Field(100_000, ge=100)
    authz_host: str = "127.0.0.1"
    authz_port: int | None = Field(None, ge=0, le=65535)
    authz_client_header: tuple[str, ...] = ()
    authz_body: tuple[str, ...] = ()

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str | None) -> str | None:
        return check_upstream_url(v) if v else v

    @field_validator("geoip_max_age", mode="before")
    @classmethod
    def _max_age(cls, v: object) -> object:
        return parse_duration(v) if isinstance(v, str) else v


def shipped_policies_dir() -> Path:
    """The policies shipped with Regiongate: inside the wheel (``gateway/policies``), or in the source tree."""
    packaged = resources.files("gateway") / "policies"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "policies"


def default_policy_path() -> str:
    """The shipped country-only OpenAI policy."""
    return str(shipped_policies_dir() / DEFAULT_POLICY_NAME)


def load_geo(paths: tuple[str, ...] | list[str]) -> Geo:
    try:
        return Geo(list(paths))
    except GeoDataError as e:
        raise ConfigError(str(e)) from None


def load_checked_policy(path: str | None, geo: Geo) -> Policy:
    try:
        return load_policy(path or default_policy_path(), geo.capabilities)
    except FileError as e:
        raise ConfigError(e.render()) from None


def read_policy_text(path: str) -> str:
    try:
        return read_yaml(path)
    except FileError as e:
        raise ConfigError(e.render()) from None


def compile_policy_text(text: str, path: str, geo: Geo) -> PolicyVersion:
    """Compile policy text against what the loaded geo data can answer. Raises ``ConfigError``."""
    try:
        policy = parse_policy(text, path, geo.capabilities)
    except FileError as e:
        raise ConfigError(e.render()) from None
    return PolicyVersion(policy, text, time.time())


def read_policy(path: str, geo: Geo) -> PolicyVersion:
    return compile_policy_text(read_policy_text(path), path, geo)


def resolve_upstreams(policy: Policy, settings: Settings, env: dict[str, str]) -> dict[str, UpstreamGroup]:
    """The policy's upstreams plus ``--upstream`` as ``default``, keys read from ``env``."""
    specs = dict(policy.upstreams)
    if settings.upstream:
        if "default" in specs:
            raise ConfigError(
                f"{policy.source}: the policy defines upstream 'default'; remove --upstream "
                "(REGIONGATE_UPSTREAM) or that entry"
            )
        try:
            specs["default"] = UpstreamSpec(url=settings.upstream)
        except ValidationError as e:  # its text would repeat the URL, and a password in it
            raise ConfigError(f"--upstream: {plain_error(e.errors()[0])}") from None
    elif "default" not in specs:
        if specs:
            raise ConfigError(f"{policy.source}: upstreams must include one named 'default'")
        specs["default"] = UpstreamSpec(url=DEFAULT_UPSTREAM_URL)
    try:
        return build_upstreams(specs, env)
    except UpstreamConfigError as e:
        raise ConfigError(f"{policy.source}: {e}") from None


@dataclass
class ReloadStatus:
    """How the last attempt to load one file went; what ``/readyz`` reports."""

    attempted_at: float | None = None
    error: str | None = None  # the refused candidate's problems, while it is still on disk
    refused_sha256: str | None = None

    def report(self) -> ReloadStatusOut:
        return ReloadStatusOut(attempted_at=self.attempted_at, error=self.error)


@dataclass
class WatcherStatus:
    """The file watcher's health, as ``/readyz`` reports it: a watcher that died is restarted, and said so."""

    enabled: bool = True
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    failed_at: float | None = None
    restart_at: float | None = None  # while down: when it is started again

    def report(self) -> WatcherOut:
        """What ``/readyz`` says of the watcher."""
        return WatcherOut(
            enabled=self.enabled,
            running=self.running,
            restarts=self.restarts,
            last_error=self.last_error,
            failed_at=self.failed_at,
        )

    def warning(self) -> str | None:
        if not self.enabled or self.running or self.last_error is None:
            return None
        return (
            f"the file watcher failed ({self.last_error}) and is being restarted: edits to the policy and GeoIP "
            "files are not noticed until it is back (SIGHUP or POST /admin/reload load them now)"
        )


@dataclass
class Runtime:
    settings: Settings
    geo: Geo
    active: Active
    clientip: ClientIPConfig
    access_log: AccessLog
    started: float = field(default_factory=time.time)
    ready: bool = False
    warnings: list[str] = field(default_factory=list)
    policy_status: ReloadStatus = field(default_factory=ReloadStatus)
    shadow_status: ReloadStatus = field(default_factory=ReloadStatus)
    geo_errors: dict[str, str] = field(default_factory=dict)  # path -> why its replacement was refused
    watcher: WatcherStatus = field(default_factory=WatcherStatus)
    allow_methods: frozenset[str] = frozenset(DEFAULT_METHODS)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # holds upstream keys: never shown
    overrides: OverrideStore = field(default_factory=lambda: OverrideStore({}), repr=False)
    client_keys: ClientKeys = field(default_factory=ClientKeys, repr=False)  # the gateway's own callers
    audit: Audit = field(default_factory=lambda: Audit("off", 0), repr=False)  # needs Redis
    edge: Edge | None = None  # TLS and PROXY protocol on the proxy port; None: plain HTTP from the TCP peer
    authz: AuthzConfig | None = None  # the decision service (--authz-port); None: off

    @property
    def policy(self) -> Policy:
        return self.active.policy

    @property
    def upstreams(self) -> dict[str, UpstreamGroup]:
        return dict(self.active.upstreams)

    def upstream_urls(self) -> dict[str, str | list[str]]:
        """Each upstream's base URL (a list for a group of several); never a key, never credentials."""
        return {
            name: g.members[0].base if len(g.members) == 1 else [m.base for m in g.members]
            for name, g in self.active.upstreams.items()
        }

    @property
    def policy_path(self) -> str:
        return self.settings.policy or default_policy_path()

    def stale_geo(self, now: float | None = None) -> list[str]:
        """Databases past ``--geoip-max-age`` (embedded data has no build date worth judging)."""
        limit = self.settings.geoip_max_age
        if limit is None:
            return []
        now = time.time() if now is None else now
        return [
            f"GeoIP database {s.type} ({s.path}) is stale: built {(now - s.build_epoch) / 86400:.1f} days ago, "
            f"past --geoip-max-age {format_duration(limit)}"
            for s in self.geo.sources
            if s.path is not None and now - s.build_epoch > limit
        ]

    def is_ready(self) -> bool:
        return self.ready and not (self.settings.stale_geoip_not_ready and self.stale_geo())

    def describe(self) -> dict[str, Any]:
        """What ``/readyz`` shows (:class:`~gateway.reports.ReadyOut`): which policy and data are in force."""
        now = time.time()
        current, shadow = self.active.current, self.active.shadow_version
        warnings = list(self.warnings)
        if self.policy_status.error:
            warnings.append(f"policy reload refused, still serving sha256:{current.tag}: {self.policy_status.error}")
        if self.shadow_status.error:
            warnings.append(f"shadow policy reload refused: {self.shadow_status.error}")
        warnings += [f"GeoIP reload refused, old data still serving: {e}" for e in self.geo_errors.values()]
        down = self.watcher.warning()
        if down:
            warnings.append(down)
        warnings += self.client_keys.warnings()
        warnings += policy_warnings(self.policy, self.client_keys.backend)
        tls = self.edge.tls if self.edge is not None else None
        if tls is not None and tls.error:
            warnings.append(f"TLS certificate reload refused, the previous certificate keeps serving: {tls.error}")
        stale = self.stale_geo(now)
        warnings += stale
        ready = {
            "ready": self.is_ready(),
            "pid": os.getpid(),
            "policy": {
                "path": self.policy.source,
                "sha256": self.policy.sha256,
                "version": current.version,
                "loaded_at": current.loaded_at,
                "rules": len(self.policy.rules),
                "mode": self.policy.spec.mode,
                "reload": self.policy_status.report(),
            },
            "shadow_policy": None
            if shadow is None
            else {
                "path": shadow.policy.source,
                "sha256": shadow.sha256,
                "version": shadow.version,
                "loaded_at": shadow.loaded_at,
                "reload": self.shadow_status.report(),
            },
            "geo": [
                s.as_dict() | ({"age_seconds": round(now - s.build_epoch)} if s.path else {}) for s in self.geo.sources
            ],
            "geo_stale": bool(stale),
            "watcher": self.watcher.report(),
            "embedded_geo": self.geo.embedded,
            "upstreams": self.upstream_urls(),
            "trusted_proxies": [str(n) for n in self.clientip.trusted.networks],
            "client_ip_header": self.clientip.header,
            "overrides": self.overrides.describe(),
            "client_keys": self.client_keys.describe(),
            "audit": {"mode": self.audit.mode, "dropped": self.audit.dropped, "written": self.audit.written},
            "warnings": warnings,
        }
        return dump(ReadyOut.model_validate(ready))


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``45d``, ``12h``, ``30m``, ``90s``, ``2w`` or plain seconds."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 45d, 12h, 30m, 90s)") from None
    if value <= 0:
        raise ValueError(f"{text!r}: must be more than zero")
    return value


def format_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


EMBEDDED_WARNING = (
    "no --geoip database configured: using the embedded iptocc country data (countries only; "
    "subdivision, ASN and anonymizer rules need MaxMind-format databases)"
)


def load_runtime(settings: Settings, env: dict[str, str] | None = None) -> Runtime:
    env = dict(os.environ) if env is None else env
    geo = load_geo(settings.geoip)
    current = read_policy(settings.policy or default_policy_path(), geo)
    upstreams = resolve_upstreams(current.policy, settings, env)
    shadow = read_policy(settings.shadow_policy, geo) if settings.shadow_policy else None
    try:
        trusted = CidrSet(settings.trusted_proxy)
    except ValueError as e:
        raise ConfigError(f"--trusted-proxy: {e}") from None
    trust_warnings = _check_trust(trusted, settings.allow_trust_all)
    edge, edge_warnings = load_edge(settings)
    header = settings.client_ip_header.strip().lower()
    if not header or not all(c.isalnum() or c == "-" for c in header):
        raise ConfigError(f"--client-ip-header: {settings.client_ip_header!r} is not a header name")
    key = settings.log_key.encode() if settings.log_key else None
    try:
        access_log = AccessLog(
            settings.access_log, AddressRedactor(settings.log_address, key), settings.access_log_buffer
        )
    except OSError as e:
        raise ConfigError(f"--access-log {settings.access_log!r}: {e}") from None
    methods = frozenset(m.strip().upper() for m in settings.allow_methods if m.strip())
    for m in sorted(methods):
        if m in NEVER_METHODS:
            raise ConfigError(f"--allow-method: {m} is never allowed (it exposes the upstream key or opens a tunnel)")
        if not m.isascii() or not m.isalpha():
            raise ConfigError(f"--allow-method: {m[:32]!r} is not an HTTP method")
    if not methods:
        raise ConfigError("--allow-method: at least one method must be allowed")
    try:
        overrides = open_store(
            settings.redis, settings.redis_prefix, settings.redis_timeout, env,
            hash_addresses=settings.log_address != "full",  # no address kept in Redis that the logs would not show
        )  # fmt: skip
        client_keys = open_keys(settings.keys_file, overrides)
    except (RedisConfigError, ClientKeyError) as e:
        raise ConfigError(str(e)) from None
    try:
        audit_key = key_from_env(env)
    except AuditKeyError as e:
        raise ConfigError(str(e)) from None
    audit_mode = settings.audit if settings.redis else "off"
    authz = None
    if settings.authz_port is not None:
        try:
            authz = parse_config(settings.authz_client_header, settings.authz_body)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif settings.port == 0 and not settings.authz_grpc_port:
        raise ConfigError(
            "--port 0 turns the proxy port off: give --authz-port or --authz-grpc-port, or there is nothing to serve"
        )
    runtime = Runtime(
        authz=authz,
        audit=Audit(audit_mode, settings.audit_maxlen, audit_key),
        overrides=overrides,
        client_keys=client_keys,
        allow_methods=methods,
        settings=settings,
        geo=geo,
        active=Active(current, upstreams, shadow),
        clientip=ClientIPConfig(trusted, header),
        access_log=access_log,
        env=env,
        watcher=WatcherStatus(enabled=settings.watch),
        edge=edge,
    )
    if geo.embedded:
        runtime.warnings.append(EMBEDDED_WARNING)
    if not trusted:
        runtime.warnings.append("no --trusted-proxy: forwarding headers are ignored, the TCP peer is the client")
    runtime.warnings += trust_warnings + edge_warnings
    if audit_mode != "off" and audit_key is None:
        runtime.warnings.append(
            f"no {KEY_ENV}: audit entries are numbered but not signed, so `regiongate audit verify` cannot "
            "show that they are unaltered"
        )
    if authz is not None:
        runtime.warnings += blind_rules(current.policy, (c for c in HTTP_CONTRACTS if c not in authz.bodies))
        runtime.warnings += unenforced_budgets(current.policy, HTTP_CONTRACTS)
    if settings.workers > 1 and not settings.redis:
        runtime.warnings.append(
            f"--workers {settings.workers} without --redis: each worker keeps its own runtime overrides, and one "
            "added through the admin API reaches only the worker that answered; use --redis"
        )
    return runtime


def load_edge(settings: Settings) -> tuple[Edge | None, list[str]]:
    """TLS and PROXY protocol for the proxy port, checked now: a bad pair or CIDR stops the start."""
    cert, key = settings.tls_cert, settings.tls_key
    if bool(cert) != bool(key):
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        raise ConfigError(f"{given} needs {missing} too (REGIONGATE_TLS_CERT and REGIONGATE_TLS_KEY)")
    try:
        tls = Certificates(cert, key) if cert and key else None
    except TlsError as e:
        raise ConfigError(str(e)) from None
    warnings: list[str] = []
    peers = [c for entry in settings.proxy_protocol_from for c in entry.split(",") if c.strip()]
    try:
        proxy_from = CidrSet(peers) if peers else None
    except ValueError as e:
        raise ConfigError(f"--proxy-protocol-from: {e}") from None
    if proxy_from is not None:
        everyone = trusts_everyone(proxy_from)
        if everyone and not settings.allow_trust_all:
            raise ConfigError(
                f"--proxy-protocol-from {', '.join(peers)}: every public address could then say where its "
                "connection came from; name the load balancers' own networks, or add --allow-trust-all"
            )
        warnings += [
            f"--proxy-protocol-from {net} is a public range wider than /{WIDEST_PUBLIC[net.version]}: "
            "any caller in it can choose its address"
            for net in wide_public(proxy_from)
        ]
    if tls is None and proxy_from is None:
        return None, warnings
    return Edge(tls, proxy_from), warnings


def _check_trust(trusted: CidrSet, allow_all: bool) -> list[str]:
    """Refuse a trusted-proxy list that trusts everyone (unless told to); warn about wide public blocks."""
    warnings = []
    everyone = trusts_everyone(trusted)
    if everyone:
        families = " and ".join(f"IPv{v}" for v in everyone)
        nets = ", ".join(str(n) for n in trusted.networks if n.version in everyone)
        if not allow_all:
            raise ConfigError(
                f"--trusted-proxy {nets}: trusts every public {families} address, so any caller could choose "
                "its country; name the proxies' own networks, or add --allow-trust-all "
                "(REGIONGATE_ALLOW_TRUST_ALL=1) if this is really meant"
            )
        warnings.append(
            f"--trusted-proxy {nets} trusts every public {families} address (--allow-trust-all): "
            "any caller can choose its country"
        )
    for net in wide_public(trusted):
        if net.version not in everyone:
            warnings.append(
                f"--trusted-proxy {net} is a public range wider than /{WIDEST_PUBLIC[net.version]}: "
                "any caller in it can choose its country"
            )
    return warnings


def policy_warnings(policy: Policy, keys_backend: str) -> list[str]:
    """What the policy in force loads with but likely does not mean (``regiongate check``'s warnings, with
    file and line), shown by ``/readyz`` for whichever policy a reload put in force; and a policy that
    requires client keys where no key store is configured, which refuses every such request with a 401."""
    out = [
        f"{policy.source}:{w.line}: {w.message}" if w.line is not None else f"{policy.source}: {w.message}"
        for w in policy.warnings
    ]
    if keys_backend == "off" and (policy.client_keys_required or any(r.decision.client_keys for r in policy.rules)):
        out.append(
            f"{policy.source}: client_keys: required, but no key store is configured (--redis or --keys-file): "
            "every request that needs a client key is refused with 401 invalid_api_key"
        )
    return out
