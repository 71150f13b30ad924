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


def generate(root: Path = CONTRACTS_DIR) -> list[Path]:
    written = []
    for name, build in DOCUMENTS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(build()))
        written.append(path)
    return written


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
            out[name] = "\n".join(list(diff)[:60])
    return out
