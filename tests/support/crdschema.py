"""A CRD's OpenAPI schema made strict, as the API server's strict field validation judges a resource.

``kubernetes-validate`` has schemas for built-in kinds only; a custom resource (a ServiceMonitor,
Envoy Gateway's SecurityPolicy) is validated with jsonschema against its CRD's ``openAPIV3Schema``,
where every object without ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``
rejects fields it does not name.
"""

from __future__ import annotations

from typing import Any


def strict(schema: Any) -> Any:
    """An OpenAPI structural schema that rejects unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out
