"""The unit of a policy swap: everything a request reads from the policy, frozen together.

The proxy reads ``runtime.active`` once per request and takes the policy,
the upstreams, the shadow policy and the tag it reports from that one
object, so a reload between two reads cannot give a request the decision
of one policy and the upstreams or the tag of another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..policy import Policy
from ..proxy.upstreams import UpstreamGroup

POLICY_HEADER = b"x-regiongate-policy"
TAG_LENGTH = 12


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One loaded policy file, as it was read."""

    policy: Policy
    text: str
    loaded_at: float

    @property
    def sha256(self) -> str:
        return self.policy.sha256

    @property
    def tag(self) -> str:
        return self.policy.sha256[:TAG_LENGTH]

    @property
    def version(self) -> str:
        """The policy's own ``revision`` label, else its hash prefix."""
        return self.policy.spec.revision or self.tag


@dataclass(frozen=True, slots=True)
class Active:
    current: PolicyVersion
    upstreams: Mapping[str, UpstreamGroup]
    shadow_version: PolicyVersion | None = None

    # Read on every request: plain attributes, derived once here.
    policy: Policy = field(init=False)
    shadow: Policy | None = field(init=False)
    tag: str = field(init=False)
    shadow_tag: str | None = field(init=False)
    header: tuple[bytes, bytes] = field(init=False)
    # Upstreams a request cannot go to without its model: one in its chain renames models.
    renaming: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "policy", self.current.policy)
        set_(self, "shadow", self.shadow_version.policy if self.shadow_version else None)
        set_(self, "tag", self.current.tag)
        set_(self, "shadow_tag", self.shadow_version.tag if self.shadow_version else None)
        set_(self, "header", (POLICY_HEADER, self.current.tag.encode()))
        groups = self.upstreams
        set_(
            self,
            "renaming",
            frozenset(name for name, g in groups.items() if any(groups[u.name].models for u in g.chain)),
        )
