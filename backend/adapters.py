"""LoRA adapters as named resources of the running vLLM server.

An adapter is read from its PEFT folder (`backend.lora_files`: rank, target
modules and layers come from `adapter_config.json` and the tensors, never from
typing), checked against the base model and the server's limits before vLLM
ever sees it, and then loaded or unloaded at runtime through `/v1/load_lora_adapter`.

The registry's own record (`<cache>/adapters.json`) holds what we asked the
server to hold and when each adapter was last used: the server's `/v1/models`
is the truth about what is loaded now, the record is what to restore after a
restart and what to evict first when the server is full.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import httpx

from backend.architecture import BaseShape
from backend.config import Config, ConfigError
from backend.fsutil import atomic_write_json, file_lock
from backend.lora_files import AdapterError, AdapterFiles, check_compatible, read_adapter_files
from backend.serving import ServerError, auth_headers, read_state, server_status, server_url

@dataclass
class AdapterRecord:
    name: str
    path: str
    last_used: float
    loaded: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class AdapterRegistry:
    """Load, unload and list the adapters of the server a configuration points at."""

    def __init__(self, config: Config, timeout_s: float = 120.0):
        self.config = config
        self.timeout_s = timeout_s
        self._record_path = config.cache / "adapters.json"

    @property
    def url(self) -> str:
        return server_url(self.config)

    @contextmanager
    def _record(self):
        """The record, read and written under an exclusive lock: the dashboard
        and CLI runs share it."""
        with file_lock(self._record_path.with_suffix(".lock")):
            try:
                record = json.loads(self._record_path.read_text()) if self._record_path.exists() else {}
            except ValueError:
                record = {}  # a record cut short by a crash only loses LRU order
            yield record
            atomic_write_json(self._record_path, record, indent=2)

    def _limits(self) -> tuple[int | None, int, list[str] | None]:
        """(max LoRA rank, adapters held, modules with LoRA layers) of the server; for a server
        we did not start, what the configuration says (None: not known)."""
        state = read_state(self.config)
        if state and state.url == self.url:
            return state.max_lora_rank, state.max_cpu_loras, state.lora_target_modules
        return self.config.server.max_lora_rank, self.config.server.max_cpu_loras, None

    def served(self) -> dict[str, str]:
        """name -> path of the adapters the server holds now."""
        status = server_status(self.config)
        if not status.healthy:
            raise ServerError(status.error or f"vLLM server at {self.url} is not healthy")
        return {entry["name"]: entry["path"] for entry in status.adapters}

    def list(self) -> list[AdapterRecord]:
        served = self.served()
        with self._record() as record:
            known = dict(record)
        rows = {name: AdapterRecord(name, path, known.get(name, {}).get("last_used", 0.0), True)
                for name, path in served.items()}
        for name in self.config.adapters:
            try:
                path = self.config.adapter_path(name)
            except ConfigError as error:  # a Hub adapter missing from the cache: listed, with the reason
                path = str(error)
            rows.setdefault(name, AdapterRecord(name, path, known.get(name, {}).get("last_used", 0.0)))
        return sorted(rows.values(), key=lambda row: row.name)

    def inspect(self, name: str, path: str | None = None) -> AdapterFiles:
        """Read and check an adapter against the base model and server limits."""
        # The configuration's rule for names, also for adapters loaded by hand (Home's form, the CLI).
        if not name or "/" in name or name.strip() != name:
            raise AdapterError(f"adapter name {name!r} must be non-empty, without '/' or spaces at the ends")
        files = read_adapter_files(name, path or self.config.adapter_path(name))
        max_rank, _, served_modules = self._limits()
        check_compatible(files, BaseShape.from_model(self.config.base_model_path), max_rank, served_modules)
        return files

    @contextmanager
    def _changing(self):
        """One load-or-evict sequence at a time, across threads and processes (the chat page's
        columns and prefetch, a CLI run): two at once would both evict the same adapter."""
        with file_lock(self._record_path.with_suffix(".changes.lock")):
            yield

    def load(self, name: str, path: str | None = None) -> AdapterFiles:
        files = self.inspect(name, path)
        with self._changing():
            served = self.served()
            if served.get(name) == files.path:
                self.touch(name)
                return files
            _, capacity, _ = self._limits()
            if name in served:
                self._post("unload", {"lora_name": name})
                del served[name]
            self._evict_for_one_more(served, capacity)
            self._post("load", {"lora_name": name, "lora_path": files.path})
            with self._record() as record:
                record[name] = {"path": files.path, "last_used": time.time()}
        return files

    def unload(self, name: str) -> None:
        if name not in self.served():
            raise AdapterError(f"adapter {name!r} is not loaded on the server at {self.url}")
        self._post("unload", {"lora_name": name})
        with self._record() as record:
            record.pop(name, None)

    def touch(self, name: str) -> None:
        with self._record() as record:
            if name in record:
                record[name]["last_used"] = time.time()

    def restore(self) -> list[str]:
        """Load again what the server held before it restarted, most recently used first."""
        with self._record() as record:
            wanted = sorted(record.items(), key=lambda item: -item[1].get("last_used", 0.0))
        _, capacity, _ = self._limits()
        restored = []
        for name, entry in wanted[:capacity]:
            try:
                self.load(name, entry["path"])
                restored.append(name)
            except (AdapterError, ServerError):
                with self._record() as record:
                    record.pop(name, None)
        return restored

    def _evict_for_one_more(self, served: dict[str, str], capacity: int) -> None:
        if len(served) < capacity:
            return
        with self._record() as record:
            by_age = sorted(served, key=lambda n: record.get(n, {}).get("last_used", 0.0))
        for name in by_age[: len(served) - capacity + 1]:
            self._post("unload", {"lora_name": name})
            with self._record() as record:
                record.pop(name, None)

    def _post(self, action: str, payload: dict) -> None:
        try:
            response = httpx.post(f"{self.url}/v1/{action}_lora_adapter", json=payload,
                                  headers=auth_headers(self.config), timeout=self.timeout_s)
        except httpx.HTTPError as error:
            raise ServerError(f"vLLM server at {self.url} is not reachable: {error}") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise AdapterError(f"adapter {payload['lora_name']!r}: the server refused to {action} it: {message}")
