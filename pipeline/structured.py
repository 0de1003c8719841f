"""Structured captions: the answer formats a model takes, a JSON Schema's strict subset and its Parquet
columns, and whether an answer holds to the schema.

``request.response_format`` is ``text`` (a paragraph, the default), ``json_object`` (JSON mode: any JSON
object) or ``json_schema`` (structured outputs: the service constrains the answer to ``request.schema``).
JSON mode and structured outputs are different capabilities; ``FORMAT_SUPPORT`` below is the one table of
which model takes which (with images, as every row here has them).

Pure but for ``load_structured``, which reads the schema file once when a run, a dry run or an estimate
starts. Validation uses ``jsonschema`` (Draft 2020-12, the dialect the services accept).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.config import RunConfig
from pipeline.records import ConfigError
from pipeline.sink import BASE_COLUMNS

if TYPE_CHECKING:  # imported where a schema is loaded: ~50 ms a run without one need not pay
    import jsonschema

# What each model family takes with image input, by version date (the model name may end with one:
# gpt-4o-2024-08-06). Sources: the reference (Azure's GPT-4 Turbo with Vision, turbo-2024-04-09, "does not
# support JSON mode or function calling with image input"); OpenAI's structured-outputs guide (json_schema
# on gpt-4o 2024-08-06 and later, gpt-4o-mini 2024-07-18, the gpt-4.1 family, o1 2024-12-17, o3; gpt-4o
# 2024-05-13 has JSON mode only); Azure's structured-outputs page (api-version 2024-08-01-preview or later).


@dataclass(frozen=True, slots=True)
class FormatSupport:
    json_object: bool  # JSON mode with images
    json_schema_since: str | None  # the first version date with structured outputs; None: never; "": all
    json_object_on_azure: bool = True  # Azure's deployment of the same model may lack what OpenAI's has


FORMAT_SUPPORT: Mapping[str, FormatSupport] = {  # longest matching prefix of the model name wins
    "gpt-4-turbo": FormatSupport(json_object=True, json_schema_since=None, json_object_on_azure=False),
    "gpt-4-vision": FormatSupport(json_object=False, json_schema_since=None, json_object_on_azure=False),
    "gpt-4o": FormatSupport(json_object=True, json_schema_since="2024-08-06"),
    "gpt-4o-mini": FormatSupport(json_object=True, json_schema_since="2024-07-18"),
    "gpt-4.1": FormatSupport(json_object=True, json_schema_since=""),
    "gpt-4.5": FormatSupport(json_object=True, json_schema_since=""),
    "gpt-5": FormatSupport(json_object=True, json_schema_since=""),
    "o1": FormatSupport(json_object=True, json_schema_since="2024-12-17"),
    "o3": FormatSupport(json_object=True, json_schema_since=""),
    "o4": FormatSupport(json_object=True, json_schema_since=""),
}
AZURE_JSON_SCHEMA_API_VERSION = "2024-08-01-preview"  # dated Azure versions before this lack json_schema
# Keywords the 2024 strict models refuse; the gpt-4.1 family and later take them.
NEWER_MODEL_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format", "minimum", "maximum",
                                  "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems"})  # fmt: skip
NEVER_STRICT_KEYWORDS = frozenset({"patternProperties", "unevaluatedProperties", "propertyNames", "minProperties",
                                   "maxProperties", "uniqueItems", "contains", "minContains", "maxContains",
                                   "if", "then", "else", "not", "dependentRequired", "dependentSchemas",
                                   "allOf", "oneOf", "prefixItems"})  # fmt: skip
_VERSION = re.compile(r"-(\d{4}-\d{2}-\d{2})$")
_SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


@dataclass(frozen=True, slots=True)
class Structured:
    """A run's answer format, loaded and checked once: the schema, its columns, its validator."""

    response_format: str  # json_object | json_schema
    schema: Mapping[str, Any] | None  # json_schema only
    schema_name: str
    strict: bool
    columns: tuple[pa.Field, ...]  # one per top-level property (json_schema); none for json_object
    fingerprint: str  # of the canonical schema: part of the output's settings
    validator: jsonschema.Draft202012Validator | None = field(default=None, compare=False, repr=False)

    def body_format(self) -> dict[str, Any]:
        """The request's ``response_format``."""
        if self.schema is None:
            return {"type": "json_object"}
        spec = {"name": self.schema_name, "schema": self.schema, "strict": self.strict}
        return {"type": "json_schema", "json_schema": spec}

    def problem(self, text: str | None, finish_reason: str | None) -> tuple[str, Mapping[str, Any] | None]:
        """Why an answer does not hold to the format ("" when it does), and its fields when it does."""
        if finish_reason == "length":
            return "cut at max_tokens (finish_reason length): partial JSON is not parsed", None
        if text is None:
            return "no text in the answer", None
        try:
            value = json.loads(text)
        except ValueError as err:
            return f"not JSON: {err}", None
        if not isinstance(value, dict):
            return f"not a JSON object but a {type(value).__name__}", None
        if self.schema is None:
            return "", None
        assert self.validator is not None
        import jsonschema

        error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        if error is not None:
            where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            return (
                f"does not validate against the schema at {where}: {' '.join(error.message.split())[:200]}",
                None,
            )
        return "", value


