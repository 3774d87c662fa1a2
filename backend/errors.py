"""The root of every error the backend raises on purpose.

Each module keeps its own error class (`AdapterError`, `StoreError`, ...), named after
what went wrong and worded for the person who gave the input; all of them derive from
`BackendError`, so a caller that only wants "the backend refused, show the message"
(the CLI, a page) catches one class instead of a list that goes stale. Each class also
keeps its old builtin base (ValueError for bad input, RuntimeError for a failing
service), so code that catches those goes on working.
"""
from __future__ import annotations


class BackendError(Exception):
    """A refusal or failure the backend explains in its message (the thing, and why)."""
