"""The upstreams a policy configures, built for the data plane.

Joins the policy's upstream specs (:class:`gateway.policy.UpstreamSpec`) and
the data plane's targets (:mod:`gateway.dataplane.upstream`): API keys are
read from the environment here, once, so a missing one fails at startup (or
refuses a reload), and the specs' timeouts and health settings become the
data plane's own frozen dataclasses, so that :mod:`gateway.dataplane`
imports nothing from the policy. Config time only (startup and reload),
never per request. Part of the join (:mod:`gateway.proxy`): the one place
where policy specs become data-plane settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

from yarl import URL

from ..dataplane.limits import HealthSettings, UpstreamTimeouts
from ..dataplane.upstream import Upstream, UpstreamGroup
from ..policy import HealthSpec, Timeouts, UpstreamSpec

__all__ = ["UpstreamConfigError", "UpstreamGroup", "build_upstreams", "health", "timeouts"]


class UpstreamConfigError(Exception):
    pass


def timeouts(spec: Timeouts) -> UpstreamTimeouts:
    """The policy's ``timeouts:`` as the data plane reads them."""
    return UpstreamTimeouts(spec.connect, spec.first_byte, spec.idle, spec.total)


def health(spec: HealthSpec) -> HealthSettings:
    """The policy's ``health:``, durations in seconds, as the data plane reads it."""
    return HealthSettings(spec.failures, spec.backoff_seconds, spec.max_backoff_seconds)


def build_upstreams(specs: Mapping[str, UpstreamSpec], env: Mapping[str, str] = os.environ) -> dict[str, UpstreamGroup]:
    """Resolve API keys from the environment now, so a missing one fails at startup.

    Fallback names were checked when the policy was compiled (they exist, no cycles).
    """
    members: dict[str, tuple[Upstream, ...]] = {}
    for name, spec in specs.items():
        auth = None
        if spec.api_key_env:
            key = env.get(spec.api_key_env)
            if not key:
                raise UpstreamConfigError(
                    f"upstream {name!r}: api_key_env {spec.api_key_env!r} is not set in the environment"
                )
            auth = _auth_header(name, spec, key)
        out = []
        for i, text in enumerate(spec.all_urls):
            url = URL(text)
            out.append(
                Upstream(
                    name=name,
                    target=str(i),
                    url=url,
                    base=str(url).rstrip("/"),
                    timeouts=timeouts(spec.timeouts),
                    auth=auth,
                    forward_client=spec.client_address == "forward",
                    health=health(spec.health),
                )
            )
        members[name] = tuple(out)

    def chain(name: str, seen: set[str]) -> list[Upstream]:
        seen.add(name)
        out = list(members[name])
        for other in specs[name].fallback:
            if other not in seen and other in members:
                out += [m for m in chain(other, seen) if m not in out]
        return out

    return {
        name: UpstreamGroup(
            name=name,
            members=members[name],
            models=MappingProxyType(dict(spec.models)),
            fallback=tuple(spec.fallback),
            chain=tuple(chain(name, set())),
        )
        for name, spec in specs.items()
    }


def _auth_header(name: str, spec: UpstreamSpec, key: str) -> tuple[bytes, bytes]:
    value = spec.auth.format.replace("{key}", key)
    try:
        encoded = value.encode("latin-1")
    except UnicodeEncodeError:
        encoded = b""
    if not encoded or any(c in encoded for c in b"\r\n\0"):
        # Never the key itself in the message.
        raise UpstreamConfigError(
            f"upstream {name!r}: the key in {spec.api_key_env!r} holds characters that cannot go in a header"
        )
    return spec.auth.header.lower().encode("ascii"), encoded
