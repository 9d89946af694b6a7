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

from pydantic import BaseModel, ConfigDict, Field

from .accesslog import AccessLog, AddressMode, AddressRedactor
from .cidrs import CidrSet
from .clientip import ClientIPConfig
from .geo import Geo, GeoDataError
from .policy import DEFAULT_UPSTREAM_URL, Policy, UpstreamSpec, load_policy
from .upstream import Upstream, UpstreamConfigError, build_upstreams
from .yamlfile import FileError

DEFAULT_POLICY_NAME = "openai-supported-country-only.yaml"


class ConfigError(Exception):
    pass


class Settings(BaseModel):
    """``regiongate serve`` options; each has a ``REGIONGATE_*`` variable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str | None = None
    geoip: tuple[str, ...] = ()
    trusted_proxy: tuple[str, ...] = ()
    client_ip_header: str = "x-forwarded-for"
    upstream: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(9090, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    access_log: str = "-"
    log_address: AddressMode = "full"
    log_key: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    data_plane: Literal["native", "asgi"] = "native"
    header_timeout: float = Field(10.0, gt=0)
    idle_timeout: float = Field(30.0, gt=0)
    max_connections: int = Field(0, ge=0)
    upstream_connections: int = Field(0, ge=0)
    upstream_keepalive: float = Field(4.0, gt=0)


def default_policy_path() -> str:
    """The shipped country-only OpenAI policy: inside the wheel, or in the source tree."""
    packaged = resources.files("gateway") / "policies" / DEFAULT_POLICY_NAME
    if packaged.is_file():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "policies" / DEFAULT_POLICY_NAME)


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


@dataclass
class Runtime:
    settings: Settings
    geo: Geo
    policy: Policy
    clientip: ClientIPConfig
    upstreams: dict[str, Upstream]
    access_log: AccessLog
    started: float = field(default_factory=time.time)
    ready: bool = False
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """What ``/readyz`` shows: enough to tell which policy and data are in force."""
        return {
            "ready": self.ready,
            "pid": os.getpid(),
            "policy": {
                "path": self.policy.source,
                "sha256": self.policy.sha256,
                "rules": len(self.policy.rules),
                "mode": self.policy.spec.mode,
            },
            "geo": [s.as_dict() for s in self.geo.sources],
            "embedded_geo": self.geo.embedded,
            "upstreams": {name: up.base for name, up in self.upstreams.items()},
            "trusted_proxies": [str(n) for n in self.clientip.trusted.networks],
            "client_ip_header": self.clientip.header,
            "warnings": self.warnings,
        }


EMBEDDED_WARNING = (
    "no --geoip database configured: using the embedded iptocc country data (countries only; "
    "subdivision, ASN and anonymizer rules need MaxMind-format databases)"
)


def load_runtime(settings: Settings, env: dict[str, str] | None = None) -> Runtime:
    env = dict(os.environ) if env is None else env
    geo = load_geo(settings.geoip)
    policy = load_checked_policy(settings.policy, geo)
    specs = dict(policy.upstreams)
    if settings.upstream:
        if "default" in specs:
            raise ConfigError(
                f"{policy.source}: the policy defines upstream 'default'; remove --upstream "
                "(REGIONGATE_UPSTREAM) or that entry"
            )
        try:
            specs["default"] = UpstreamSpec(url=settings.upstream)
        except ValueError as e:
            raise ConfigError(f"--upstream {settings.upstream!r}: {e}") from None
    elif "default" not in specs:
        if specs:
            raise ConfigError(f"{policy.source}: upstreams must include one named 'default'")
        specs["default"] = UpstreamSpec(url=DEFAULT_UPSTREAM_URL)
    try:
        upstreams = build_upstreams(specs, env)
    except UpstreamConfigError as e:
        raise ConfigError(f"{policy.source}: {e}") from None
    try:
        trusted = CidrSet(settings.trusted_proxy)
    except ValueError as e:
        raise ConfigError(f"--trusted-proxy: {e}") from None
    header = settings.client_ip_header.strip().lower()
    if not header or not all(c.isalnum() or c == "-" for c in header):
        raise ConfigError(f"--client-ip-header: {settings.client_ip_header!r} is not a header name")
    key = settings.log_key.encode() if settings.log_key else None
    try:
        access_log = AccessLog(settings.access_log, AddressRedactor(settings.log_address, key))
    except OSError as e:
        raise ConfigError(f"--access-log {settings.access_log!r}: {e}") from None
    runtime = Runtime(
        settings=settings,
        geo=geo,
        policy=policy,
        clientip=ClientIPConfig(trusted, header),
        upstreams=upstreams,
        access_log=access_log,
    )
    if geo.embedded:
        runtime.warnings.append(EMBEDDED_WARNING)
    if not trusted:
        runtime.warnings.append("no --trusted-proxy: forwarding headers are ignored, the TCP peer is the client")
    return runtime