def load_structured(cfg: RunConfig) -> Structured | None:
    """The run's structured format from ``[request]``, or None for text. Raises ConfigError (exit 2) for a
    schema that cannot be read, is not strict-compatible, collides with an output column, or a format the
    model or API version is known not to take."""
    req, src = cfg.request, cfg.source
    if req.response_format == "text":
        return None
    check_support(cfg)
    if req.response_format == "json_object":
        messages = f"{req.system_prompt}\n{req.prompt}"
        if "json" not in messages.lower():
            raise ConfigError(
                f"{src}: request.response_format = 'json_object' needs the word JSON in request.prompt or "
                "request.system_prompt (the service refuses JSON mode without it)"
            )
        return Structured("json_object", None, req.schema_name, req.strict, (), "json_object")
    if not req.schema:
        raise ConfigError(
            f"{src}: request.schema must name a JSON Schema file when response_format = 'json_schema'"
        )
    path = Path(req.schema) if Path(req.schema).is_absolute() else Path(src).parent / req.schema
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(
            f"{src}: request.schema = {req.schema!r}: cannot read {path}: {err.strerror}"
        ) from None
    except ValueError as err:
        raise ConfigError(f"{src}: request.schema: {path} is not JSON: {err}") from None
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ConfigError(
            f"{src}: request.schema: {path} is not a valid JSON Schema: {err.message}"
        ) from None
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), Mapping):
        raise ConfigError(f"{src}: request.schema: {path}: the root must be an object with properties")
    if req.strict:
        for where, keyword in strict_violations(
            schema, allow_newer=_takes_newer_keywords(cfg.endpoint.model)
        ):
            raise ConfigError(
                f"{src}: request.schema: {path}: {keyword} at {where} is outside the strict subset the "
                f"service enforces; change the schema or set request.strict = false"
            )
    columns = tuple(pa.field(name, arrow_type(prop, schema)) for name, prop in schema["properties"].items())
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"{canonical}|{req.schema_name}|{req.strict}".encode()).hexdigest()[:16]
    taken = [f.name for f in columns if f.name in BASE_COLUMNS]
    if taken:
        raise ConfigError(
            f"{src}: request.schema: {path}: property {taken[0]!r} has the name of the output column "
            f"{taken[0]!r}; rename the property"
        )
    validator = jsonschema.Draft202012Validator(schema)
    return Structured(
        "json_schema", schema, req.schema_name, req.strict, columns, f"json_schema:{digest}", validator
    )


def check_manifest_columns(structured: Structured, columns: frozenset[str], source: str) -> None:
    """Refuse a schema property named like a column of the manifest (it would hide it). Raises ConfigError."""
    taken = [f.name for f in structured.columns if f.name in columns]
    if taken:
        raise ConfigError(
            f"{source}: request.schema: property {taken[0]!r} has the name of the manifest column "
            f"{taken[0]!r}; rename one of them"
        )


def check_support(cfg: RunConfig) -> None:
    """Refuse a format the model or API version is known not to take with images. Raises ConfigError."""
    fmt, model, ep = cfg.request.response_format, cfg.endpoint.model, cfg.endpoint
    support, version = model_support(model)
    if support is None:
        return  # a model we have no table entry for (a local server's): the service will say
    is_azure = ep.provider == "azure"
    json_object = support.json_object and (support.json_object_on_azure or not is_azure)
    takes_schema = support.json_schema_since is not None and (
        support.json_schema_since == "" or version is None or version >= support.json_schema_since
    )
    which = "json_schema: gpt-4o 2024-08-06 or later, gpt-4o-mini, the gpt-4.1 family and later"
    if fmt == "json_object" and not json_object:
        raise ConfigError(
            f"{cfg.source}: request.response_format = 'json_object': {model} on {ep.provider} takes no JSON mode "
            f"with image input (reference); models that do: gpt-4o, gpt-4o-mini, gpt-4.1 and later"
        )
    if fmt == "json_schema" and not takes_schema:
        raise ConfigError(
            f"{cfg.source}: request.response_format = 'json_schema': {model} takes no structured outputs with "
            f"image input; models that do: {which}"
        )
    if (
        fmt == "json_schema"
        and is_azure
        and ep.api_version[:4].isdigit()
        and ep.api_version < AZURE_JSON_SCHEMA_API_VERSION
    ):
        raise ConfigError(
            f"{cfg.source}: endpoint.api_version = {ep.api_version!r}: Azure takes json_schema from "
            f"{AZURE_JSON_SCHEMA_API_VERSION} on"
        )


