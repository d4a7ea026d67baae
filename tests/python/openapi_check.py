"""Checks real admin API answers against the gateway's own OpenAPI document.

SLUICE_OPENAPI names the document as served (/admin/v1/openapi.json); SLUICE_CALLS a JSON
list of calls made to the gateway, each {"method", "path", "status", "content_type",
"body"} (the body as text). The document must be a valid OpenAPI 3.1 document
(openapi-spec-validator). Each call's path must fall under a documented path template,
its method must be documented there, its status among that operation's responses and its
media type among that response's, and its body must validate (JSON Schema 2020-12, the
dialect of OpenAPI 3.1) against the schema declared for them: a JSON body as a whole, a
JSON Lines body line by line, any other body as a string. Every documented operation must
have been seen to succeed at least once. Prints ALL OK."""

import json
import os
import re

import jsonschema
from openapi_spec_validator import OpenAPIV31SpecValidator

with open(os.environ["SLUICE_OPENAPI"]) as f:
    doc = json.load(f)
with open(os.environ["SLUICE_CALLS"]) as f:
    calls = json.load(f)

OpenAPIV31SpecValidator(doc).validate()
assert doc["openapi"].startswith("3.1"), doc["openapi"]


def template_of(path):
    """The documented template a concrete path falls under, literal segments first (as the
    router matches)."""
    matches = []
    for template in doc["paths"]:
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            matches.append(template)
    assert matches, f"{path} is under no documented path"
    return max(matches, key=lambda t: sum(not s.startswith("{") for s in t.split("/")))


def validator(schema):
    # `#/components/...` references resolve against this root, as they do in the document.
    root = {"allOf": [schema], "components": doc["components"]}
    jsonschema.Draft202012Validator.check_schema(root)
    return jsonschema.Draft202012Validator(root)


failures = []
succeeded = set()
for call in calls:
    method, path, status = call["method"].lower(), call["path"].split("?")[0], call["status"]
    where = f"{call['method']} {call['path']} -> {status}"
    template = template_of(path)
    operation = doc["paths"][template].get(method)
    if operation is None:
        failures.append(f"{where}: {method} is not documented on {template}")
        continue
    response = operation["responses"].get(str(status))
    if response is None:
        failures.append(f"{where}: status not documented ({sorted(operation['responses'])})")
        continue
    media_type = (call["content_type"] or "").split(";")[0].strip()
    content = response.get("content", {})
    if media_type not in content:
        failures.append(f"{where}: {media_type!r} not documented ({sorted(content)})")
        continue
    body = call["body"]
    if media_type == "application/json":
        instances = [json.loads(body)]
    elif media_type == "application/x-ndjson":
        instances = [json.loads(line) for line in body.splitlines() if line]
    else:
        instances = [body]
    check = validator(content[media_type]["schema"])
    for instance in instances:
        for error in check.iter_errors(instance):
            at = "/".join(str(p) for p in error.absolute_path)
            failures.append(f"{where}: at '{at}': {error.message}\n  body: {body[:600]}")
    if 200 <= status < 300:
        succeeded.add((method, template))

documented = {
    (method, template)
    for template, item in doc["paths"].items()
    for method in item
    if method in ("get", "put", "post", "delete", "patch", "head", "options", "trace")
}
for method, template in sorted(documented - succeeded):
    failures.append(f"{method.upper()} {template}: never seen to succeed")

assert not failures, "\n".join(failures)
print("ALL OK", len(calls), "answers")
