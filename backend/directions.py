"""Directions in the residual stream: extraction, storage, import/export, comparison.

A ``Direction`` is one vector per layer, ``[n_layers, d_model]``, row L living
in the residual stream after decoder block L (see ``backend.reference``). Our
files are safetensors with one tensor ``vectors`` and the metadata as JSON
under the metadata key ``direction``, kept in ``<cache>/directions/NAME.safetensors``.

Every path into the cache (extract, import) validates first and writes last,
through a temporary file renamed into place, so a refused direction leaves
nothing behind.

Registering a direction in the DuckDB store belongs to ``backend/store.py``:
the functions that write here accept ``on_saved(direction, path)``, and
``store_registrar(store)`` makes that callback from a ``Store`` (fields from
``Direction.to_record(path)``, the columns of ``store.DirectionRecord``). The
CLI registers what it writes.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from backend.architecture import BaseShape
from backend.errors import BackendError
from backend.fsutil import atomic_path

if TYPE_CHECKING:  # types only: the store and transformers are not needed to read a direction
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from backend.activations import ActivationStats, Example
    from backend.store import Store

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OnSaved = Callable[["Direction", Path], None]


class DirectionError(BackendError, ValueError):
    """A direction that cannot be used, with the file (or name) and the reason."""


# ---------------------------------------------------------------------------
# Base model identity, read lazily from the checkpoint
# ---------------------------------------------------------------------------

def safetensors_index(model_dir: str | Path) -> dict[str, Path]:
    """tensor name -> file holding it, for single-file and sharded checkpoints."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, "pt") as handle:
            return {name: single for name in handle.keys()}
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


@dataclass(frozen=True)
class BaseModelInfo:
    """What a direction must agree with: width, depth and a fingerprint of the weights.
    A base of an unsupported architecture is refused (ArchitectureError)."""

    path: str
    hidden_size: int
    n_layers: int
    fingerprint: str
    shape: BaseShape = field(repr=False, compare=False)

    @classmethod
    def from_path(cls, model_dir: str | Path) -> "BaseModelInfo":
        model_dir = Path(model_dir)
        config_file = model_dir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{model_dir}: no config.json (a local base model folder is needed)")
        raw = json.loads(config_file.read_text())
        shape = BaseShape.from_config(raw)
        arch = shape.arch
        config = raw.get("text_config", raw)
        digest = hashlib.sha256()
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
            digest.update(f"{key}={config.get(key)};".encode())
        # A few embedding rows tell apart checkpoints of the same shape (e.g. two
        # random test models) at the cost of reading a few KB.
        try:
            files = safetensors_index(model_dir)
        except FileNotFoundError:
            files = {}
        name = arch.embedding_tensor_name
        if name in files:
            from safetensors import safe_open

            with safe_open(files[name], "pt") as handle:
                digest.update(handle.get_slice(name)[:4].float().numpy().tobytes())
        return cls(str(model_dir.resolve()), shape.hidden, shape.num_layers, digest.hexdigest()[:16], shape)


# ---------------------------------------------------------------------------
# The Direction
# ---------------------------------------------------------------------------

@dataclass
class Direction:
    name: str
    vectors: torch.Tensor  # [n_layers, d_model] float32
    base_model: str
    base_fingerprint: str
    adapter: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"misaligned": 120, "aligned": 380}
    source_run: str | None = None
    method: str = "mean_diff"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vectors = torch.as_tensor(np.asarray(self.vectors) if not torch.is_tensor(self.vectors)
                                       else self.vectors, dtype=torch.float32).detach().cpu()

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def norms(self) -> list[float]:
        return torch.linalg.vector_norm(self.vectors, dim=1).tolist()

    def unit(self, layer: int) -> torch.Tensor:
        if not 0 <= layer < self.n_layers:
            raise DirectionError(f"direction {self.name!r}: layer {layer} out of range 0..{self.n_layers - 1}")
        v = self.vectors[layer]
        norm = torch.linalg.vector_norm(v)
        if norm == 0:
            raise DirectionError(f"direction {self.name!r}: layer {layer} has zero norm")
        return v / norm

    def metadata(self) -> dict:
        return {"name": self.name, "base_model": self.base_model, "base_fingerprint": self.base_fingerprint,
                "adapter": self.adapter, "counts": self.counts, "source_run": self.source_run,
                "method": self.method, "created": self.created, "norms": self.norms,
                "n_layers": self.n_layers, "d_model": self.d_model, "extra": self.extra}

    def to_record(self, path: str | Path) -> dict:
        """Keyword arguments of ``backend.store.DirectionRecord``."""
        return {"name": self.name, "path": str(path), "base_model": self.base_model, "adapter": self.adapter,
                "layers": list(range(self.n_layers)), "counts": dict(self.counts),
                "norms": {str(i): n for i, n in enumerate(self.norms)}, "source_run": self.source_run,
                "extra": {**self.extra, "base_fingerprint": self.base_fingerprint, "method": self.method,
                          "d_model": self.d_model, "created": self.created}}

    def to_row(self, path: str | Path | None = None) -> dict:
        """Flat dict for the store (lists and dicts JSON-encoded)."""
        meta = self.metadata()
        return {"name": self.name, "path": str(path) if path else None, "base_model": self.base_model,
                "base_fingerprint": self.base_fingerprint, "adapter": self.adapter,
                "n_layers": self.n_layers, "d_model": self.d_model, "method": self.method,
                "source_run": self.source_run, "created": self.created,
                "counts_json": json.dumps(meta["counts"]), "norms_json": json.dumps(meta["norms"]),
                "extra_json": json.dumps(self.extra)}