def model_support(model: str) -> tuple[FormatSupport | None, str | None]:
    """The table entry of `model` (longest prefix) and its version date, when the name carries one."""
    name = model.lower()
    matches = [prefix for prefix in FORMAT_SUPPORT if name.startswith(prefix)]
    found = _VERSION.search(name)
    return (FORMAT_SUPPORT[max(matches, key=len)] if matches else None), (found.group(1) if found else None)


def strict_violations(schema: Mapping[str, Any], *, allow_newer: bool) -> Iterator[tuple[str, str]]:
    """(JSON path, keyword) of each place `schema` leaves the strict subset, in document order. Pure."""
    refused = NEVER_STRICT_KEYWORDS if allow_newer else NEVER_STRICT_KEYWORDS | NEWER_MODEL_KEYWORDS

    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if not isinstance(node, Mapping):
            return
        for keyword in node:
            if keyword in refused:
                yield where, keyword
        if node.get("type") == "object" or "properties" in node:
            properties = node.get("properties") or {}
            if node.get("additionalProperties") is not False:
                yield where, "additionalProperties (must be false)"
            missing = [name for name in properties if name not in (node.get("required") or [])]
            if missing:
                yield f"{where}.properties.{missing[0]}", "required (every property must be listed)"
            for name, child in properties.items():
                yield from walk(child, f"{where}.properties.{name}")
        if "items" in node:
            yield from walk(node["items"], f"{where}.items")
        for keyword in ("anyOf",):
            for n, child in enumerate(node.get(keyword) or []):
                yield from walk(child, f"{where}.{keyword}[{n}]")
        for name, child in (node.get("$defs") or {}).items():
            yield from walk(child, f"{where}.$defs.{name}")

    yield from walk(schema, "$")


def arrow_type(node: Mapping[str, Any], root: Mapping[str, Any]) -> pa.DataType:
    """The Arrow type of a schema node: scalars, enums as strings, arrays as lists, objects as structs;
    anything else (a union of types) as its JSON text in a string. Nullability is Arrow's default."""
    node = _resolve(node, root)
    types = node.get("type")
    if isinstance(types, list):
        types = [t for t in types if t != "null"]
        types = types[0] if len(types) == 1 else None
    if types is None and "anyOf" in node:
        options = [
            _resolve(option, root) for option in node["anyOf"] if _resolve(option, root).get("type") != "null"
        ]
        return arrow_type(options[0], root) if len(options) == 1 else pa.string()
    if types is None and "enum" in node:
        return pa.string()
    if types in _SCALARS:
        return _SCALARS[types]
    if types == "array":
        return pa.list_(arrow_type(node.get("items") or {}, root))
    if types == "object" and node.get("properties"):
        return pa.struct([pa.field(n, arrow_type(p, root)) for n, p in node["properties"].items()])
    return pa.string()


def column_values(structured: Structured, fields: Mapping[str, Any] | None) -> dict[str, Any]:
    """The typed columns of one output row: the answer's top-level properties, or nulls."""
    values = fields or {}
    return {f.name: _fit(values.get(f.name), f.type) for f in structured.columns}


def _fit(value: Any, kind: pa.DataType) -> Any:
    """`value` as the column's type expects it: a value of a union column is kept as its JSON text."""
    if value is None:
        return None
    if pa.types.is_string(kind) and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if pa.types.is_list(kind) and isinstance(value, list):
        return [_fit(item, kind.value_type) for item in value]
    if pa.types.is_struct(kind) and isinstance(value, Mapping):
        return {
            kind.field(n).name: _fit(value.get(kind.field(n).name), kind.field(n).type)
            for n in range(kind.num_fields)
        }
    return value


def _resolve(node: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) else {}
        return target if isinstance(target, Mapping) else {}
    return node


def _takes_newer_keywords(model: str) -> bool:
    return model.lower().startswith(("gpt-4.1", "gpt-5", "o3", "o4"))
