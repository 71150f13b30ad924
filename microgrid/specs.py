"""Generated interface documents: OpenAPI for the HTTP apps, AsyncAPI for the stream processors.

They are derived from the code (Litestar routes, FastStream subscribers, msgspec contracts) with
default settings, written under `contracts/`, and committed; `microgrid contracts check` fails
when the committed files differ from what the code generates now.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import msgspec

from contracts import Reading, ReadingBatch, Topics
from contracts.alerting import AlertEvent
from contracts.control import CommandDispatch, CommandRequested, CommandResult, ControlEvent
from contracts.topics import site_topic
from runtime.settings import PROJECT_ROOT, Settings
from stream_processors.alerting import DeviceState
from stream_processors.lifecycle import CommandState

CONTRACTS_DIR = PROJECT_ROOT / "contracts"

# What each topic carries, for the AsyncAPI payloads (none: the original bytes, any format).
TOPIC_PAYLOADS: dict[str, tuple[type, ...]] = {
    Topics.TELEMETRY_RAW: (Reading, ReadingBatch),
    Topics.TELEMETRY_VALID: (ReadingBatch,),
    Topics.TELEMETRY_DLQ: (),
    Topics.ALERTS: (AlertEvent,),
    Topics.ALERTS_DLQ: (),
    Topics.ALERTER_STATE: (DeviceState,),
    Topics.CONTROL_COMMANDS: (CommandRequested,),
    Topics.CONTROL_RESULTS: (CommandResult,),
    Topics.CONTROL_DISPATCH: (CommandDispatch,),
    Topics.CONTROL_EVENTS: (ControlEvent,),
    Topics.CONTROLLER_STATE: (CommandState,),
    Topics.CONTROL_DLQ: (),
    site_topic("{site}", "telemetry"): (Reading, ReadingBatch),
    site_topic("{site}", "dispatch"): (CommandDispatch,),
    site_topic("{site}", "results"): (CommandResult,),
}
# Subscriptions by pattern, documented as the topics the pattern stands for.
PATTERN_TOPICS: tuple[str, ...] = (
    Topics.TELEMETRY_RAW,
    site_topic("{site}", "telemetry"),
    site_topic("{site}", "results"),
)


def _defaults() -> Settings:
    # defaults only (the documents must not depend on env), as in development
    return Settings.model_construct(environment="dev")


def _openapi(factory: Callable[[Settings], Any]) -> dict[str, Any]:
    schema: dict[str, Any] = factory(_defaults()).openapi_schema.to_schema()
    return schema


def _gateway() -> dict[str, Any]:
    from ingest_gateway.app import create_app

    return _openapi(create_app)


def _query_api() -> dict[str, Any]:
    from query_api.app import create_app

    return _openapi(create_app)


def _asyncapi(title: str, factory: Callable[[Settings], Any]) -> dict[str, Any]:
    from faststream.specification import AsyncAPI

    app = factory(_defaults())
    assert app.broker is not None
    spec = AsyncAPI(app.broker, title=title, version="1")
    doc: dict[str, Any] = json.loads(spec.to_specification().to_json())
    return with_payloads(expand_patterns(doc))


def expand_patterns(doc: dict[str, Any]) -> dict[str, Any]:
    """Replace a channel whose address is a subscription pattern (`^...$`) by one channel per
    topic of PATTERN_TOPICS that it matches, with its operation and message."""
    channels, operations = doc.get("channels", {}), doc.get("operations", {})
    messages = doc.get("components", {}).get("messages", {})
    schemas = doc.get("components", {}).get("schemas", {})
    for name, channel in list(channels.items()):
        pattern = channel.get("address", "")
        if not pattern.startswith("^"):
            continue
        del channels[name]
        suffix = name[len(pattern) :]  # ":<Handler>"
        ops = {k: op for k, op in operations.items() if k.startswith(pattern + ":")}
        old_messages = {
            key: unquote(ref["$ref"].rsplit("/", 1)[-1]) for key, ref in channel["messages"].items()
        }
        for old in old_messages.values():
            schemas.pop(messages[old]["payload"]["$ref"].rsplit("/", 1)[-1], None)
        for topic in PATTERN_TOPICS:
            if not re.match(pattern, topic.replace("{site}", "S")):
                continue
            new = copy.deepcopy(channel)
            new["address"] = new["bindings"]["kafka"]["topic"] = topic
            for key, old in old_messages.items():
                message = copy.deepcopy(messages[old])
                message["title"] = f"{topic}{suffix}:{key}"
                message["payload"] = {"$ref": f"#/components/schemas/{topic}{suffix}:Payload"}
                messages[message["title"]] = message
                new["messages"][key] = {"$ref": f"#/components/messages/{message['title']}"}
            channels[topic + suffix] = new
            for op_name, op in ops.items():
                copied = copy.deepcopy(op)
                copied["channel"] = {"$ref": f"#/channels/{topic}{suffix}"}
                copied["messages"] = [
                    {"$ref": f"#/channels/{topic}{suffix}/messages/{key}"} for key in old_messages
                ]
                operations[topic + op_name[len(pattern) :]] = copied
        for old in old_messages.values():
            del messages[old]
        for op_name in ops:
            del operations[op_name]
    return doc


def _validator() -> dict[str, Any]:
    from stream_processors.validator import create_app

    return _asyncapi("Microgrid validator", create_app)


def _controller() -> dict[str, Any]:
    from stream_processors.controller import create_app

    return _asyncapi("Microgrid controller", create_app)


def _alerter() -> dict[str, Any]:
    from stream_processors.alerter import create_app

    return _asyncapi("Microgrid alerter", create_app)


def with_payloads(doc: dict[str, Any]) -> dict[str, Any]:
    """Give each channel's message the msgspec schema of what its topic carries."""
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    types = sorted({t for ts in TOPIC_PAYLOADS.values() for t in ts}, key=lambda t: t.__name__)
    refs, defs = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    schemas.update(defs)
    ref_of = dict(zip(types, refs, strict=True))
    by_topic = {
        topic: ref_of[ts[0]] if len(ts) == 1 else {"anyOf": [ref_of[t] for t in ts]}
        for topic, ts in TOPIC_PAYLOADS.items()
        if ts
    }
    for channel in doc.get("channels", {}).values():
        payload = by_topic.get(channel.get("address", ""))
        for message in channel.get("messages", {}).values():
            name = unquote(message["$ref"].rsplit("/", 1)[-1])
            target = unquote(components["messages"][name]["payload"]["$ref"].rsplit("/", 1)[-1])
            schemas[target] = payload or {"description": "the original record value, as sent"}
    return doc


