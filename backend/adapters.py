"""LoRA adapters as named resources of the running vLLM server.

An adapter is read from its PEFT folder (rank, target modules and layers come
from `adapter_config.json` and the tensors, never from typing), checked
against the base model and the server's limits before vLLM ever sees it, and
then loaded or unloaded at runtime through `/v1/load_lora_adapter`.

The registry's own record (`<cache>/adapters.json`) holds what we asked the
server to hold and when each adapter was last used: the server's `/v1/models`
is the truth about what is loaded now, the record is what to restore after a
restart and what to evict first when the server is full.
"""
from __future__ import annotations

import fcntl
import json
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from backend.architecture import LORA_MODULES, BaseShape, split_module_name
from backend.config import Config, ConfigError
from backend.serving import ServerError, auth_headers, read_state, server_status, server_url

SERVABLE_MODULES = frozenset(LORA_MODULES)
_LORA_TENSOR = re.compile(r"^(.+)\.lora_([AB])(?:\.[a-z_]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names it and the reason."""


@dataclass(frozen=True)
class AdapterFiles:
    name: str
    path: str
    rank: int
    max_rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    base_model_name: str | None
    # (layer, module) -> (rank, in_features, out_features)
    modules: dict[tuple[int, str], tuple[int, int, int]]

    def summary(self) -> dict:
        return {"name": self.name, "path": self.path, "rank": self.max_rank,
                "target_modules": list(self.target_modules), "layers": list(self.layers),
                "base_model": self.base_model_name}


def _tensor_shapes(name: str, folder: Path) -> dict[str, tuple[int, ...]]:
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(weights), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as error:  # safetensors raises several types for damaged files
            raise AdapterError(f"adapter {name!r}: {weights} is corrupt ({error})") from None
    legacy = folder / "adapter_model.bin"
    if legacy.is_file():
        import torch
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as error:
            raise AdapterError(f"adapter {name!r}: {legacy} is corrupt ({error})") from None
        return {key: tuple(value.shape) for key, value in state.items()}
    raise AdapterError(f"adapter {name!r}: no adapter_model.safetensors (or .bin) in {folder}")


def read_adapter_files(name: str, path: str | Path) -> AdapterFiles:
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: folder {folder} does not exist")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: missing adapter_config.json in {folder}")
    try:
        adapter_config = json.loads(config_file.read_text())
        rank = int(adapter_config["r"])
    except (ValueError, KeyError, TypeError) as error:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not a valid LoRA config ({error!r})") from None
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {adapter_config.get('peft_type')!r} is not LORA")

    modules: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    unservable: set[str] = set()
    for key, shape in _tensor_shapes(name, folder).items():
        match = _LORA_TENSOR.match(key)
        found = split_module_name(match[1]) if match else None
        if found is None:
            unservable.add(re.split(r"\.(?:lora_|base_layer)", key.removeprefix("base_model.model."))[0])
            continue
        (layer, module), side = found, match[2]
        if module not in SERVABLE_MODULES:
            unservable.add(f"layers.{layer}.{module}")
        modules.setdefault((layer, module), {})[side] = shape
    if unservable:
        raise AdapterError(
            f"adapter {name!r}: targets modules vLLM cannot serve LoRA on: {', '.join(sorted(unservable)[:5])} "
            f"(servable: {', '.join(sorted(SERVABLE_MODULES))})")
    if not modules:
        raise AdapterError(f"adapter {name!r}: no LoRA weights in {folder}")

    shapes: dict[tuple[int, str], tuple[int, int, int]] = {}
    for (layer, module), sides in modules.items():
        if set(sides) != {"A", "B"} or len(sides["A"]) != 2 or len(sides["B"]) != 2:
            raise AdapterError(f"adapter {name!r}: layers.{layer}.{module} lacks a 2-D lora_A or lora_B weight")
        (a_rank, in_features), (out_features, b_rank) = sides["A"], sides["B"]
        if a_rank != b_rank:
            raise AdapterError(f"adapter {name!r}: layers.{layer}.{module} has lora_A rank {a_rank} "
                               f"but lora_B rank {b_rank}")
        shapes[(layer, module)] = (a_rank, in_features, out_features)
    return AdapterFiles(
        name=name, path=str(folder.resolve()), rank=rank,
        max_rank=max(rank, *(r for r, _, _ in shapes.values())),
        lora_alpha=float(adapter_config.get("lora_alpha", rank)),
        target_modules=tuple(sorted({module for _, module in shapes})),
        layers=tuple(sorted({layer for layer, _ in shapes})),
        base_model_name=adapter_config.get("base_model_name_or_path"),
        modules=shapes,
    )


def write_lora(base_dir: Path, out_dir: Path, rank: int, target_modules: list[str],
               layers: list[int] | None = None, seed: int = 0, std: float = 0.02) -> Path:
    """A PEFT LoRA adapter with random A and B, written straight from the base's
    config.json: no base weights are loaded, so adapters for a 14B shape take a second."""
    import torch
    from safetensors.torch import save_file

    shape = BaseShape.from_model(str(base_dir))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers if layers is not None else range(shape.num_layers):
        for module in target_modules:
            prefix = f"base_model.model.{shape.arch.lora_module_name(layer, module)}"
            fan_in, fan_out = shape.features(module)
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) * std).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * std).bfloat16()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": list(target_modules), "layers_to_transform": list(layers) if layers else None,
        "base_model_name_or_path": str(Path(base_dir).resolve()), "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }, indent=2))
    return out_dir


def check_compatible(files: AdapterFiles, base: BaseShape, max_lora_rank: int | None,
                     served_modules: list[str] | None = None) -> None:
    if max_lora_rank is not None and files.max_rank > max_lora_rank:
        raise AdapterError(f"adapter {files.name!r}: rank {files.max_rank} is above the server's "
                           f"max LoRA rank {max_lora_rank} (raise server.max_lora_rank and restart)")
    missing = sorted(set(files.target_modules) - set(served_modules)) if served_modules is not None else []
    if missing:
        raise AdapterError(f"adapter {files.name!r}: targets {', '.join(missing)}, but the server has LoRA layers "
                           f"only on {', '.join(served_modules)} (add the adapter to the configuration, or set "
                           "server.lora_target_modules = \"all\", and restart)")
    for (layer, module), (_, in_features, out_features) in sorted(files.modules.items()):
        if layer >= base.num_layers:
            raise AdapterError(f"adapter {files.name!r}: made for another base model: it has layer {layer} "
                               f"but the base model has {base.num_layers} layers")
        expected = base.features(module)
        if (in_features, out_features) != expected:
            raise AdapterError(
                f"adapter {files.name!r}: made for another base model: layers.{layer}.{module} maps "
                f"{in_features} -> {out_features} features, the base model's maps {expected[0]} -> {expected[1]}")


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
        lock_path = self._record_path.with_suffix(".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                record = json.loads(self._record_path.read_text()) if self._record_path.exists() else {}
            except ValueError:
                record = {}  # a record cut short by a crash only loses LRU order
            yield record
            tmp = self._record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(self._record_path)

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
        with open(self._record_path.with_suffix(".changes.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
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
