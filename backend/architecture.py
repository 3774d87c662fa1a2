"""The one place that knows model architectures: where the decoder blocks, the
embedding and the residual-stream writers are, and the shape of a checkpoint.

Everything that hooks, edits or validates modules by name (reference engine,
activations, directions, the ablation compiler, scalars, adapter validation,
serving, test models) asks this module instead of hard-coding Qwen2's names.

A supported architecture is a pre-norm decoder whose residual stream is the
sum of the token embedding and, per block, the outputs of ``self_attn.o_proj``
and ``mlp.down_proj``. That sum is what makes ablation exact: projecting r out
of each writer's output (hooks) or replacing each writer's W by
(I - a r r^T) W (compiled LoRA) projects r out of the residual stream.
Architectures that normalise a writer's output before adding it (Gemma 2/3:
``post_attention_layernorm``, ``post_feedforward_layernorm``) break that
identity and are refused by name, as is anything not listed.

Tied embeddings (``tie_word_embeddings``): the unembedding is the embedding
matrix. Every intervention here is a forward hook on module OUTPUTS or a LoRA
on o_proj/down_proj, never a weight edit, so the tied lm_head cannot change.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backend.errors import BackendError

if TYPE_CHECKING:  # serving and adapters import this module; torch stays unloaded for them
    from torch import nn


class ArchitectureError(BackendError, ValueError):
    """A model whose architecture the project cannot handle; the message names it."""


@dataclass(frozen=True)
class Architecture:
    """Module paths of one family of HF causal LMs (attribute paths, dot-separated)."""

    name: str
    classes: tuple[str, ...]  # HF ``architectures`` entries (= transformers class names) covered
    model_types: tuple[str, ...]  # config ``model_type`` values, for configs without ``architectures``
    decoder: str  # causal LM -> decoder stack
    layers: str  # decoder stack -> ModuleList of blocks
    embedding: str  # decoder stack -> token embedding
    writers: tuple[str, ...]  # block -> each module whose output is added to the residual stream
    # LoRA-able projection -> (its parent in a block, the vLLM layer that serves it, packed or not)
    projections: tuple[tuple[str, str, str], ...]

    @property
    def lora_modules(self) -> tuple[str, ...]:
        return tuple(module for module, _, _ in self.projections)

    @property
    def writer_modules(self) -> tuple[str, ...]:
        """Leaf names of the writers (``o_proj``, ``down_proj``): what PEFT's target_modules calls them."""
        return tuple(path.rsplit(".", 1)[-1] for path in self.writers)

    @property
    def vllm_packing(self) -> dict[str, str]:
        return {module: packed for module, _, packed in self.projections}

    def parent(self, module: str) -> str:
        for name, parent, _ in self.projections:
            if name == module:
                return parent
        raise ArchitectureError(f"{self.name}: {module!r} is not a LoRA-able projection "
                                f"(known: {', '.join(self.lora_modules)})")

    # -- checkpoint / PEFT names ---------------------------------------------

    def layer_path(self, layer: int) -> str:
        return f"{self.decoder}.{self.layers}.{layer}"

    def writer_tensor_names(self, layer: int) -> tuple[str, ...]:
        """Checkpoint tensor names of the writers' weights in block ``layer``."""
        return tuple(f"{self.layer_path(layer)}.{path}.weight" for path in self.writers)

    def writer_bias_names(self, layer: int) -> tuple[str, ...]:
        return tuple(f"{self.layer_path(layer)}.{path}.bias" for path in self.writers)

    @property
    def embedding_tensor_name(self) -> str:
        return f"{self.decoder}.{self.embedding}.weight"

    def lora_module_name(self, layer: int, module: str) -> str:
        """The module's name inside the causal LM (``model.layers.3.mlp.down_proj``); PEFT files
        prefix it with ``base_model.model.``."""
        return f"{self.layer_path(layer)}.{self.parent(module)}.{module}"

    def is_writer(self, module_name: str) -> bool:
        """Whether a module name (any prefix, e.g. PEFT's) is a writer of some block."""
        found = split_module_name(module_name)
        return found is not None and any(module_name.endswith(f"{self.layers}.{found[0]}.{path}")
                                         for path in self.writers)


_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")

LLAMA_LIKE = Architecture(
    name="llama-like",
    # Qwen2 differs only by biases on q/k/v, which no writer has; Mistral is Llama's layout.
    classes=("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"),
    model_types=("llama", "qwen2", "mistral"),
    decoder="model", layers="layers", embedding="embed_tokens",
    writers=("self_attn.o_proj", "mlp.down_proj"),
    projections=(*((m, "self_attn", "qkv_proj") for m in _ATTENTION), ("o_proj", "self_attn", "o_proj"),
                 *((m, "mlp", "gate_up_proj") for m in _MLP_IN), ("down_proj", "mlp", "down_proj")),
)
ARCHITECTURES = (LLAMA_LIKE,)

_NORM_AFTER_WRITERS = (
    "it normalises the outputs of o_proj and down_proj (post_attention_layernorm, post_feedforward_layernorm) "
    "before adding them to the residual stream, so projecting W -> (I - a r r^T) W on the writers (or their "
    "outputs) no longer equals projecting the residual stream")
