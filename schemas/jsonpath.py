"""A small, strict JSONPath subset for meters: ``$.a.b``, ``$.a[0]``, ``$["key with.dots"]``.

Pure: compile once (raises ValueError naming the problem), then ``extract(obj)``.
``$`` is the event's ``properties`` object (also accepted: ``$.properties.x`` is NOT special).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_MISSING: Any = object()
MISSING: Any = _MISSING

_TOKEN = re.compile(
    r"""\.(?P<name>[A-Za-z_$][A-Za-z0-9_$\-]*)   # .name
      | \[(?P<index>-?\d+)\]                      # [0]
      | \[(?P<q>["'])(?P<key>(?:\\.|(?!(?P=q)).)*)(?P=q)\]  # ["key"]
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class JsonPath:
    text: str
    steps: tuple[str | int, ...]

    def extract(self, obj: Any) -> Any:
        """The value at this path, or ``MISSING``."""
        cur = obj
        for step in self.steps:
            if isinstance(step, int):
                if not isinstance(cur, list) or not -len(cur) <= step < len(cur):
                    return MISSING
                cur = cur[step]
            else:
                if not isinstance(cur, dict) or step not in cur:
                    return MISSING
                cur = cur[step]
        return cur


def compile_path(text: str) -> JsonPath:
    if not isinstance(text, str) or not text.startswith("$"):
        raise ValueError(f"JSONPath must start with '$': {text!r}")
    pos = 1
    steps: list[str | int] = []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"invalid JSONPath {text!r} at position {pos}")
        if m.group("name") is not None:
            steps.append(m.group("name"))
        elif m.group("index") is not None:
            steps.append(int(m.group("index")))
        else:
            steps.append(re.sub(r"\\(.)", r"\1", m.group("key")))
        pos = m.end()
    if not steps:
        raise ValueError(f"JSONPath {text!r} selects the whole object; name a property")
    return JsonPath(text, tuple(steps))


def json_kind(v: Any) -> str:
    """The JSON type of a decoded value, as error messages name it (``null``, ``boolean``,
    ``number``, ``string``, ``array``, ``object``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object" if isinstance(v, dict) else "value"
