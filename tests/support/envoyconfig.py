"""Envoy configuration checked without an Envoy binary: Envoy's own protos, as Envoy reads YAML.

Envoy turns a bootstrap YAML into JSON and parses it into ``envoy.config.bootstrap.v3.Bootstrap``
with protobuf's JSON parser, unknown fields rejected, then runs the protoc-gen-validate (PGV) rules
written into its protos. :func:`bootstrap` does the first half with the same protos (the
``xds-protos`` package, generated from envoyproxy/data-plane-api); every ``typed_config`` Any must
name a message whose module is imported here, or parsing fails. :func:`violations` does the part
of the second half that matters to a hand-written file: the rules on scalars, strings, repeated
fields, durations, enums, required messages and required oneofs, walked over every field that is
set (and every required one that is not). PGV's own Python validator cannot be used: it reads
``FieldDescriptor.label``, which protobuf 6 removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Imported for their side effect: each registers the messages a typed_config Any may name.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import any_pb2, descriptor_pool, duration_pb2, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from validate import validate_pb2


def bootstrap(path: Path) -> Any:
    """The file as Envoy's Bootstrap message; unknown fields and unresolvable Any types raise ParseError."""
    return json_format.ParseDict(yaml.safe_load(path.read_text()), bootstrap_pb2.Bootstrap())


def violations(message: Message, where: str = "") -> list[str]:
    """The PGV rules of Envoy's protos that ``message`` breaks, as ``field.path: rule`` lines."""
    found: list[str] = []
    descriptor = message.DESCRIPTOR
    for oneof in descriptor.oneofs:
        if oneof.GetOptions().Extensions[validate_pb2.required] and message.WhichOneof(oneof.name) is None:
            found.append(f"{where}{oneof.name}: one of its fields is required")
    for field in descriptor.fields:
        rules = field.GetOptions().Extensions[validate_pb2.rules]
        path = f"{where}{field.name}"
        repeated = field.is_repeated
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        present = bool(getattr(message, field.name)) if repeated else _has(message, field)
        if field.containing_oneof is not None and not present:
            continue  # a oneof's other member: its rules apply only when it is the one set
        if rules.message.required and not present:
            found.append(f"{path}: required")
        if rules.HasField("duration") and rules.duration.required and not present:
            found.append(f"{path}: required")
        if rules.HasField("any") and rules.any.required and not present:
            found.append(f"{path}: required")
        if repeated:
            items = list(getattr(message, field.name))
            if rules.HasField("repeated") and len(items) < rules.repeated.min_items:
                found.append(f"{path}: at least {rules.repeated.min_items} item(s)")
            if is_message and not _is_map(field):
                for i, item in enumerate(items):
                    found.extend(violations(item, f"{path}[{i}]."))
            continue
        if is_message and not present:
            continue
        value = getattr(message, field.name)
        found.extend(_scalar(path, rules, value, field))  # proto3 scalars too when unset: PGV judges their default
        if is_message:
            if isinstance(value, any_pb2.Any):
                value = unpack(value)  # a typed_config: its payload's own rules
            found.extend(violations(value, f"{path}."))
    return found


def unpack(value: any_pb2.Any) -> Any:
    """The message a typed_config Any holds (its type registered by the imports above)."""
    name = value.TypeName()
    cls = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))
    inner = cls()
    if not value.Unpack(inner):
        raise ValueError(f"cannot unpack {name}")
    return inner


def _has(message: Message, field: Any) -> bool:
    if field.type == FieldDescriptor.TYPE_MESSAGE or field.containing_oneof is not None:
        return message.HasField(field.name)
    return bool(getattr(message, field.name))  # proto3 scalars: the default is "not set"


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _scalar(path: str, rules: Any, value: Any, field: Any) -> list[str]:  # field: a FieldDescriptor (pure or upb)
    kind = rules.WhichOneof("type")
    found: list[str] = []
    if kind is not None and not value and getattr(getattr(rules, kind), "ignore_empty", False):
        return found
    if kind == "string":
        r = rules.string
        if r.min_len and len(value) < r.min_len:
            found.append(f"{path}: at least {r.min_len} character(s)")
        if r.HasField("max_len") and len(value) > r.max_len:
            found.append(f"{path}: at most {r.max_len} character(s)")
    elif kind in ("uint32", "uint64", "int32", "int64"):
        r = getattr(rules, kind)
        if r.HasField("gt") and not value > r.gt:
            found.append(f"{path}: must be > {r.gt}")
        if r.HasField("gte") and not value >= r.gte:
            found.append(f"{path}: must be >= {r.gte}")
        if r.HasField("lte") and not value <= r.lte:
            found.append(f"{path}: must be <= {r.lte}")
        if r.HasField("lt") and not value < r.lt:
            found.append(f"{path}: must be < {r.lt}")
    elif kind == "enum":
        if rules.enum.defined_only and field.enum_type.values_by_number.get(value) is None:
            found.append(f"{path}: {value} is not a defined value")
    elif kind == "duration" and isinstance(value, duration_pb2.Duration):
        r = rules.duration
        nanos = value.seconds * 10**9 + value.nanos
        if r.HasField("gt") and not nanos > r.gt.seconds * 10**9 + r.gt.nanos:
            found.append(f"{path}: must be longer than {r.gt.ToJsonString()}")
        if r.HasField("gte") and not nanos >= r.gte.seconds * 10**9 + r.gte.nanos:
            found.append(f"{path}: must be at least {r.gte.ToJsonString()}")
    return found
