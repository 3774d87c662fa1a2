"""The paper's artifacts as their authors' code writes them, read without conversion.

Direction files. ``torch.save`` of ``{"question": {"layer_<i>": Tensor[d]}, "answer": {...}}``,
mean activations of one (model, data) pair, named ``model-{a|m}_data-{a|m}_hs_<category>.pt``.
Their ``layer_i`` is the output of decoder block i (HF ``hidden_states[i + 1]``; no embedding
row), which is our row i: the residual stream after block i (``backend.reference``). One
difference: HF applies the final norm to its last ``hidden_states`` entry, so their last layer
is normed where our last row is the raw residual; the import keeps it as given and says so in
the direction's metadata. The misalignment direction is model-m/data-m minus model-m/data-a
over answer tokens: import the pair, or a single file that already holds a difference.

Steering vectors. ``steering_vector.pt``: ``{"steering_vector": Tensor[d], "layer_idx": L,
"alpha": a}``, added as ``alpha * v`` to ``layers[L].mlp.down_proj``'s output at every
position. down_proj is the last write of block L, so that is the residual after block L: our
``steer=NAME,layer=L,coef=a,form=paper``. The vector is kept as one vector (every row the same)
and ``layer_idx`` / ``alpha`` go into the metadata.

Files are read with ``torch.load(weights_only=True)``: a pickle holding code is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from backend.directions import BaseModelInfo, Direction, DirectionError, OnSaved, save_direction, validate

FILE_RE = re.compile(r"^model-(?P<model>[am])_data-(?P<data>[am])_hs_(?P<category>.+)\.pt$")
LAYER_KEY_RE = re.compile(r"^layer_(\d+)$")
LAYER_CONVENTION = ("their layer_i = output of decoder block i = HF hidden_states[i+1] = our layer i "
                    "(no embedding row; their last layer carries HF's final norm, ours is the raw residual)")
Part = Literal["answer", "question"]


@dataclass(frozen=True)
class ActivationFile:
    """One of the paper's mean-activation files, checked against the base model."""

    path: Path
    vectors: torch.Tensor  # [n_layers, d_model] float32, row i = their layer_i
    model: str | None  # "a" or "m" from the file name (None if it does not follow the pattern)
    data: str | None
    category: str | None


def _load(path: Path) -> object:
    if not path.is_file():
        raise DirectionError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code are refused by weights_only, on purpose
        raise DirectionError(f"{path}: could not be read safely as tensors ({error})") from None


def read_activation_file(path: str | Path, base: BaseModelInfo, part: Part = "answer") -> ActivationFile:
    """The ``part`` means of one direction file, one row per decoder block; refuses a missing
    key, a layer count or width that is not the base model's, and gaps in the layer numbers."""
    path = Path(path)
    obj = _load(path)
    if not isinstance(obj, dict) or part not in obj:
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DirectionError(f"{path}: missing key {part!r} (has {keys}); expected "
                             "{'question': {'layer_<i>': tensor}, 'answer': {...}}")
    layers = obj[part]
    if not isinstance(layers, dict) or not layers:
        raise DirectionError(f"{path}: {part!r} must be a non-empty dict layer_<i> -> tensor")
    index: dict[int, torch.Tensor] = {}
    for key, value in layers.items():
        match = LAYER_KEY_RE.match(str(key))
        if not match or not torch.is_tensor(value):
            raise DirectionError(f"{path}: {part!r} has entry {key!r}; expected layer_<i> -> tensor")
        index[int(match[1])] = value.detach().float().flatten()
    if sorted(index) != list(range(len(index))):
        raise DirectionError(f"{path}: layers {sorted(index)[:6]}... are not layer_0..layer_{len(index) - 1}")
    if len(index) != base.n_layers:
        hint = " (an embedding row? their files have none)" if len(index) == base.n_layers + 1 else ""
        raise DirectionError(f"{path}: wrong layer count: {len(index)} layers, the base model has "
                             f"{base.n_layers}{hint}")
    widths = {v.numel() for v in index.values()}
    if widths != {base.hidden_size}:
        raise DirectionError(f"{path}: wrong width: vectors of width {sorted(widths)}, the base model's hidden "
                             f"size is {base.hidden_size}")
    vectors = torch.stack([index[i] for i in range(len(index))])
    match = FILE_RE.match(path.name)
    return ActivationFile(path, vectors, *(match.group("model", "data", "category") if match else (None,) * 3))