REFUSED = {
    "Gemma2ForCausalLM": _NORM_AFTER_WRITERS,
    "Gemma3ForCausalLM": _NORM_AFTER_WRITERS,
    "Gemma3ForConditionalGeneration": _NORM_AFTER_WRITERS,
}
_REFUSED_MODEL_TYPES = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                        "gemma3_text": "Gemma3ForCausalLM"}

# Every supported architecture has the same LoRA-able projections, which is what
# lets adapter files be checked before the base model is known.
LORA_MODULES = LLAMA_LIKE.lora_modules
_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:[A-Za-z0-9_]+\.)*?([A-Za-z0-9_]+)$")


def split_module_name(name: str) -> tuple[int, str] | None:
    """``base_model.model.model.layers.3.mlp.down_proj`` -> (3, 'down_proj'); None outside a block."""
    match = _LAYER_MODULE.search(name)
    return (int(match[1]), match[2]) if match else None


def architecture(name: str) -> Architecture:
    """The Architecture for an HF class name (``config.json``'s ``architectures[0]``)."""
    for candidate in ARCHITECTURES:
        if name in candidate.classes:
            return candidate
    if name in REFUSED:
        raise ArchitectureError(f"architecture {name} is not supported: {REFUSED[name]}")
    supported = ", ".join(c for a in ARCHITECTURES for c in a.classes)
    raise ArchitectureError(f"architecture {name} is not supported (supported: {supported})")


def architecture_name(config: dict) -> str:
    """The HF class name a config dict declares; ``model_type`` when it lists no ``architectures``."""
    names = config.get("architectures") or []
    if names:
        return names[0]
    model_type = config.get("model_type")
    for candidate in ARCHITECTURES:
        if model_type in candidate.model_types:
            return candidate.classes[candidate.model_types.index(model_type)]
    return _REFUSED_MODEL_TYPES.get(model_type, f"model_type={model_type!r}")


def read_config(model_path: str | Path) -> dict:
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text())
        except ValueError as error:
            raise ArchitectureError(f"{config_file}: not valid JSON ({error})") from None
    if Path(model_path).is_dir():  # a local folder, not a Hub id: say what is missing
        raise ArchitectureError(f"{model_path}: no config.json (not a Hugging Face model folder)")
    from transformers import AutoConfig  # a Hub id: only its local cache can answer offline

    return AutoConfig.from_pretrained(str(model_path)).to_dict()


# ---------------------------------------------------------------------------
# Shapes, from config.json without loading weights
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseShape:
    """The sizes of a checkpoint, read from its config: enough to check adapters and
    write random ones without loading the base weights."""
    num_layers: int
    hidden: int
    intermediate: int
    q_out: int
    kv_out: int
    vocab: int
    tie_word_embeddings: bool
    architecture: str  # HF class name, e.g. LlamaForCausalLM

    @classmethod
    def from_config(cls, raw: dict) -> "BaseShape":
        name = architecture_name(raw)
        text = raw.get("text_config", raw)
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        tied = raw.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        if tied is None:  # left at its default, which differs between config classes
            from transformers import CONFIG_MAPPING

            model_type = raw.get("model_type", text.get("model_type"))
            # Unknown to transformers: no model class would tie anything.
            tied = model_type in CONFIG_MAPPING and getattr(CONFIG_MAPPING[model_type](), "tie_word_embeddings", False)
        return cls(num_layers=text["num_hidden_layers"], hidden=text["hidden_size"],
                   intermediate=text["intermediate_size"], q_out=heads * head_dim,
                   kv_out=text.get("num_key_value_heads", heads) * head_dim,
                   vocab=text.get("vocab_size", raw.get("vocab_size")), tie_word_embeddings=bool(tied), architecture=name)

    @classmethod
    def from_model(cls, model_path: str | Path) -> "BaseShape":
        return cls.from_config(read_config(model_path))

    @property
    def arch(self) -> Architecture:
        """Raises ArchitectureError for an unsupported architecture."""
        return architecture(self.architecture)

    def features(self, module: str) -> tuple[int, int]:
        """(in, out) features of a LoRA-able projection."""
        return {
            "q_proj": (self.hidden, self.q_out), "k_proj": (self.hidden, self.kv_out),
            "v_proj": (self.hidden, self.kv_out), "o_proj": (self.q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[module]


# ---------------------------------------------------------------------------
# Live modules (plain transformers model or PEFT-wrapped)
# ---------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def architecture_of(model: nn.Module) -> Architecture:
    return architecture(type(_unwrap(model)).__name__)


def inner_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``, ``Qwen2Model``): the causal LM without its head."""
    return _unwrap(model).get_submodule(architecture_of(model).decoder)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    arch = architecture_of(model)
    return list(_unwrap(model).get_submodule(arch.decoder).get_submodule(arch.layers))


def embedding(model: nn.Module) -> nn.Module:
    arch = architecture_of(model)
    return _unwrap(model).get_submodule(arch.decoder).get_submodule(arch.embedding)


def residual_writers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name in ``model``, module) of every writer, block by block. With PEFT the module is
    the outer LoRA wrapper, whose output already includes the adapter's delta (hooking
    ``base_layer`` would miss it): PEFT replaces the module at its attribute path."""
    arch = architecture_of(model)
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(module)], module)
            for layer in decoder_layers(model)
            for module in (layer.get_submodule(path) for path in arch.writers)]
