"""The HTTP contract the service publishes, and the guard that keeps requests inside it.

``openapi_document`` turns the document BentoML generates into one that tells the truth about this service: the
limits of the configuration and the names of the loaded packs in the request schema (so a schema-valid request is
accepted), the one error body every 4xx/5xx has, ``GET /packs`` and the page, and, with access control on, the
bearer scheme and its 401/403/429. It is computed from the running configuration, so it follows the config.

``JsonBodyGuard`` answers 415 for a POST body the APIs cannot read (anything but JSON: ``multipart/form-data``
without a boundary used to reach BentoML's form parser and end in a 500), before BentoML parses it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from .config import Auth, Limits
from .models import MAX_SEED, GenerateRequest, GenerateResponse, PacksResponse

API_ROUTES = ("/generate", "/generate_json", "/packs")  # POST, JSON bodies
METHODS = {"/generate": ("POST",), "/generate_json": ("POST",), "/packs": ("GET", "HEAD", "POST")}
GENERATE_ROUTES = ("/generate", "/generate_json")
ERROR = "Error"
REF = "#/components/schemas/{model}"

ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    ERROR: {
        "type": "object", "title": ERROR, "required": ["error"],
        "description": "Every error answer. `detail` lists the fields at fault (a 400 on the request body).",
        "properties": {
            "error": {"type": "string", "description": "what went wrong"},
            "detail": {"type": "array", "items": {"$ref": REF.format(model="ErrorDetail")}},
        },
    },
    "ErrorDetail": {
        "type": "object", "title": "ErrorDetail", "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    "description": "path of the field at fault, e.g. [\"steps\"]; [] for the whole body"},
            "msg": {"type": "string", "description": "what to fix"},
            "type": {"type": "string", "description": "error kind (pydantic's, or `limit` for a configured limit)"},
            "url": {"type": "string"},
        },
    },
}
GENERATE_HEADERS = {
    "X-Erasure-Packs": "applied packs (mandatory + requested, sorted, comma-separated)",
    "X-Erasure-Pack-Shas": "pack=pinned commit sha, comma-separated",
    "X-Erasure-Seed": "seed of the first image",
    "X-Erasure-Seeds": "seed of each image, comma-separated",
    "X-Erasure-Mandatory": "the mandatory packs, comma-separated",
    "X-Erasure-Pack-Set-Built": "true when this request composed its pack set",
}


RETRY_HEADERS = {
    "Retry-After": {"description": "seconds after which a retry may be admitted", "required": True,
                    "schema": {"type": "integer", "minimum": 1}},
    "Retry-After-Ms": {"description": "the same in milliseconds", "required": True,
                       "schema": {"type": "integer", "minimum": 1}},
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": {"$ref": REF.format(model=ERROR)}}}}
    if headers:
        out["headers"] = headers
    return out


def openapi_30(schema: Any) -> Any:
    """pydantic's JSON Schema as OpenAPI 3.0 says it: ``anyOf [X, {type: null}]`` -> X + ``nullable``,
    ``examples: [x]`` -> ``example: x``."""
    if isinstance(schema, list):
        return [openapi_30(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: openapi_30(v) for k, v in schema.items()}
    variants = out.get("anyOf")
    if isinstance(variants, list) and {"type": "null"} in variants:
        rest = [v for v in variants if v != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1:
            out.update(rest[0])
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    if isinstance(out.get("examples"), list) and out["examples"]:
        out["example"] = out.pop("examples")[0]
    return out


def _component(schemas: dict[str, Any], model, mode: str = "serialization") -> dict[str, str]:
    """Put pydantic ``model`` (and the models it uses) into ``schemas``; return a $ref to it."""
    schema = model.model_json_schema(mode=mode, ref_template=REF)
    for name, sub in schema.pop("$defs", {}).items():
        schemas[name] = openapi_30(sub)
    schemas[model.__name__] = openapi_30(schema)
    return {"$ref": REF.format(model=model.__name__)}


def request_schema(limits: Limits, size_multiple: int, packs: list[str]) -> dict[str, Any]:
    """GenerateRequest with what the service checks beyond the model: the configured limits, the size factor of
    the base, the loaded pack names. The request range comes from the same declaration the service checks with
    (``RequestRange.schema_bounds`` / ``problems``, erasure/sampling/request.py)."""
    schema = openapi_30(GenerateRequest.model_json_schema())
    schema["title"] = "GenerateRequest"
    props = schema["properties"]
    props["prompt"].update(minLength=1, maxLength=limits.max_prompt_chars, pattern=r"\S")
    props["negative_prompt"].update(maxLength=limits.max_prompt_chars)
    props["packs"].update(uniqueItems=True)
    if packs:
        props["packs"]["items"] = {"type": "string", "enum": sorted(packs)}
    else:
        props["packs"]["maxItems"] = 0
    for field, bounds in limits.schema_bounds(size_multiple).items():
        props[field].update(bounds)
    # image i uses seed + i: the seed leaves room for the most images a request may ask for
    props["seed"].update(maximum=MAX_SEED - limits.max_images + 1)
    props["num_images"].update(maximum=limits.max_images)
    schema["example"] = {"prompt": "a red circle", "packs": sorted(packs)[:1], "seed": 0}
    return schema


def openapi_document(spec: dict[str, Any], *, limits: Limits, size_multiple: int, packs: list[str],
                     auth: Auth | None) -> dict[str, Any]:
    """The service's OpenAPI document, from BentoML's ``spec`` (a dict) and what the running service knows.

    ``auth``: the access-control config when it is enabled (declares the bearer scheme), else None."""
    doc = json.loads(json.dumps(spec))  # a copy with JSON keys (BentoML's has int status codes)
    doc["info"] = {"title": "erasure", "version": doc.get("info", {}).get("version", "None"),
                   "description": "Text-to-image with verified concept-erasure packs. The operator page is at `/`; "
                                  "limits below are this deployment's configuration."}
    doc.setdefault("tags", []).append({"name": "Page", "description": "The operator page"})
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(name, None)
    schemas.update(copy.deepcopy(ERROR_SCHEMAS))
    for name in ("GenerateRequestIODescriptor", "GenerateResponseIODescriptor", "PacksResponseIODescriptor"):
        schemas.pop(name, None)  # BentoML's copies drop `null` from optional fields; pydantic's own say it
    for name in list(schemas):
        schemas[name] = openapi_30(schemas[name])
    schemas["GenerateRequest"] = request_schema(limits, size_multiple, packs)
    json_out = {"/generate_json": _component(schemas, GenerateResponse), "/packs": _component(schemas, PacksResponse)}
    paths = doc["paths"]

    for route in API_ROUTES:
        op = paths[route]["post"]
        op["responses"] = {"200": op["responses"]["200"],
                           "400": _error("The body is not a valid request: `detail` names each field and the fix"),
                           "415": _error("The body is not JSON (send `Content-Type: application/json`)"),
                           "500": _error("Unexpected server error"),
                           "503": _error("Not now: the service is starting, at capacity, past the request's "
                                         "deadline or shutting down; retry after Retry-After", RETRY_HEADERS)}
        if route in json_out:
            op["responses"]["200"]["content"] = {"application/json": {"schema": json_out[route]}}
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if route in GENERATE_ROUTES:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": REF.format(model="GenerateRequest")}}}}
        elif body is not None:
            body["schema"] = openapi_30(body["schema"])
    png = paths["/generate"]["post"]["responses"]["200"]
    png["content"] = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
    png["headers"] = {name: {"description": text, "required": True, "schema": {"type": "string"}}
                      for name, text in GENERATE_HEADERS.items()}
    listing = paths["/packs"]["post"]
    paths["/packs"]["get"] = {
        "tags": listing.get("tags", []), "description": listing.get("description", ""),
        "operationId": "erasure__packs_get", "responses": {"200": copy.deepcopy(listing["responses"]["200"]),
                                                           "500": _error("Unexpected server error"),
                                                           "503": _error("The service is starting", RETRY_HEADERS)}}
    paths["/"] = {"get": {"tags": ["Page"], "description": "The operator page (HTML; its data comes from the APIs)",
                          "operationId": "erasure__page",
                          "responses": {"200": {"description": "the page",
                                                "content": {"text/html": {"schema": {"type": "string"}}}}}}}
    paths["/readyz"]["get"]["responses"]["503"] = {"description": "Not ready yet (packs still being composed)"}

    if auth is not None:
        doc["components"]["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "an API key (`python -m service.auth new-key NAME`; see service/README.md)"}}
        secured = [(route, "post") for route in API_ROUTES] + [("/packs", "get")]
        if auth.protect_metrics:
            secured.append(("/metrics", "get"))
        for route, method in secured:
            op = paths[route][method]
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = _error("No API key (`Authorization: Bearer <key>`)",
                                            {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}})
            op["responses"]["403"] = _error("The API key is not accepted")
            if route in GENERATE_ROUTES:
                op["responses"]["429"] = _error(
                    "Over this key's rate limit",
                    {"Retry-After": {"description": "seconds until the next request is accepted", "required": True,
                                     "schema": {"type": "integer", "minimum": 1}}})
    return doc


class RequestGuard:
    """ASGI middleware in front of BentoML's parsing of the API routes: a POST whose Content-Type is not JSON is a
    415 that says what to send; a method a route does not have is a 405 whose Allow lists the ones it has (BentoML's
    own 405 on /packs would not list the GET that this service adds).

    A missing Content-Type is read as JSON (as BentoML does); ``application/json`` may carry ``charset=utf-8``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in METHODS:
            path, method, allowed = scope["path"], scope["method"], METHODS[scope["path"]]
            if method not in allowed:
                return await error_response(send, 405, f"{method} is not allowed on {path}; use "
                                                       f"{' or '.join(m for m in allowed if m != 'HEAD')}",
                                            {"allow": ", ".join(allowed)})
            raw = next((v for k, v in scope.get("headers", ()) if k == b"content-type"), None)
            problem = None if raw is None or method != "POST" else _json_content_type_problem(raw.decode("latin-1"))
            if problem:
                return await error_response(send, 415, f"{problem}; {path} takes a JSON body: send "
                                                       "`Content-Type: application/json`")
        await self.app(scope, receive, send)


async def error_response(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer an ASGI request with the service's one error shape, ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def _json_content_type_problem(value: str) -> str | None:
    """None when ``value`` is ``application/json`` (optionally ``; charset=utf-8``), else what is wrong with it."""
    media, *params = [p.strip() for p in value.split(";")]
    if media.lower() != "application/json":
        shown = value if len(value) <= 80 else value[:77] + "..."
        return f"Content-Type {shown!r} is not supported"
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return f"charset {val.strip()!r} is not supported (JSON is UTF-8)"
    return None
