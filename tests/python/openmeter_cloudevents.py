"""Checks a Sluice CloudEvents export (JSON Lines, path in SLUICE_EXPORT) against the event
schema of OpenMeter's ingest API (`Event` in its OpenAPI description: a CloudEvents 1.0
JSON object with a required subject), with the jsonschema package; and that every event
id appears once. Prints ALL OK."""

import datetime
import json
import os

import jsonschema

# OpenMeter's `Event` schema (api/openapi.yaml, components.schemas.Event), as JSON Schema.
OPENMETER_EVENT = {
    "type": "object",
    "required": ["id", "source", "specversion", "type", "subject"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1, "format": "uri-reference"},
        "specversion": {"type": "string", "minLength": 1},
        "type": {"type": "string", "minLength": 1},
        "datacontenttype": {"type": ["string", "null"], "enum": ["application/json", None]},
        "dataschema": {"type": ["string", "null"], "format": "uri", "minLength": 1},
        "subject": {"type": "string", "minLength": 1},
        "time": {"type": ["string", "null"], "format": "date-time"},
        "data": {"type": ["object", "null"]},
    },
}

validator = jsonschema.Draft202012Validator(
    OPENMETER_EVENT, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
ids = set()
count = 0
with open(os.environ["SLUICE_EXPORT"]) as f:
    for line in f:
        event = json.loads(line)
        validator.validate(event)
        assert event["specversion"] == "1.0", event
        # RFC 3339, whatever format checkers this jsonschema install has.
        datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert isinstance(event["data"][field], int), (field, event)
        assert event["id"] not in ids, f"event {event['id']} twice"
        ids.add(event["id"])
        count += 1
expected = int(os.environ["SLUICE_EXPECTED_EVENTS"])
assert count == expected, f"{count} events, expected {expected}"
print("ALL OK", count)