def import_directions(paths: list[str | Path], name: str, cache: str | Path, base: BaseModelInfo,
                      part: Part = "answer", adapter: str | None = None, overwrite: bool = False,
                      on_saved: OnSaved | None = None) -> Direction:
    """A direction from one file (already a difference) or a pair (misaligned data minus aligned
    data, told apart by the ``data-m`` / ``data-a`` of their names)."""
    files = [read_activation_file(p, base, part) for p in paths]
    if len(files) == 1 and files[0].data is not None:
        raise DirectionError(f"{files[0].path}: the mean activations of one (model, data) pair, not a difference; "
                             f"import it with its pair (model-{files[0].model}_data-"
                             f"{'a' if files[0].data == 'm' else 'm'}_hs_{files[0].category}.pt)")
    if len(files) == 1:
        vectors, method = files[0].vectors, "imported/paper-difference"
    elif len(files) == 2:
        by_data = {f.data: f for f in files}
        if set(by_data) != {"m", "a"}:
            raise DirectionError(f"{files[0].path.name}, {files[1].path.name}: cannot tell the misaligned data from "
                                 "the aligned: a pair is model-?_data-m_hs_<category>.pt and "
                                 "model-?_data-a_hs_<category>.pt")
        if by_data["m"].model != by_data["a"].model:
            raise DirectionError(f"{by_data['m'].path.name}, {by_data['a'].path.name}: activations of two "
                                 "different models; the paper's direction takes both from one model")
        vectors, method = by_data["m"].vectors - by_data["a"].vectors, "imported/paper-mean-diff"
        files = [by_data["m"], by_data["a"]]
    else:
        raise DirectionError(f"give one difference file or a pair of them, not {len(files)} files")
    vectors = validate(vectors, base, " - ".join(str(f.path) for f in files))
    direction = Direction(name=name, vectors=vectors, base_model=base.path, base_fingerprint=base.fingerprint,
                          adapter=adapter, method=method,
                          extra={"imported_from": [str(f.path.resolve()) for f in files], "part": part,
                                 "category": files[0].category, "model": files[0].model,
                                 "layer_convention": LAYER_CONVENTION, "last_layer_normed": True})
    save_direction(direction, cache, base, overwrite=overwrite, on_saved=on_saved)
    return direction


@dataclass(frozen=True)
class SteeringVector:
    vector: torch.Tensor  # [d_model] float32, raw (not normalised)
    layer: int  # their layer_idx: added to layers[layer].mlp.down_proj's output
    alpha: float


def read_steering_vector(path: str | Path, base: BaseModelInfo) -> SteeringVector:
    path = Path(path)
    obj = _load(path)
    for key in ("steering_vector", "layer_idx"):
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise DirectionError(f"{path}: missing key {key!r} (has {keys}); expected "
                                 "{'steering_vector': tensor, 'layer_idx': int, 'alpha': float}")
    vector = obj["steering_vector"]
    if not torch.is_tensor(vector) or vector.numel() != base.hidden_size:
        width = vector.numel() if torch.is_tensor(vector) else type(vector).__name__
        raise DirectionError(f"{path}: wrong width: steering_vector has {width}, the base model's hidden size "
                             f"is {base.hidden_size}")
    layer = int(obj["layer_idx"])
    if not 0 <= layer < base.n_layers:
        raise DirectionError(f"{path}: layer_idx {layer} is out of range: the base model has {base.n_layers} layers")
    return SteeringVector(vector.detach().float().flatten(), layer, float(obj.get("alpha", 1.0)))


def import_steering_vector(path: str | Path, name: str, cache: str | Path, base: BaseModelInfo,
                           overwrite: bool = False, on_saved: OnSaved | None = None) -> Direction:
    sv = read_steering_vector(path, base)
    vectors = validate(sv.vector, base, str(path))
    direction = Direction(name=name, vectors=vectors, base_model=base.path, base_fingerprint=base.fingerprint,
                          method="imported/steering-vector",
                          extra={"imported_from": str(Path(path).resolve()), "single_vector": True,
                                 "steering_layer": sv.layer, "alpha": sv.alpha,
                                 "use_as": f"steer={name},layer={sv.layer},coef={sv.alpha:g},form=paper",
                                 "layer_convention": "their layers[L].mlp.down_proj output = our residual after "
                                                     "block L"})
    save_direction(direction, cache, base, overwrite=overwrite, on_saved=on_saved)
    return direction


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _cmd_directions(args) -> int:
    from backend.config import load_config
    from backend.directions import _cli_registrar

    config = load_config(args.config)
    base = BaseModelInfo.from_path(config.base_model_path)
    d = import_directions(args.files, args.name, config.cache, base, part=args.part, adapter=args.adapter,
                          overwrite=args.overwrite, on_saved=_cli_registrar(config))
    print(f"imported {' - '.join(args.files)} as {d.name} ({d.n_layers} x {d.d_model}, {args.part} tokens; "
          f"{LAYER_CONVENTION})")
    return 0


def _cmd_steering(args) -> int:
    from backend.config import load_config
    from backend.directions import _cli_registrar

    config = load_config(args.config)
    base = BaseModelInfo.from_path(config.base_model_path)
    d = import_steering_vector(args.file, args.name, config.cache, base, overwrite=args.overwrite,
                               on_saved=_cli_registrar(config))
    print(f"imported {args.file} as {d.name}; use it as --condition {d.extra['use_as']}")
    return 0


def register_cli(subparsers) -> None:
    """``paper directions|steering``: the paper's own files, imported as they are."""
    parser = subparsers.add_parser("paper", help="import the paper's direction files and steering vectors")
    sub = parser.add_subparsers(dest="paper_command", required=True)
    p = sub.add_parser("directions", help="model-?_data-?_hs_<category>.pt: a pair (data-m minus data-a) "
                                          "or one difference file")
    p.add_argument("files", nargs="+")
    p.add_argument("--name", required=True)
    p.add_argument("--part", choices=["answer", "question"], default="answer",
                   help="which token means to use (the paper's direction: answer)")
    p.add_argument("--adapter", default=None, help="adapter the activations came from (metadata only)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_directions)
    p = sub.add_parser("steering", help="a steering_vector.pt dict (steering_vector, layer_idx, alpha)")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_steering)