DOCUMENTS: dict[str, Callable[[], dict[str, Any]]] = {
    "openapi/ingest-gateway.json": _gateway,
    "openapi/query-api.json": _query_api,
    "asyncapi/validator.json": _validator,
    "asyncapi/alerter.json": _alerter,
    "asyncapi/controller.json": _controller,
}


CLIENT_PATH = PROJECT_ROOT / "ui" / "static" / "api.js"


def _js_type(schema: Any) -> str:
    """A JSDoc (TypeScript syntax) type for a JSON schema."""
    if not isinstance(schema, dict):
        return "any"
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            union = " | ".join(dict.fromkeys(_js_type(s) for s in schema[key]))
            rest = {k: v for k, v in schema.items() if k != key}
            if "properties" in rest:  # members of their own, and one of the alternatives
                return f"{_js_type(rest)} & ({union})"
            return union
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_js_type({**schema, "type": k}) for k in kind)
    if kind in ("integer", "number"):
        return "number"
    if kind in ("string", "boolean", "null"):
        return str(kind)
    if kind == "array":
        return f"Array<{_js_type(schema.get('items'))}>"
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if not props:
            extra = schema.get("additionalProperties")
            return f"Record<string, {_js_type(extra) if isinstance(extra, dict) else 'any'}>"
        required = set(schema.get("required", []))
        members = [
            f"{json.dumps(name) if not name.isidentifier() else name}"
            f"{'' if name in required else '?'}: {_js_type(sub)}"
            for name, sub in props.items()
        ]
        return "{" + ", ".join(members) + "}"
    return "any"