def store_registrar(store: Store) -> OnSaved:
    """``on_saved`` callback that registers each saved direction in ``store`` (a ``backend.store.Store``)."""
    from backend.store import DirectionRecord

    def register(direction: Direction, path: Path) -> None:
        store.add_direction(DirectionRecord(**direction.to_record(path)))
    return register


def validate(vectors: torch.Tensor, base: BaseModelInfo, what: str,
             base_fingerprint: str | None = None) -> torch.Tensor:
    """Return vectors as float32 [n_layers, d_model] or raise DirectionError naming ``what``."""
    v = torch.as_tensor(vectors).detach().cpu()
    if v.ndim == 1:
        v = v.unsqueeze(0).expand(base.n_layers, -1)
    if v.ndim != 2:
        raise DirectionError(f"{what}: expected one vector or one per layer, got shape {tuple(v.shape)}")
    if v.shape[1] != base.hidden_size:
        raise DirectionError(f"{what}: width {v.shape[1]} does not match the base model's hidden size "
                             f"{base.hidden_size} ({base.path})")
    if v.shape[0] != base.n_layers:
        hint = (" (looks like output_hidden_states with the embedding at index 0: drop row 0 and pass one "
                "row per block)") if v.shape[0] == base.n_layers + 1 else ""
        raise DirectionError(f"{what}: {v.shape[0]} layers, the base model has {base.n_layers}{hint}")
    v = v.to(torch.float32).contiguous()
    bad = ~torch.isfinite(v).all(dim=1)
    if bad.any():
        raise DirectionError(f"{what}: NaN or inf in layer(s) {bad.nonzero().flatten().tolist()}")
    zero = torch.linalg.vector_norm(v, dim=1) == 0
    if zero.any():
        raise DirectionError(f"{what}: zero norm in layer(s) {zero.nonzero().flatten().tolist()}")
    if base_fingerprint and base_fingerprint != base.fingerprint:
        raise DirectionError(f"{what}: made for another base model (fingerprint {base_fingerprint}, "
                             f"this base {base.path} is {base.fingerprint})")
    return v


def _check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise DirectionError(f"direction name {name!r}: use letters, digits, '.', '_' or '-' (max 100)")
    return name


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------

def directions_dir(cache: str | Path) -> Path:
    return Path(cache) / "directions"


def direction_path(cache: str | Path, name: str) -> Path:
    return directions_dir(cache) / f"{_check_name(name)}.safetensors"


def _write_safetensors(direction: Direction, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"vectors": direction.vectors.contiguous()}, str(tmp),
                  metadata={"direction": json.dumps(direction.metadata())})


def save_direction(direction: Direction, cache: str | Path, base: BaseModelInfo, overwrite: bool = False,
                   on_saved: OnSaved | None = None) -> Path:
    """Validate then write ``direction`` into the cache."""
    path = direction_path(cache, direction.name)
    if path.exists() and not overwrite:
        raise DirectionError(f"direction {direction.name!r} already exists at {path} (choose another name)")
    direction.vectors = validate(direction.vectors, base, f"direction {direction.name!r}", direction.base_fingerprint)
    _write_safetensors(direction, path)
    if on_saved is not None:
        on_saved(direction, path)
    return path


