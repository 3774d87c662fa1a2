"""PEFT LoRA adapter folders on disk: read, check against a base model, write.

This module knows the files and nothing about the server: `serving` (which sizes the
server's LoRA slots from the configured adapters), `adapters` (which loads them into the
server), `ablation` and `scalars` (which compile new adapter folders) all depend on it,
and it depends on none of them, as vLLM's `lora/request.py` is a data type the server
imports and never the other way round.

A folder is `adapter_config.json` plus `adapter_model.safetensors` (or the older
`adapter_model.bin`, read for shapes only). Tensor names are PEFT's:
`base_model.model.<module>.lora_A[.<adapter name>].weight`, parsed by `LORA_KEY_RE` alone.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from backend.architecture import LORA_MODULES, BaseShape, split_module_name
from backend.errors import BackendError

if TYPE_CHECKING:  # serving reads adapter shapes without loading torch
    import torch

SERVABLE_MODULES = frozenset(LORA_MODULES)
# group 1: the module (``model.layers.1.mlp.down_proj``), group 2: A or B. The optional
# segment before ``.weight`` is the adapter name PEFT inserts when it saves a named adapter.
LORA_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterError(BackendError, ValueError):
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

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "rank": self.max_rank,
                "target_modules": list(self.target_modules), "layers": list(self.layers),
                "base_model": self.base_model_name}


@dataclass(frozen=True)
class LoraModule:
    A: torch.Tensor  # [k, in] float32
    B: torch.Tensor  # [out, k] float32
    scaling: float


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

def read_config(name: str, folder: Path) -> dict[str, Any]:
    """The folder's adapter_config.json, refused unless it is a LoRA config with a rank."""
    if not folder.is_dir():
        raise AdapterError(f"adapter {name!r}: folder {folder} does not exist")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: missing {CONFIG_FILE} in {folder}")
    try:
        config = json.loads(config_file.read_text())
        int(config["r"])
    except (ValueError, KeyError, TypeError) as error:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not a valid LoRA config ({error!r})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not LORA")
    return config


def lora_pairs(name: str, keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """module -> {"A": tensor key, "B": tensor key}, and the keys that are not LoRA A/B weights."""
    pairs: dict[str, dict[str, str]] = {}
    other = []
    for key in keys:
        match = LORA_KEY_RE.match(key)
        if match is None:
            other.append(key)
        else:
            pairs.setdefault(match[1], {})[match[2]] = key
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {module} lacks a lora_A or lora_B weight")
    return pairs, other


def _tensor_shapes(name: str, folder: Path) -> dict[str, tuple[int, ...]]:
    weights = folder / WEIGHTS_FILE
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
    raise AdapterError(f"adapter {name!r}: no {WEIGHTS_FILE} (or .bin) in {folder}")


def read_adapter_files(name: str, path: str | Path) -> AdapterFiles:
    """Rank, target modules, layers and every module's shape, from the config and the tensor
    headers (no weights are loaded)."""
    folder = Path(path)
    adapter_config = read_config(name, folder)
    rank = int(adapter_config["r"])
    modules: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    unservable: set[str] = set()
    for key, shape in _tensor_shapes(name, folder).items():
        match = LORA_KEY_RE.match(key)
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


def pattern_value(pattern: dict[str, Any] | None, module: str) -> Any:
    """The value of the first key of a PEFT rank_pattern/alpha_pattern that matches `module`, or None."""
    # PEFT's rule (peft.utils.other.get_pattern_key), also used by vLLM's PEFTHelper.
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def read_lora(adapter_dir: str | Path) -> dict[str, LoraModule]:
    """module name (e.g. ``model.layers.1.mlp.down_proj``) -> A, B (float32) and scaling, with
    PEFT's alpha_pattern and rsLoRA rules applied."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    name = str(adapter_dir)
    config = read_config(name, adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"adapter {name!r}: needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    for flag, reason in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
        if config.get(flag):
            raise AdapterError(f"adapter {name!r}: {reason} is not supported (vLLM cannot serve it either)")
    tensors = load_file(weights)
    pairs, other = lora_pairs(name, tensors)
    if other:
        raise AdapterError(f"adapter {name!r}: unsupported tensor {other[0]!r} (only lora_A/lora_B of "
                           "linear modules)")
    modules = {}
    for module, keys in pairs.items():
        A, B = tensors[keys["A"]].float(), tensors[keys["B"]].float()
        rank = A.shape[0]
        alpha = pattern_value(config.get("alpha_pattern"), module)
        alpha = float(config.get("lora_alpha", config["r"]) if alpha is None else alpha)
        scaling = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
        modules[module] = LoraModule(A, B, scaling)
    return modules


# ---------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def adapter_config(target_modules: Iterable[str], rank: int, base_model: str | Path, *,
                   rank_pattern: dict[str, int] | None = None, layers: Iterable[int] | None = None) -> dict[str, Any]:
    """An adapter_config.json that PEFT and vLLM read the same way: scaling 1 (lora_alpha = r,
    and alpha_pattern = rank_pattern), no DoRA, no rsLoRA, no bias."""
    pattern = dict(rank_pattern or {})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
            "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0, "bias": "none",
            "target_modules": list(target_modules), "layers_to_transform": list(layers) if layers else None,
            "base_model_name_or_path": str(base_model), "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "modules_to_save": None, "inference_mode": True}


def shared_rank(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(the rank most modules have, exact escaped per-module patterns for the others)."""
    # PEFT and vLLM match pattern keys with the same suffix rule (pattern_value).
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    default = max(counts, key=lambda rank: (counts[rank], rank))
    return default, {re.escape(m): rank for m, rank in ranks.items() if rank != default}


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write the two files of an adapter folder (the caller makes the folder appear atomically)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return folder


def write_lora(base_dir: Path, out_dir: Path, rank: int, target_modules: list[str],
               layers: list[int] | None = None, seed: int = 0, std: float = 0.02) -> Path:
    """A PEFT LoRA adapter with random A and B, written straight from the base's
    config.json: no base weights are loaded, so adapters for a 14B shape take a second."""
    import torch

    shape = BaseShape.from_model(str(base_dir))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers if layers is not None else range(shape.num_layers):
        for module in target_modules:
            prefix = f"base_model.model.{shape.arch.lora_module_name(layer, module)}"
            fan_in, fan_out = shape.features(module)
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) * std).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * std).bfloat16()
    return save_adapter(Path(out_dir), tensors,
                        adapter_config(target_modules, rank, Path(base_dir).resolve(), layers=layers))
