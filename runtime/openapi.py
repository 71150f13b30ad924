"""What the OpenAPI documents say beyond what Litestar infers from a handler's signature.

Litestar documents a route's success answer, its parameters and a body it decodes itself. It
cannot see what a handler refuses (problem+json answers raised inside it), a body the handler
reads as bytes (the gateway's ingest routes, served by the fast path), or that a route skips
the app's authentication. Each route says so in its `opt`:

- `problems`: the statuses the route itself answers with a problem (404, 409, 422...);
- `body`: a msgspec type, for a route that reads its body as bytes and decodes it as that type;
- `public`: the route needs no credentials (`security: []`); with `own_auth` it is only exempt
  from the app's authentication because it checks the credentials itself (the SSE stream);
- `files`: a route whose success answer is a file download (`files(...)`): its media types,
  each a string body, and the `Content-Disposition` header that names the file.

`document_routes` adds what every route shares: 401 and 403 unless it is public, 400 where
Litestar validates a parameter or a body (and 422 where it decodes a body), 503 everywhere
(PostgreSQL, Redis or the broker unreachable, or the gateway overloaded: nothing stored, retry
after `Retry-After`), each with the problem schema and `application/problem+json`. It runs
once on the built app, before the document is first generated.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from litestar.params import ParameterKwarg
from litestar.routes import HTTPRoute
from litestar.typing import FieldDefinition

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

PROBLEM_JSON = "application/problem+json"
# A field the server sets and a request may not (`Meta(extra=READ_ONLY)`): readOnly in OpenAPI.
READ_ONLY: dict[str, Any] = {"read_only": True}


# json_schema_extra's keywords, by their name in Litestar's Schema
_SCHEMA_ATTRIBUTES = {"not": "schema_not", "anyOf": "any_of", "oneOf": "one_of", "allOf": "all_of"}


def _zero_bounds(kind: Any, prop: Schema) -> None:
    """Litestar leaves out a bound of 0 (`Meta(ge=0)`): put it back."""
    if isinstance(kind, msgspec.inspect.UnionType):
        for member in kind.types:
            _zero_bounds(member, prop)
        return
    if isinstance(kind, msgspec.inspect.Metadata):
        kind = kind.type
    if not isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        return
    if kind.ge == 0 and prop.minimum is None:
        prop.minimum = 0
    if kind.gt == 0 and prop.exclusive_minimum is None:
        prop.exclusive_minimum = 0
    if kind.le == 0 and prop.maximum is None:
        prop.maximum = 0
    if kind.lt == 0 and prop.exclusive_maximum is None:
        prop.exclusive_maximum = 0


class StructSchemas(StructSchemaPlugin):
    """Litestar's schemas of msgspec structs, plus what the decoder enforces: no other members
    (`additionalProperties: false`) for a struct that forbids unknown fields, and `readOnly`
    for a field marked READ_ONLY, so a client (or a fuzzer) knows not to send it, a bound of
    0 (which Litestar drops), and a
    struct's `json_schema_extra` (constraints between its fields)."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        made = super().to_openapi_schema(field_definition, schema_creator)
        schema: Any = made
        if isinstance(made, Reference):
            schema = schema_creator.schema_registry.from_reference(made).schema
        info = msgspec.inspect.type_info(field_definition.type_)
        assert isinstance(info, msgspec.inspect.StructType)
        if info.forbid_unknown_fields:
            schema.additional_properties = False
        extra = getattr(field_definition.type_, "json_schema_extra", {})
        for key, value in extra.items():  # JSON Schema as it is, for what a type cannot say
            setattr(schema, _SCHEMA_ATTRIBUTES[key], value)
        for field in info.fields:
            prop = (schema.properties or {}).get(field.encode_name)
            if isinstance(prop, Schema):
                _zero_bounds(field.type, prop)
            kind = field.type
            if isinstance(kind, msgspec.inspect.UnionType):
                kind = next(
                    (t for t in kind.types if isinstance(t, msgspec.inspect.Metadata)), kind
                )
            extra = kind.extra if isinstance(kind, msgspec.inspect.Metadata) else None
            prop = (schema.properties or {}).get(field.encode_name)
            if extra and extra.get("read_only") and isinstance(prop, Schema):
                prop.read_only = True
        return made


class Problem(msgspec.Struct, kw_only=True):
    """An error answer (RFC 9457). Some problems add members: `errors` (each invalid field),
    `limit` and `limit_value` (the rate limit hit), `outcome` (what was stored), `checks`."""

    status: int
    title: str
    detail: str | None = None


STATUS_TEXT: dict[int, str] = {
    400: "The request is malformed: a parameter, header or JSON body the route cannot read.",
    401: "No credentials, or credentials that are unknown, expired or revoked.",
    403: "The credentials may not do this: the role does not allow it, or the resource belongs"
    " to another site.",
    404: "Nothing with that identifier (within the caller's sites).",
    408: "The request body did not arrive in time.",
    409: "The request conflicts with the current state.",
    413: "The request body is larger than the gateway accepts.",
    422: "The body is well-formed JSON but not a valid value for this route.",
    429: "A rate limit was hit: nothing was done; retry after `Retry-After` seconds.",
    503: "A dependency is unreachable or the service is overloaded: nothing was done (unless"
    " the detail says otherwise); retry after `Retry-After` seconds.",
}


def problems(*codes: int) -> dict[str, Any]:
    """A route's own problem answers, for its `opt` (merged with what every route shares)."""
    return {"problems": tuple(codes)}


def files(*media_types: str) -> dict[str, Any]:
    """A route's success answer as a file in one of these media types, for its `opt` (Litestar
    documents a streamed answer as JSON)."""
    return {"files": tuple(media_types)}


