"""Output helpers every command shares."""
from __future__ import annotations

import json
from typing import Any


def emit(data: Any, as_json: bool, text: str) -> None:
    """Print `data` as JSON for --json, else the human-readable `text`."""
    print(json.dumps(data, indent=2, default=str) if as_json else text)
