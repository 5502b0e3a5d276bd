"""JSON schemas the structured-output tests constrain to: an object with bounded fields, an
enum, an array and a nested object (bounded, so that a tiny model's output ends)."""

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "calm"]}}, "required": ["mood"],
             "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 2, "maxItems": 3},
    "nested": {"type": "object", "properties": {"city": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
        "required": ["name", "population"], "additionalProperties": False}},
        "required": ["city"], "additionalProperties": False},
}
