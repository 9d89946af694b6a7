#!/usr/bin/env python3
"""Writes the production overlay's PrometheusRule from alerts.yml: the same groups, indented under ``spec``.

The Prometheus Operator takes alert rules only as a PrometheusRule resource,
and kustomize cannot wrap a plain rule file in one; copying by hand drifts,
so this script does it (comments included) and tests/deploy/test_alerts.py checks
that the committed file is its output.

    python deploy/prometheus/prometheusrule.py          # rewrite the resource
    python deploy/prometheus/prometheusrule.py -o -     # print it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "alerts.yml"
OUT = HERE.parent / "kubernetes" / "overlays" / "production" / "prometheusrule.yaml"
HEADER = """\
# The alert rules for the Prometheus Operator (monitoring.coreos.com/v1): the same groups as
# deploy/prometheus/alerts.yml, indented under spec. Generated: edit alerts.yml, then run
# python deploy/prometheus/prometheusrule.py (tests/deploy/test_alerts.py checks the two agree). Your
# Prometheus must select this PrometheusRule (its ruleSelector / ruleNamespaceSelector). What
# each alert means: docs/monitoring.md, "Alerts".
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: regiongate
  labels:
    app.kubernetes.io/name: regiongate
spec:
"""


def render(rules: str) -> str:
    """``groups:`` and everything after it, two spaces in; the rule file's own header comment stays behind."""
    lines = rules.splitlines()
    start = lines.index("groups:")
    return HEADER + "".join(f"  {line}\n" if line else "\n" for line in lines[start:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", default=str(OUT), help="where to write it ('-': standard output)")
    args = parser.parse_args()
    text = render(RULES.read_text())
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