def js_client(doc: dict[str, Any]) -> str:
    """An ES module with a typed function per operation of the query API's document, for the
    dashboard: a route that changes changes the client, and `contracts check` fails until the
    client is generated again."""
    lines = [
        "// The query API's client, generated by `microgrid contracts generate` from",
        "// contracts/openapi/query-api.json: do not edit. Types are JSDoc (TypeScript syntax).",
        "",
    ]
    for name, schema in sorted(doc.get("components", {}).get("schemas", {}).items()):
        lines.append(f"/** @typedef {{{_js_type(schema)}}} {name} */")
    lines += [
        "",
        "/** A refused request: `status` and the problem (RFC 9457) the API answered with. */",
        "export class ApiError extends Error {",
        "  constructor(status, problem) {",
        "    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);",
        "    this.status = status;",
        "    this.problem = problem;",
        "  }",
        "}",
        "",
        "const settings = { token: null, onUnauthorized: () => {} };",
        "",
        "/** The bearer token sent with each call, and what to do when the API answers 401. */",
        "export function configure({ token = settings.token, onUnauthorized } = {}) {",
        "  settings.token = token;",
        "  if (onUnauthorized) settings.onUnauthorized = onUnauthorized;",
        "}",
        "",
        "function target(path, where, args) {",
        "  const query = new URLSearchParams();",
        "  let url = path;",
        "  for (const [name, place] of Object.entries(where)) {",
        "    const value = args[name];",
        "    if (value === undefined || value === null) continue;",
        '    if (place === "path") url = url.replace(`{${name}}`, encodeURIComponent(value));',
        '    else if (place === "query") query.append(name, String(value));',
        "  }",
        "  const search = query.toString();",
        "  return search ? `${url}?${search}` : url;",
        "}",
        "",
        "/** `file`: a download, answered as a Blob (errors are still problems). */",
        "async function call(method, path, where, args = {}, file = false) {",
        "  const headers = {};",
        "  if (settings.token) headers.Authorization = `Bearer ${settings.token}`;",
        "  for (const [name, place] of Object.entries(where)) {",
        '    if (place === "header" && args[name] != null) headers[name] = String(args[name]);',
        "  }",
        "  const init = { method, headers };",
        "  if (args.body !== undefined) {",
        '    headers["Content-Type"] = "application/json";',
        "    init.body = JSON.stringify(args.body);",
        "  }",
        "  const resp = await fetch(target(path, where, args), init);",
        "  if (file && resp.ok) return resp.blob();",
        "  const text = await resp.text();",
        '  const json = (resp.headers.get("Content-Type") || "").includes("json");',
        "  const body = text && json ? JSON.parse(text) : text || null;",
        "  if (resp.status === 401) settings.onUnauthorized(body);",
        "  if (!resp.ok) throw new ApiError(resp.status, body);",
        "  return body;",
        "}",
    ]
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            op_id = op.get("operationId")
            if not op_id:
                continue
            params = op.get("parameters", [])
            where = {p["name"]: p["in"] for p in params}
            arg_types = [
                f"{json.dumps(p['name']) if not p['name'].isidentifier() else p['name']}"
                f"{'' if p.get('required') else '?'}: {_js_type(p.get('schema'))}"
                for p in params
            ]
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                arg_types.append(f"body: {_js_type(body.get('schema'))}")
            ok = next((c for c in sorted(op.get("responses", {})) if c.startswith("2")), "200")
            content = op.get("responses", {}).get(ok, {}).get("content", {})
            summary = f"{op.get('summary', op_id)} ({method.upper()} {path})"
            args_doc = "{" + ", ".join(arg_types) + "}"
            optional = "" if any(not t.split(":")[0].endswith("?") for t in arg_types) else "="
            if "text/event-stream" in content:  # for EventSource: the URL, not a call
                lines += [
                    "",
                    f"/** {summary}: its URL, for an EventSource.",
                    f" * @param {{{args_doc}{optional}}} args",
                    " * @returns {string} */",
                    f"export const {op_id}Url = (args = {{}}) =>",
                    f"  target({json.dumps(path)}, {json.dumps(where)}, args);",
                ]
                continue
            media = content.get("application/json", {})
            returns = _js_type(media.get("schema")) if media else "null"
            file = bool(content) and not media  # a download (runtime.openapi.files)
            lines += [
                "",
                f"/** {summary}",
                f" * @param {{{args_doc}{optional}}} args",
                f" * @returns {{Promise<{'Blob' if file else returns}>}} */",
                f"export const {op_id} = (args = {{}}) =>",
                f"  call({json.dumps(method.upper())}, {json.dumps(path)},"
                f" {json.dumps(where)}, args{', true' if file else ''});",
            ]
    return "\n".join(lines) + "\n"


def clean_descriptions(node: Any) -> Any:
    """Every `description` text as `inspect.cleandoc` leaves it.

    Libraries render docstrings differently (msgspec 0.23 dedents them, earlier releases kept
    the indentation), and the documents must depend on the code alone.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [clean_descriptions(item) for item in node]
    return node


def render(doc: dict[str, Any]) -> str:
    return json.dumps(clean_descriptions(doc), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _client() -> str:
    return js_client(clean_descriptions(_query_api()))


def generate(root: Path = CONTRACTS_DIR, client: Path = CLIENT_PATH) -> list[Path]:
    written = []
    for name, build in DOCUMENTS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(build()))
        written.append(path)
    client.write_text(_client())
    written.append(client)
    return written


def _routes_changed(old: str, fresh: str) -> str:
    """For an OpenAPI document: the operations added and removed, before the diff."""

    def routes(text: str) -> set[str]:
        try:
            paths = json.loads(text).get("paths", {}) if text else {}
        except json.JSONDecodeError:
            return set()
        return {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops}

    before, after = routes(old), routes(fresh)
    lines = [f"added: {r}" for r in sorted(after - before)]
    lines += [f"removed: {r}" for r in sorted(before - after)]
    return "".join(line + "\n" for line in lines)


def drift(root: Path = CONTRACTS_DIR) -> dict[str, str]:
    """Documents whose committed text differs from what the code generates: name -> diff."""
    out = {}
    for name, build in DOCUMENTS.items():
        path = root / name
        fresh = render(build())
        old = path.read_text() if path.exists() else ""
        if old != fresh:
            diff = difflib.unified_diff(
                old.splitlines(),
                fresh.splitlines(),
                f"committed/{name}",
                f"generated/{name}",
                lineterm="",
                n=1,
            )
            out[name] = _routes_changed(old, fresh) + "\n".join(list(diff)[:60])
    fresh = _client()
    old = CLIENT_PATH.read_text() if CLIENT_PATH.exists() else ""
    if old != fresh:
        diff = difflib.unified_diff(
            old.splitlines(), fresh.splitlines(), "committed/api.js", "generated/api.js", n=1
        )
        out["ui/static/api.js"] = "\n".join(list(diff)[:60])
    return out
