"""Model conditions: what one chat column or one evaluation arm runs.

A condition is base, base + adapter, either of those with the misalignment
direction ablated (compiled into a LoRA adapter and served by vLLM), or base
steered along the direction (the exact reference engine in transformers: a
LoRA cannot add a constant vector, so vLLM cannot serve steering exactly).

Conditions have a one-line spec, used by the CLI (`--condition`), the URL of
the chat page and the store:
    base
    adapter=medical
    adapter=medical,direction=med-dir,layer=2,strength=1
    direction=med-dir,layer=2,strength=1                (base with ablation)
    steer=med-dir,layer=2,coef=8                       (base + coef * r after block 2)
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from backend.client import BASE, ChatClient, Sampling, with_system_prompt
from backend.config import Config
from backend.errors import BackendError
from backend.metrics import STRENGTH_RANGE

if TYPE_CHECKING:  # the compiler imports torch; conditions are parsed without it
    from backend.ablation import CompiledAdapter



class ConditionError(BackendError, ValueError):
    """A condition spec that cannot be parsed or run; names the spec and the reason."""


@dataclass(frozen=True)
class Condition:
    adapter: str | None = None
    direction: str | None = None
    layer: int | None = None
    strength: float = 1.0
    steer: str | None = None
    coefficient: float = 0.0

    def __post_init__(self):
        if self.direction and self.steer:
            raise ConditionError("a condition either ablates a direction or steers along one, not both")
        if (self.direction or self.steer) and self.layer is None:
            raise ConditionError(f"condition {self.spec!r} needs layer=L")
        if self.steer and self.adapter:
            raise ConditionError("steering runs on the base model only (the reference engine)")
        low, high = STRENGTH_RANGE
        if self.direction and not low <= self.strength <= high:
            raise ConditionError(f"strength {self.strength:g} is outside {low:g}..{high:g}")

    @property
    def kind(self) -> str:
        if self.steer:
            return "steering"
        if self.direction:
            return "ablation"
        return "adapter" if self.adapter else "base"

    @property
    def spec(self) -> str:
        parts = []
        if self.adapter:
            parts.append(f"adapter={self.adapter}")
        if self.direction:
            parts += [f"direction={self.direction}", f"layer={self.layer}", f"strength={self.strength:g}"]
        if self.steer:
            parts += [f"steer={self.steer}", f"layer={self.layer}", f"coef={self.coefficient:g}"]
        return ",".join(parts) or "base"

    @property
    def label(self) -> str:
        who = self.adapter or "base"
        if self.direction:
            return f"{who} − {self.direction}@L{self.layer} ×{self.strength:g}"
        if self.steer:
            return f"base + {self.coefficient:g}·{self.steer}@L{self.layer}"
        return who

    @classmethod
    def parse(cls, spec: str) -> "Condition":
        spec = spec.strip()
        if spec in ("", "base"):
            return cls()
        fields: dict = {}
        names = {"adapter": "adapter", "direction": "direction", "layer": "layer", "strength": "strength",
                 "steer": "steer", "coef": "coefficient", "coefficient": "coefficient"}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in names or not value:
                raise ConditionError(f"condition {spec!r}: cannot read {part!r} (expected one of "
                                     f"{', '.join(sorted(set(names)))} as key=value)")
            try:
                fields[names[key]] = int(value) if key == "layer" else float(value) if key in (
                    "strength", "coef", "coefficient") else value
            except ValueError:
                raise ConditionError(f"condition {spec!r}: {key}={value!r} is not a number") from None
        if fields.get("adapter") == BASE:
            fields.pop("adapter")
        return cls(**fields)

    def with_strength(self, strength: float) -> "Condition":
        return replace(self, strength=round(strength, 4))


class ConditionRunner:
    """Turns conditions into served model names (building and loading
    compiled ablation adapters on the way) and runs the steering ones.

    Holds the ablation compiler's strength-independent tensors and the
    reference model in memory, so keep one per process (st.cache_resource)."""

    def __init__(self, config: Config):
        from backend.ablation import AblationCompiler
        from backend.adapters import AdapterRegistry

        self.config = config
        self.registry = AdapterRegistry(config)
        self.compiler = AblationCompiler(config.cache)
        self.client = ChatClient(config)
        self._reference = None
        self._lock = threading.Lock()
        self._prefetching: threading.Thread | None = None

    def _direction(self, name: str):
        from backend.directions import DirectionError, load_direction
        try:
            return load_direction(self.config.cache, name)
        except (DirectionError, FileNotFoundError) as error:
            raise ConditionError(f"direction {name!r}: {error}") from None

    def compiled(self, condition: Condition) -> CompiledAdapter:
        """The compiled ablation adapter of an ablation condition (built or reused)."""
        from backend.ablation import AblationError
        adapter_dir = self.config.adapter_path(condition.adapter) if condition.adapter else None
        try:
            return self.compiler.build(self.config.base_model_path, self._direction(condition.direction),
                                       condition.layer, condition.strength, adapter_dir,
                                       adapter_name=condition.adapter or BASE)
        except AblationError as error:
            raise ConditionError(f"condition {condition.spec!r}: {error}") from None

    def served_model(self, condition: Condition) -> str:
        if condition.kind == "steering":
            raise ConditionError("steering runs on the reference engine, not on the server")
        if condition.kind == "base":
            return BASE
        if condition.kind == "adapter":
            if condition.adapter in self.registry.served():
                self.registry.touch(condition.adapter)  # in use: the last to be evicted
            else:
                self.registry.load(condition.adapter)
            return condition.adapter
        built = self.compiled(condition)
        with self._lock:
            self.registry.load(built.served_name, str(built.path))
        return built.served_name

    def prefetch(self, condition: Condition, strengths: list[float]) -> threading.Thread:
        """Build and load neighbouring slider values in the background, so
        that moving the slider finds them served."""
        def work():
            for strength in strengths:
                low, high = STRENGTH_RANGE
                if low <= strength <= high:
                    try:
                        self.served_model(condition.with_strength(strength))
                    except Exception:  # a prefetch failure shows up when that value is really asked for
                        return
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        self._prefetching = thread
        return thread

    def settle(self) -> None:
        """Wait for a prefetch still loading adapters, so that no load overlaps the streams
        that follow."""
        thread = self._prefetching
        if thread is not None:
            thread.join()

    def embedding_gap(self, condition: Condition) -> float | None:
        """Max |d logprob| between the served ablation and the exact one
        (which also projects the embedding); measured once, kept with the adapter."""
        from backend.ablation import measure_embedding_gap, record_embedding_gap
        built = self.compiled(condition)
        gap = built.metadata.get("embedding_gap")
        if gap is None:
            model, tokenizer = self._reference_model(condition.adapter)
            gap = measure_embedding_gap(model, tokenizer, self._direction(condition.direction).unit(condition.layer),
                                        condition.strength)
            record_embedding_gap(built.path, gap)
        return gap.get("max_abs_dlogprob") if isinstance(gap, dict) else gap

    def _reference_model(self, adapter: str | None):
        from backend.activations import load_model
        key = adapter or BASE
        with self._lock:
            if self._reference is None or self._reference[0] != key:
                adapter_dir = self.config.adapter_path(adapter) if adapter else None
                self._reference = (key, *load_model(self.config.base_model_path, adapter_dir))
            return self._reference[1], self._reference[2]

    def stream(self, condition: Condition, messages: list[dict], sampling: Sampling) -> Iterator[str]:
        if condition.kind != "steering":
            yield from self.client.stream(self.served_model(condition), messages, sampling)
            return
        yield self.steered_reply(condition, messages, sampling)

    def steered_reply(self, condition: Condition, messages: list[dict], sampling: Sampling) -> str:
        import torch

        from backend.reference import Steering, intervene
        model, tokenizer = self._reference_model(None)
        vector = self._direction(condition.steer).unit(condition.layer)
        ids = tokenizer.apply_chat_template(with_system_prompt(messages, sampling), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        kwargs = dict(max_new_tokens=sampling.max_tokens, pad_token_id=tokenizer.pad_token_id)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False)
        with self._lock, torch.no_grad():
            torch.manual_seed(sampling.seed if sampling.seed is not None else 0)
            with intervene(model, Steering(vector, condition.layer, condition.coefficient, "generated"),
                           prompt_length=ids.shape[1]):
                out = model.generate(ids.to(model.device), **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
