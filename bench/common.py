"""What every part of the benchmark shares: its input files, the address rotation, the request
and the upstream's answer, BenchError and the progress log.

check_inputs() runs first, so a missing file is said before any server starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
GEOIP_DIR = REPO_DIR / "tests" / "fixtures" / "geoip"
POLICY = BENCH_DIR / "policy.yaml"
REFERENCE_POLICY = REPO_DIR / "policies" / "openai-supported.yaml"
XFF_LUA = BENCH_DIR / "xff.lua"
UPSTREAM_TEMPLATE = BENCH_DIR / "nginx-upstream.conf.in"
GEOIP2_TEMPLATE = BENCH_DIR / "nginx-geoip2.conf.in"
DEFAULT_OUTPUT = BENCH_DIR / "results" / "latest.json"

CITY_DB = GEOIP_DIR / "GeoIP2-City-Test.mmdb"
ASN_DB = GEOIP_DIR / "GeoLite2-ASN-Test.mmdb"
ANONYMOUS_DB = GEOIP_DIR / "GeoIP2-Anonymous-IP-Test.mmdb"

# The X-Forwarded-For rotation: GB, SE, US are allowed by the `supported` rule and are
# not flagged by the Anonymous-IP test database (81.2.69.x is, so it is not used); CN is
# refused. bench/policy.yaml's `tests` pin these decisions and the preflight runs them.
ALLOWED_ADDRS = ("2.125.160.216", "89.160.20.112", "216.160.83.56")
REFUSED_ADDRS = ("175.16.199.1",)
ROTATION = (*ALLOWED_ADDRS, *REFUSED_ADDRS)
REFUSED_SHARE = len(REFUSED_ADDRS) / len(ROTATION)
SHARE_TOLERANCE = 0.03  # absolute; wrk stops mid-rotation, so the share is not exact
MAX_SOCKET_ERROR_SHARE = 0.01

CHAT_PATH = "/v1/chat/completions"
PROBE_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"probe"}]}'
UPSTREAM_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ":"),
)

SHADOW_POLICY = BENCH_DIR / "policy-shadow.yaml"
RATELIMIT_POLICY = BENCH_DIR / "policy-ratelimit.yaml"
ROUTE_POLICY = BENCH_DIR / "policy-route.yaml"
TOKENS_POLICY = BENCH_DIR / "policy-tokens.yaml"


class BenchError(Exception):
    """The benchmark could not run (missing tool, a server that does not start...)."""


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the table (or the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def check_inputs() -> None:
    for path in (
        POLICY,
        SHADOW_POLICY,
        RATELIMIT_POLICY,
        ROUTE_POLICY,
        TOKENS_POLICY,
        XFF_LUA,
        UPSTREAM_TEMPLATE,
        GEOIP2_TEMPLATE,
        CITY_DB,
        ASN_DB,
        ANONYMOUS_DB,
    ):
        if not path.is_file():
            raise BenchError(f"missing input file: {path}")
