"""Generated documents depend on the code alone, not on how a library renders docstrings."""

from __future__ import annotations

import json

from microgrid.specs import render

# msgspec before 0.23 kept a docstring's indentation in a schema description; 0.23 strips it.
KEPT = "A device's reply: on `control.results`, or\n    `POST /result` (the path and\n    the key)."
STRIPPED = "A device's reply: on `control.results`, or\n`POST /result` (the path and\nthe key)."


def document(description: str) -> dict[str, object]:
    return {
        "components": {
            "schemas": {
                "CommandResult": {
                    "description": description,
                    "properties": {"description": {"type": "string"}},
                },
            },
        },
        "channels": [{"description": f"  {description}"}],
    }


def test_indented_and_dedented_docstrings_render_the_same_document() -> None:
    assert render(document(KEPT)) == render(document(STRIPPED))


def test_a_property_named_description_keeps_its_schema() -> None:
    schema = json.loads(render(document(KEPT)))["components"]["schemas"]["CommandResult"]
    assert schema["properties"] == {"description": {"type": "string"}}
    assert schema["description"] == STRIPPED
