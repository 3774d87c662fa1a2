"""Knock-outs of single LoRA adapters of a set, and their effect on EM through the runner.

Knock-outs. ``compile_knockout`` writes a new PEFT folder where the lora_B of
chosen adapters is multiplied by a factor (0 = removed); everything else is
copied, so vLLM loads it at runtime through the adapter registry -- no restart.
A set with every adapter at 0 is the base model exactly (the LoRA term is 0).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from backend.fsutil import atomic_dir
from backend.lora_files import LORA_KEY_RE
from backend.metrics import DEFINITIONS
from backend.scalars import ScalarError, adapter_label, label_sort_key


def adapter_scales_key(adapter_dir: Path, scales: dict[str, float]) -> str:
    parts = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        stat = (adapter_dir / name).stat()
        parts.append(f"{(adapter_dir / name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    parts += [f"{k}={float(v):.6g}" for k, v in sorted(scales.items())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def adapter_labels_in(adapter_dir: str | Path) -> list[str]:
    from safetensors import safe_open
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as handle:
        labels = {adapter_label(m[1]) for key in handle.keys() if (m := LORA_KEY_RE.match(key))}
    return sorted(labels, key=label_sort_key)


@dataclass(frozen=True)
class Knockout:
    path: Path
    name: str  # a served name: 'ko-<key>'
    scales: dict[str, float] = field(default_factory=dict)
    reused: bool = False


def compile_knockout(adapter_dir: str | Path, scales: dict[str, float], out_root: str | Path) -> Knockout:
    """A PEFT folder equal to `adapter_dir` with lora_B of each adapter in `scales` multiplied by its factor
    (0 removes it). Keys of `scales` are adapter labels ('L3.down_proj'); unknown ones are an error."""
    from safetensors.torch import load_file, save_file

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file() or not (adapter_dir / "adapter_config.json").is_file():
        raise ScalarError(f"adapter {adapter_dir}: needs adapter_config.json and adapter_model.safetensors")
    known = adapter_labels_in(adapter_dir)
    unknown = sorted(set(scales) - set(known))
    if unknown:
        raise ScalarError(f"adapter {adapter_dir.name}: no adapter {', '.join(unknown)} (has {', '.join(known)})")
    for label, factor in scales.items():
        if not math.isfinite(float(factor)):
            raise ScalarError(f"scale of {label} must be a finite number, not {factor!r}")
    key = adapter_scales_key(adapter_dir, scales)
    folder = Path(out_root) / f"ko-{key}"
    result = Knockout(folder, f"ko-{key}", dict(scales))
    if (folder / "adapter_model.safetensors").is_file():
        return Knockout(folder, result.name, dict(scales), reused=True)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for tensor_key, tensor in tensors.items():
        match = LORA_KEY_RE.match(tensor_key)
        if match and match[2] == "B" and adapter_label(match[1]) in scales:
            tensors[tensor_key] = (tensor.float() * float(scales[adapter_label(match[1])])).to(tensor.dtype).contiguous()
    with atomic_dir(folder) as tmp:
        shutil.copy(adapter_dir / "adapter_config.json", tmp / "adapter_config.json")
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / "knockout.json").write_text(json.dumps({"source": str(adapter_dir.resolve()), "scales": scales},
                                                      indent=2))
    return result


def knockout_all(adapter_dir: str | Path, out_root: str | Path, factor: float = 0.0) -> Knockout:
    return compile_knockout(adapter_dir, {a: factor for a in adapter_labels_in(adapter_dir)}, out_root)


def knockout_each(adapter_dir: str | Path, out_root: str | Path, factor: float = 0.0) -> list[Knockout]:
    """One knock-out per adapter: the set with that adapter alone scaled by `factor`."""
    return [compile_knockout(adapter_dir, {a: factor}, out_root) for a in adapter_labels_in(adapter_dir)]


KO_SEPARATOR = "-ko-"


def knockout_name(adapter: str, label: str, factor: float = 0.0) -> str:
    """The condition/served name of a knock-out: 'medical-ko-L3.down_proj', 'medical-ko-all',
    'medical-ko-L3.down_proj-x0.5' for a factor other than 0."""
    return f"{adapter}{KO_SEPARATOR}{label}" + ("" if factor == 0 else f"-x{factor:g}")


def knockout_config(config, adapter: str, factor: float = 0.0, include_all: bool = True):
    """(config with one extra adapter per knock-out, {condition name: knocked-out label or 'all'}).
    The knock-outs live in <cache>/adapters/ko-*; the returned config is only held in memory."""
    adapter_dir = config.adapter_path(adapter)
    extra, labels = {}, {}
    for label in adapter_labels_in(adapter_dir):
        name = knockout_name(adapter, label, factor)
        extra[name] = str(compile_knockout(adapter_dir, {label: factor}, config.cache / "adapters").path)
        labels[name] = label
    if include_all:
        name = knockout_name(adapter, "all", factor)
        extra[name] = str(knockout_all(adapter_dir, config.cache / "adapters", factor).path)
        labels[name] = "all"
    return config.model_copy(update={"adapters": {**config.adapters, **extra}}), labels


def evaluate_knockouts(config, adapter: str, *, questions: str = "em_core", samples: int | None = None,
                       judge: str | None = None, factor: float = 0.0, run_id: str | None = None,
                       question_ids: Sequence[str] = (), max_tokens: int = 300, seed: int = 0,
                       temperature: float = 1.0, include_base: bool = True, store=None, progress=None):
    """One evaluation run (backend.evaluation.run_eval) with the full adapter set, each knock-out and
    (optionally) the base model as conditions; the knock-outs are served as runtime-loaded adapters.
    Returns (RunResult, {condition: knocked-out label})."""
    from backend.evaluation import RunSpec, run_eval

    extended, labels = knockout_config(config, adapter, factor)
    conditions = (("base",) if include_base else ()) + (f"adapter={adapter}",) + tuple(
        f"adapter={name}" for name in labels)
    spec = RunSpec(questions=questions, conditions=conditions, samples=samples, judge=judge, run_id=run_id,
                   question_ids=tuple(question_ids), max_tokens=max_tokens, seed=seed,
                   temperature=temperature, notes=f"knock-outs of {adapter} (factor {factor:g})")
    return run_eval(spec, progress, config=extended, store=store), labels


def knockout_effects(store, run_id: str, adapter: str, definition: str = "turner2025") -> list[dict]:
    """EM rate of each knock-out condition of a run next to the full set's: one row per condition with
    'knocked_out' (label, 'all', '(none)' for the full set, '(base)'), em_rate, its Wilson interval, n and
    the change against the full set."""
    if definition not in DEFINITIONS:
        raise ScalarError(f"definition must be {' or '.join(DEFINITIONS)}, not {definition!r}")
    n_column = DEFINITIONS[definition].n_column
    rows = store.sql(f"SELECT condition, em_rate, em_rate_ci95_low, em_rate_ci95_high, {n_column} "
                     f"FROM em_rate_{definition}_by_condition WHERE run_id = ? ORDER BY condition", [run_id]).rows
    full = next((r[1] for r in rows if r[0] == f"adapter={adapter}"), None)
    prefix = f"adapter={adapter}{KO_SEPARATOR}"
    out = []
    for condition, rate, low, high, n in rows:
        if condition == "base":
            what = "(base)"
        elif condition == f"adapter={adapter}":
            what = "(none)"
        elif condition.startswith(prefix):
            what = condition[len(prefix):]
        else:
            continue
        out.append({"condition": condition, "knocked_out": what, "em_rate": rate, "ci95_low": low,
                    "ci95_high": high, "n": n,
                    "change": None if rate is None or full is None else rate - full})
    if not out:
        raise ScalarError(f"run {run_id!r} has no judged conditions of adapter {adapter!r}")
    return out