def _file_response(response: Any, media_types: Iterable[str]) -> OpenAPIResponse:
    bare = [media_type.split(";")[0] for media_type in media_types]  # without charset
    content = {
        m: OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, content_media_type=m))
        for m in bare
    }
    disposition = OpenAPIHeader(
        schema=Schema(type=OpenAPIType.STRING),
        description="`attachment` with the file's suggested name",
    )
    description = getattr(response, "description", "") or "The file"
    return OpenAPIResponse(
        description=description, content=content, headers={"Content-Disposition": disposition}
    )


def _responses(codes: Iterable[int]) -> dict[int, ResponseSpec]:
    return {
        code: ResponseSpec(
            data_container=Problem,
            description=STATUS_TEXT[code],
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for code in codes
    }


def inline_schema(kind: type) -> dict[str, Any]:
    """The JSON schema of a msgspec type with its definitions inlined (a request body's
    schema cannot point into the document's components from here)."""
    schema, defs = msgspec.json.schema_components([kind], ref_template="#/$defs/{name}")

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            # a null default says nothing the optional field does not (and would be dropped)
            return {k: resolve(v) for k, v in node.items() if v is not None}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema[0])
    return resolved


NO_NUL = "^[^\\x00]*$"


def _no_nul(schema: Any) -> None:
    """A free-text parameter (a string without enum, format or pattern) says that it holds no
    NUL character: PostgreSQL text cannot, so the API answers 400 to one (found by
    Schemathesis, which took the 400 for a valid request refused)."""
    if not isinstance(schema, Schema):
        return
    for member in [*(schema.one_of or []), *(schema.any_of or [])]:
        _no_nul(member)
    kind = schema.type
    free = not (schema.enum or schema.format or schema.pattern) and schema.const is None
    if kind == OpenAPIType.STRING and free:
        schema.pattern = NO_NUL


def _operation_class(
    public: bool,
    body: dict[str, Any] | None,
    zero_bounds: dict[str, dict[str, int]],
    file_types: tuple[str, ...] = (),
    accepts_nul: tuple[str, ...] = (),
) -> type[Operation]:
    @dataclasses.dataclass
    class DocumentedOperation(Operation):
        def __post_init__(self) -> None:
            for parameter in self.parameters or []:
                bounds = zero_bounds.get(getattr(parameter, "name", ""), {})
                schema = getattr(parameter, "schema", None)
                if getattr(parameter, "name", "") not in accepts_nul:
                    _no_nul(schema)
                for attribute, value in bounds.items():
                    if isinstance(schema, Schema) and getattr(schema, attribute) is None:
                        setattr(schema, attribute, value)
            if public:
                self.security = []  # overrides the document's default security
            if body is not None:
                media = OpenAPIMediaType(schema=body)  # type: ignore[arg-type]
                self.request_body = RequestBody(content={"application/json": media}, required=True)
            responses = self.responses or {}
            if file_types:
                success = min(code for code in responses if code.startswith("2"))
                responses[success] = _file_response(responses[success], file_types)
            if body is not None or "400" in responses:
                # Litestar's own 400 (parameter or body validation) describes its exception's
                # shape; the apps answer it as a problem, like the 503 every route has
                outage = responses["503"]
                assert isinstance(outage, OpenAPIResponse)
                responses["400"] = OpenAPIResponse(
                    description=STATUS_TEXT[400], content=outage.content
                )
                if body is not None or self.request_body is not None:
                    responses["422"] = OpenAPIResponse(
                        description=STATUS_TEXT[422], content=outage.content
                    )
            for response in responses.values():
                for media in (getattr(response, "content", None) or {}).values():
                    schema = media.schema
                    if isinstance(schema, Schema) and schema.one_of and not schema.discriminator:
                        # a body that fits several members is fine: anyOf, not oneOf (an
                        # acknowledgement fits both a notification and "accepted")
                        schema.any_of, schema.one_of = schema.one_of, None
            self.responses = dict(sorted(responses.items()))

    return DocumentedOperation


def document_routes(app: Litestar, body_schemas: dict[type, dict[str, Any]] | None = None) -> None:
    """Give every documented route of `app` its problem answers, its security and, for a route
    that reads raw bytes, its body (see the module's docstring)."""
    schemas = body_schemas or {}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if not isinstance(handler, HTTPRouteHandler) or not handler.include_in_schema:
                continue
            opt = handler.opt
            # own_auth: the app's authentication lets it through, and it checks credentials itself
            public = bool(opt.get("public", False)) and not opt.get("own_auth", False)
            body_type = opt.get("body")
            body = None
            if body_type is not None:
                body = schemas.get(body_type) or inline_schema(body_type)
            codes = set(opt.get("problems", ())) | {503}
            if not public:
                codes |= {401, 403}
            handler.responses = {**(handler.responses or {}), **_responses(sorted(codes))}
            handler.operation_class = _operation_class(
                public,
                body,
                _parameter_zero_bounds(handler),
                tuple(opt.get("files", ())),
                tuple(opt.get("accepts_nul", ())),  # parameters that tolerate a NUL
            )


def _parameter_zero_bounds(handler: HTTPRouteHandler) -> dict[str, dict[str, int]]:
    """Bounds of 0 of the handler's parameters (`Parameter(ge=0)`), which Litestar leaves out
    of the document, by the parameter's name there."""
    found = {}
    for name, field in handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if not isinstance(kwarg, ParameterKwarg):
            continue
        limits = {"minimum": kwarg.ge, "exclusive_minimum": kwarg.gt}
        limits |= {"maximum": kwarg.le, "exclusive_maximum": kwarg.lt}
        zeros = {attribute: 0 for attribute, value in limits.items() if value == 0}
        if zeros:
            found[kwarg.query or kwarg.header or kwarg.cookie or name] = zeros
    return found