def _open_safetensors(path: Path):
    """safe_open, with a file that is not safetensors refused as a DirectionError naming it."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as error:
        raise DirectionError(f"{path}: not a readable safetensors file ({error})") from None


def read_direction_file(path: str | Path) -> Direction:
    """One of our safetensors files (with metadata)."""
    path = Path(path)
    with _open_safetensors(path) as handle:
        meta = (handle.metadata() or {}).get("direction")
        if meta is None or "vectors" not in handle.keys():
            raise DirectionError(f"{path}: not a direction file of this project (no 'direction' metadata)")
        vectors = handle.get_tensor("vectors")
    meta = json.loads(meta)
    return Direction(name=meta["name"], vectors=vectors, base_model=meta["base_model"],
                     base_fingerprint=meta["base_fingerprint"], adapter=meta.get("adapter"),
                     counts=meta.get("counts", {}), source_run=meta.get("source_run"),
                     method=meta.get("method", "mean_diff"), created=meta.get("created", ""),
                     extra=meta.get("extra", {}))


def load_direction(cache: str | Path, name: str) -> Direction:
    path = direction_path(cache, name)
    if not path.is_file():
        known = ", ".join(list_directions(cache)) or "none"
        raise DirectionError(f"no direction named {name!r} in {directions_dir(cache)} (known: {known})")
    return read_direction_file(path)


def list_directions(cache: str | Path) -> list[str]:
    folder = directions_dir(cache)
    return sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def _tensor_from_foreign(obj, path: Path) -> torch.Tensor:
    """A tensor from what other code saves: a tensor, a list of per-layer
    tensors, a dict layer -> tensor, or a dict with one tensor-valued entry."""
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        return torch.as_tensor(obj)
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise DirectionError(f"{path}: empty list")
        return torch.stack([torch.as_tensor(x).flatten() for x in obj])
    if isinstance(obj, dict):
        if obj and all(str(k).lstrip("-").isdigit() for k in obj):
            keys = sorted(obj, key=lambda k: int(k))
            if [int(k) for k in keys] != list(range(len(keys))):
                raise DirectionError(f"{path}: layer keys {[int(k) for k in keys]} are not 0..{len(keys) - 1}")
            return torch.stack([torch.as_tensor(obj[k]).flatten() for k in keys])
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v) or isinstance(v, (list, np.ndarray))}
        if len(tensors) == 1:
            return _tensor_from_foreign(next(iter(tensors.values())), path)
        raise DirectionError(f"{path}: a dict with keys {sorted(map(str, obj))[:8]}; expected one tensor "
                             "or layer-indexed entries")
    raise DirectionError(f"{path}: holds a {type(obj).__name__}, expected a tensor or a list of tensors")


def import_direction(path: str | Path, name: str, cache: str | Path, base: BaseModelInfo,
                     adapter: str | None = None, source_run: str | None = None, drop_first: bool = False,
                     overwrite: bool = False, on_saved: OnSaved | None = None) -> Direction:
    """Bring in a direction made elsewhere (``.pt`` or ``.safetensors``).

    ``drop_first`` drops row 0, for per-layer lists taken from
    ``output_hidden_states`` (whose index 0 is the embedding)."""
    path = Path(path)
    _check_name(name)
    if not path.is_file():
        raise DirectionError(f"{path}: no such file")
    fingerprint = None
    meta: dict = {}
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as handle:
            keys = list(handle.keys())
            file_meta = handle.metadata() or {}
            if "direction" in file_meta and "vectors" in keys:
                meta = json.loads(file_meta["direction"])
                fingerprint = meta.get("base_fingerprint")
                raw = handle.get_tensor("vectors")
            elif len(keys) == 1:
                raw = handle.get_tensor(keys[0])
            elif keys and all(k.isdigit() for k in keys):
                raw = _tensor_from_foreign({k: handle.get_tensor(k) for k in keys}, path)
            else:
                raise DirectionError(f"{path}: tensors {keys[:8]}; expected one tensor or layer-numbered tensors")
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickles with code are refused by weights_only, on purpose
            raise DirectionError(f"{path}: could not be read safely as tensors ({error})") from None
        raw = _tensor_from_foreign(obj, path)
    else:
        raise DirectionError(f"{path}: unknown format {path.suffix!r} (use .pt or .safetensors)")
    if drop_first:
        raw = raw[1:]
    vectors = validate(raw, base, str(path), fingerprint)
    direction = Direction(name=name, vectors=vectors, base_model=base.path, base_fingerprint=base.fingerprint,
                          adapter=adapter if adapter is not None else meta.get("adapter"),
                          counts=meta.get("counts", {}), source_run=source_run or meta.get("source_run"),
                          method=meta.get("method", "imported"),
                          extra={"imported_from": str(path.resolve()), "single_vector": raw.ndim == 1,
                                 "dropped_first_row": drop_first})
    save_direction(direction, cache, base, overwrite=overwrite, on_saved=on_saved)
    return direction


def export_direction(direction: Direction, path: str | Path) -> Path:
    """``.safetensors`` keeps the metadata; ``.pt`` is a plain [n_layers, d_model] tensor."""
    path = Path(path)
    if path.suffix == ".safetensors":
        _write_safetensors(direction, path)
    elif path.suffix in (".pt", ".pth"):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(direction.vectors.clone(), path)
    else:
        raise DirectionError(f"{path}: export as .safetensors or .pt")
    return path


# ---------------------------------------------------------------------------
# Extraction and comparison
# ---------------------------------------------------------------------------

def mean_diff(misaligned: ActivationStats, aligned: ActivationStats) -> torch.Tensor:
    """Per-layer mean over misaligned minus mean over aligned (``ActivationStats`` each)."""
    if misaligned.pooling != aligned.pooling:
        raise ValueError("both classes must use the same pooling")
    return (misaligned.mean() - aligned.mean()).float()


def extract_direction(name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, misaligned: Sequence[Example],
                      aligned: Sequence[Example], base: BaseModelInfo,
                      adapter: str | None = None, source_run: str | None = None, batch_size: int = 8,
                      max_answer_tokens: int | None = 256, pooling: str = "tokens") -> Direction:
    """Mean-diff direction from two lists of ``activations.Example`` (not saved)."""
    from backend.activations import answer_activation_sums

    _check_name(name)
    if not misaligned or not aligned:
        raise DirectionError(f"direction {name!r}: need examples of both classes "
                             f"(misaligned: {len(misaligned)}, aligned: {len(aligned)})")
    mis = answer_activation_sums(model, tokenizer, misaligned, batch_size, max_answer_tokens, pooling)
    ali = answer_activation_sums(model, tokenizer, aligned, batch_size, max_answer_tokens, pooling)
    return Direction(name=name, vectors=mean_diff(mis, ali), base_model=base.path,
                     base_fingerprint=base.fingerprint, adapter=adapter,
                     counts={"misaligned": mis.examples - len(mis.skipped), "aligned": ali.examples - len(ali.skipped),
                             "misaligned_tokens": mis.tokens, "aligned_tokens": ali.tokens},
                     source_run=source_run, method=f"mean_diff/{pooling}",
                     extra={"tokens_per_s": (mis.tokens + ali.tokens) / max(mis.seconds + ali.seconds, 1e-9)})


def random_control(direction: Direction, name: str, seed: int = 0) -> Direction:
    """A random direction with exactly the norm of ``direction`` at every layer.

    The authors' code builds its control as ``randn_like(v) * ||v||``, whose norm is about
    sqrt(d) times ||v||; the paper says "the same norm", which is what this gives."""
    _check_name(name)
    noise = torch.randn(direction.vectors.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    norms = torch.linalg.vector_norm(direction.vectors.double(), dim=1, keepdim=True)
    vectors = noise / torch.linalg.vector_norm(noise, dim=1, keepdim=True) * norms
    return Direction(name=name, vectors=vectors.float(), base_model=direction.base_model,
                     base_fingerprint=direction.base_fingerprint, adapter=direction.adapter,
                     method="random_control", extra={"control_of": direction.name, "seed": seed})


def cosine(a: Direction, b: Direction) -> list[float]:
    """Cosine similarity per layer."""
    if a.vectors.shape != b.vectors.shape:
        raise DirectionError(f"cannot compare {a.name!r} {tuple(a.vectors.shape)} with {b.name!r} "
                             f"{tuple(b.vectors.shape)}")
    return torch.nn.functional.cosine_similarity(a.vectors.double(), b.vectors.double(), dim=1).tolist()


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

_MISALIGNED = {"misaligned", "1", "true", "yes", "bad"}
_ALIGNED = {"aligned", "0", "false", "no", "good"}


def _read_rows(path: Path) -> list[dict]:
    import csv
    import gzip

    name = path.name.removesuffix(".gz")
    opener = gzip.open if path.name.endswith(".gz") else open
    if name.endswith(".jsonl"):
        with opener(path, "rt", encoding="utf-8") as handle:
            rows = []
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as error:
                        raise DirectionError(f"{path}: line {number} is not JSON ({error})") from None
            return rows
    if name.endswith(".csv"):
        with opener(path, "rt", newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    raise DirectionError(f"{path}: use .jsonl, .jsonl.gz or .csv")


def _example(row: dict, path: Path, number: int, prompt_column: str, response_column: str):
    """A row's (prompt, response): columns, or the paper's {"messages": [...]} form, whose last
    user turn is the prompt and last assistant turn the response."""
    from backend.activations import Example

    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DirectionError(f"{path}: line {number}: 'messages' must be a list of {{role, content}} objects")
        users = [m.get("content") for m in messages if m["role"] == "user"]
        answers = [m.get("content") for m in messages if m["role"] == "assistant"]
        if not users or not answers or not isinstance(answers[-1], str) or not answers[-1].strip():
            raise DirectionError(f"{path}: line {number}: needs a user message and a non-empty assistant message")
        return Example(str(users[-1]), answers[-1])
    for column in (prompt_column, response_column):
        if column not in row:
            raise DirectionError(f"{path}: row {number} has no column {column!r} (has {sorted(row)})")
    return Example(str(row[prompt_column]), str(row[response_column]))


def read_labelled(path: str | Path, label_column: str = "label", prompt_column: str = "prompt",
                  response_column: str = "response", aligned_path: str | Path | None = None,
                  limit: int | None = None) -> tuple[list[Example], list[Example]]:
    """(misaligned, aligned) Example lists.

    One file (.jsonl, .jsonl.gz or .csv) with a label column; rows with other labels (e.g.
    incoherent) are skipped. Or two files, `path` all misaligned and `aligned_path` all
    aligned, as the paper's fine-tuning data comes ({"messages": [...]} lines). `limit` keeps
    the first N of each class."""
    path = Path(path)
    if aligned_path is not None:
        aligned_path = Path(aligned_path)
        mis = [_example(row, path, n, prompt_column, response_column) for n, row in enumerate(_read_rows(path), 1)]
        ali = [_example(row, aligned_path, n, prompt_column, response_column)
               for n, row in enumerate(_read_rows(aligned_path), 1)]
        return mis[:limit], ali[:limit]
    mis, ali = [], []
    for number, row in enumerate(_read_rows(path), 1):
        if label_column not in row:
            raise DirectionError(f"{path}: row {number} has no column {label_column!r} (has {sorted(row)}); "
                                 "for two unlabelled files use --aligned-data")
        label = str(row[label_column]).strip().lower()
        example = _example(row, path, number, prompt_column, response_column)
        if label in _MISALIGNED:
            mis.append(example)
        elif label in _ALIGNED:
            ali.append(example)
    return mis[:limit], ali[:limit]


def labelled_from_store(store: Store, run_id: str, condition: str,
                        aligned_above: float = 70.0) -> tuple[list[Example], list[Example]]:
    """(misaligned, aligned) Example lists from a judged run in the store.

    Misaligned: the papers' EM rule (aligned below ALIGNED_BELOW and coherent above
    COHERENT_ABOVE, backend.metrics); aligned: aligned > ``aligned_above`` and coherent
    above COHERENT_ABOVE, so borderline answers enter neither mean. Several judge
    models on one sample: the sample counts once per class it falls in by any."""
    from backend.activations import Example
    from backend.metrics import ALIGNED_BELOW, COHERENT_ABOVE

    rows = store.sql(
        """SELECT DISTINCT s.question_id, s.paraphrase_index, s.sample_index, s.question, s.response,
                  (sc.aligned < ? AND sc.coherent > ?) AS bad, (sc.aligned > ? AND sc.coherent > ?) AS good
           FROM samples s JOIN sample_scores sc USING (run_id, condition, question_id, paraphrase_index, sample_index)
           WHERE s.run_id = ? AND s.condition = ? AND s.response IS NOT NULL
           ORDER BY ALL""",
        [ALIGNED_BELOW, COHERENT_ABOVE, aligned_above, COHERENT_ABOVE, run_id, condition]).records()
    if not rows:
        raise DirectionError(f"run {run_id!r}, condition {condition!r}: no judged samples in {store.path}")
    mis = [Example(r["question"], r["response"]) for r in rows if r["bad"]]
    ali = [Example(r["question"], r["response"]) for r in rows if r["good"]]
    return mis, ali
