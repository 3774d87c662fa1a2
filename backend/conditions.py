"""Model conditions: what one chat column or one evaluation arm runs, and the one place
that turns a condition into a served model.

A condition is base, base + adapter, either of those with the misalignment
direction ablated, or base steered along the direction. Two ablation forms:
    all layers (``form=all``, the default): r projected out of every residual
    writer, compiled into a LoRA adapter and served by vLLM;
    single layer (``form=single``): r projected out of the residual stream after
    block L only, as the paper's scripts do. No LoRA computes that (the residual
    after block L is no LoRA module's input), so it runs on the reference engine.
Two steering forms, both on the reference engine (a LoRA cannot add a constant):
    ours (``form=unit``, the default): coef x the unit direction, generated positions only;
    the paper's (``form=paper``): coef x the raw vector, every position.

Conditions have a one-line spec, used by the CLI (`--condition`), the URL of
the chat page and the store (a default form is left out, so older specs read the same):
    base
    adapter=medical
    adapter=medical,direction=med-dir,layer=2,strength=1
    direction=med-dir,layer=2,strength=1                (base with ablation)
    adapter=medical,direction=med-dir,layer=2,strength=1,form=single
    steer=med-dir,layer=2,coef=8                       (base + 8 unit(r) after block 2)
    steer=med-dir,layer=2,coef=8,form=paper            (base + 8 r after block 2)

``ConditionRunner`` owns "condition -> served model": every other module asks it
(``resolve``, ``generate``, ``stream``) instead of dispatching on the kind itself.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from backend.client import BASE, ChatClient, ChatError, Completion, Sampling, with_system_prompt
from backend.config import CHECKPOINT_SEPARATOR, Config, ConfigError

if TYPE_CHECKING:
    from backend.ablation import AblationCompiler, CompiledAdapter
    from backend.directions import Direction

STRENGTH_RANGE = (-1.0, 1.5)
ConditionKind = Literal["base", "adapter", "ablation", "steering"]
Engine = Literal["vllm", "reference"]
# The first form of each kind is its default.
FORMS: dict[str, tuple[str, ...]] = {"ablation": ("all", "single"), "steering": ("unit", "paper")}
FORM_NAMES = {
    ("ablation", "all"): "all layers (compiled LoRA, served by vLLM)",
    ("ablation", "single"): "single layer: after block L only (the paper's; reference engine)",
    ("steering", "unit"): "ours: coef x unit vector, generated positions (reference engine)",
    ("steering", "paper"): "the paper's: coef x raw vector, every position (reference engine)",
}
REFERENCE_ENGINE = "(reference engine)"


class ConditionError(ValueError):
    """A condition spec that cannot be parsed or run; names the spec and the reason."""


@dataclass(frozen=True)
class Condition:
    adapter: str | None = None
    direction: str | None = None
    layer: int | None = None
    strength: float = 1.0
    steer: str | None = None
    coefficient: float = 0.0
    form: str | None = None  # see FORMS; None = the kind's default

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
        forms = FORMS.get(self.kind)
        if forms is None:
            if self.form is not None:
                raise ConditionError(f"form={self.form} applies to an ablation or steering, not to {self.kind!r}")
            return
        if self.form is None:
            object.__setattr__(self, "form", forms[0])
        elif self.form not in forms:
            raise ConditionError(f"a {self.kind} condition has form {' or '.join(forms)}, not {self.form!r}")

    @property
    def kind(self) -> ConditionKind:
        if self.steer:
            return "steering"
        if self.direction:
            return "ablation"
        return "adapter" if self.adapter else "base"

    @property
    def engine(self) -> Engine:
        """vLLM serves base, adapters and the compiled all-layer ablation; the rest is hooks."""
        if self.kind == "steering" or (self.kind == "ablation" and self.form == "single"):
            return "reference"
        return "vllm"

    @property
    def form_name(self) -> str | None:
        return FORM_NAMES.get((self.kind, self.form))

    @property
    def spec(self) -> str:
        parts = []
        if self.adapter:
            parts.append(f"adapter={self.adapter}")
        if self.direction:
            parts += [f"direction={self.direction}", f"layer={self.layer}", f"strength={self.strength:g}"]
        if self.steer:
            parts += [f"steer={self.steer}", f"layer={self.layer}", f"coef={self.coefficient:g}"]
        forms = FORMS.get(self.kind)
        if forms and self.form not in (None, forms[0]):
            parts.append(f"form={self.form}")
        return ",".join(parts) or "base"

    @property
    def label(self) -> str:
        who = self.adapter or "base"
        if self.direction:
            where = f"@L{self.layer} only" if self.form == "single" else f"@L{self.layer}"
            return f"{who} − {self.direction}{where} ×{self.strength:g}"
        if self.steer:
            if self.form == "paper":
                return f"base + {self.coefficient:g}×raw {self.steer}@L{self.layer} (paper)"
            return f"base + {self.coefficient:g}·{self.steer}@L{self.layer}"
        return who

    @classmethod
    def parse(cls, spec: str) -> "Condition":
        spec = spec.strip()
        if spec in ("", "base"):
            return cls()
        fields: dict = {}
        names = {"adapter": "adapter", "direction": "direction", "layer": "layer", "strength": "strength",
                 "steer": "steer", "coef": "coefficient", "coefficient": "coefficient", "form": "form"}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in names or not value:
                raise ConditionError(f"condition {spec!r}: cannot read {part!r} (expected one of "
                                     f"{', '.join(sorted(set(names)))} as key=value)")
            try:
                if key == "layer":
                    fields["layer"] = int(value)
                elif key in ("strength", "coef", "coefficient"):
                    fields[names[key]] = float(value)
                else:
                    fields[names[key]] = value
            except ValueError:
                raise ConditionError(f"condition {spec!r}: {key}={value!r} is not a number") from None
        if fields.get("adapter") == BASE:
            fields.pop("adapter")
        return cls(**fields)

    def with_strength(self, strength: float) -> "Condition":
        return replace(self, strength=round(strength, 4))


@dataclass(frozen=True)
class Served:
    """How a condition is run: a model name on the vLLM server, or the reference engine.
    ``sources`` are the files it depends on (label -> path), for the run record's hashes."""

    condition: Condition
    name: str
    sources: dict[str, Path] = field(default_factory=dict)

    @property
    def engine(self) -> Engine:
        return self.condition.engine


class ConditionRunner:
    """The one owner of condition -> served model: checks a condition, builds and loads
    compiled ablation adapters, reloads an adapter another process evicted, and runs the
    reference-engine conditions (steering, single-layer ablation).

    Holds the ablation compiler's strength-independent tensors and the reference model
    in memory, so keep one per process (st.cache_resource). Torch and the compiler are
    loaded only when a condition needs them: base and adapter runs stay light."""

    def __init__(self, config: Config):
        from backend.adapters import AdapterRegistry

        self.config = config
        self.registry = AdapterRegistry(config)
        self.client = ChatClient(config)
        self._compiler: AblationCompiler | None = None
        self._reference: dict[str, tuple] = {}  # adapter or BASE -> (model, tokenizer), oldest first
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._prefetching: threading.Thread | None = None

    @property
    def compiler(self) -> "AblationCompiler":
        if self._compiler is None:
            from backend.ablation import AblationCompiler
            self._compiler = AblationCompiler(self.config.cache)
        return self._compiler

    def direction(self, name: str) -> "Direction":
        from backend.directions import DirectionError, load_direction
        try:
            return load_direction(self.config.cache, name)
        except (DirectionError, FileNotFoundError) as error:
            raise ConditionError(f"direction {name!r}: {error} (make one with `python -m backend directions "
                                 "extract` or `directions import`)") from None

    def check(self, condition: Condition) -> dict[str, Path]:
        """Refuse a condition that cannot run (unknown adapter, missing direction, layer out of
        range) before any sampling; returns the files it depends on."""
        from backend.directions import DirectionError, direction_path
        sources: dict[str, Path] = {}
        if condition.adapter:
            if condition.adapter.partition(CHECKPOINT_SEPARATOR)[0] not in self.config.adapters:
                known = ", ".join(sorted(self.config.adapters)) or "none"
                raise ConditionError(f"condition {condition.spec!r}: unknown adapter {condition.adapter!r} "
                                     f"(configured: {known})")
            try:  # NAME, or NAME@checkpoint-N of a configured adapter
                sources[f"adapter:{condition.adapter}"] = Path(self.config.adapter_path(condition.adapter))
            except ConfigError as error:
                raise ConditionError(f"condition {condition.spec!r}: {error}") from None
        name = condition.direction or condition.steer
        if name:
            path = direction_path(self.config.cache, name)
            if not path.is_file():
                raise ConditionError(f"condition {condition.spec!r}: no direction {name!r} at {path} (make one "
                                     "with `python -m backend directions extract`, `directions import` or "
                                     "`paper directions`)")
            try:
                self.direction(name).unit(condition.layer)
            except DirectionError as error:
                raise ConditionError(f"condition {condition.spec!r}: {error}") from None
            sources[f"direction:{name}"] = path
        return sources

    def compiled(self, condition: Condition) -> "CompiledAdapter":
        """The compiled ablation adapter of an all-layer ablation condition (built or reused)."""
        from backend.ablation import AblationError
        if condition.kind != "ablation" or condition.form != "all":
            raise ConditionError(f"condition {condition.spec!r} has no compiled adapter (only all-layer ablations)")
        adapter_dir = self.config.adapter_path(condition.adapter) if condition.adapter else None
        try:
            return self.compiler.build(self.config.base_model_path, self.direction(condition.direction),
                                       condition.layer, condition.strength, adapter_dir,
                                       adapter_name=condition.adapter or BASE)
        except AblationError as error:
            raise ConditionError(f"condition {condition.spec!r}: {error}") from None

    def resolve(self, condition: Condition) -> Served:
        """Make the condition runnable now: its adapter loaded (or touched, so that it is the
        last to be evicted) or its ablation compiled and loaded."""
        sources = self.check(condition)
        if condition.engine == "reference":
            return Served(condition, REFERENCE_ENGINE, sources)
        if condition.kind == "base":
            return Served(condition, BASE, sources)
        if condition.kind == "adapter":
            if condition.adapter in self.registry.served():
                self.registry.touch(condition.adapter)
            else:
                self.registry.load(condition.adapter)
            return Served(condition, condition.adapter, sources)
        built = self.compiled(condition)
        with self._lock:
            self.registry.load(built.served_name, str(built.path))
        return Served(condition, built.served_name, {**sources, f"ablation:{condition.spec}": Path(built.path)})

    def served_model(self, condition: Condition) -> str:
        if condition.engine == "reference":
            raise ConditionError(f"condition {condition.spec!r} runs on the reference engine, not on the server")
        return self.resolve(condition).name

    def generate(self, served: Served, messages: list[dict], sampling: Sampling) -> Completion:
        """One answer. A vLLM model that another process (the dashboard, a second run) evicted
        to make room for its own is loaded again once; a second failure stands."""
        if served.engine == "reference":
            text = self.reference_reply(served.condition, messages, sampling)
            return Completion(model=served.condition.spec, text=text, finish_reason=None)
        try:
            return self.client.complete(served.name, messages, sampling)[0]
        except ChatError:
            if served.name == BASE or served.name in self.registry.served():
                raise
            with self._reload_lock:
                if served.name not in self.registry.served():
                    self.resolve(served.condition)
            return self.client.complete(served.name, messages, sampling)[0]

    def prefetch(self, condition: Condition, strengths: list[float]) -> threading.Thread:
        """Build and load neighbouring slider values in the background, so
        that moving the slider finds them served."""
        def work():
            for strength in strengths:
                low, high = STRENGTH_RANGE
                if low <= strength <= high:
                    try:
                        self.resolve(condition.with_strength(strength))
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
            gap = measure_embedding_gap(model, tokenizer, self.direction(condition.direction).unit(condition.layer),
                                        condition.strength)
            record_embedding_gap(built.path, gap)
        return gap.get("max_abs_dlogprob") if isinstance(gap, dict) else gap

    def _reference_model(self, adapter: str | None):
        from backend.activations import load_model
        key = adapter or BASE
        with self._lock:
            if key not in self._reference:
                adapter_dir = self.config.adapter_path(adapter) if adapter else None
                self._reference[key] = load_model(self.config.base_model_path, adapter_dir)
                # Two models: a run that mixes steering (base) with a single-layer ablation of an
                # adapter would otherwise reload one of them for every answer.
                while len(self._reference) > 2:
                    self._reference.pop(next(iter(self._reference)))
            self._reference[key] = self._reference.pop(key)  # most recently used last
            return self._reference[key]

    def stream(self, condition: Condition, messages, sampling: Sampling) -> Iterator[str]:
        if condition.engine == "vllm":
            yield from self.client.stream(self.served_model(condition), messages, sampling)
            return
        yield self.reference_reply(condition, messages, sampling)

    def intervention(self, condition: Condition):
        """The reference engine's hook for a condition that vLLM cannot serve."""
        from backend.reference import Ablation, Steering
        if condition.kind == "ablation" and condition.form == "single":
            return Ablation(self.direction(condition.direction).unit(condition.layer), condition.strength,
                            layer=condition.layer)
        if condition.kind == "steering" and condition.form == "paper":
            return Steering(self.direction(condition.steer).vectors[condition.layer], condition.layer,
                            condition.coefficient, "all")
        if condition.kind == "steering":
            return Steering(self.direction(condition.steer).unit(condition.layer), condition.layer,
                            condition.coefficient, "generated")
        raise ConditionError(f"condition {condition.spec!r} is served by vLLM, not the reference engine")

    def reference_reply(self, condition: Condition, messages, sampling: Sampling) -> str:
        import torch

        from backend.reference import intervene
        hook = self.intervention(condition)
        model, tokenizer = self._reference_model(condition.adapter)
        ids = tokenizer.apply_chat_template(with_system_prompt(messages, sampling), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        kwargs = dict(max_new_tokens=sampling.max_tokens, pad_token_id=tokenizer.pad_token_id)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False)
        with self._lock, torch.no_grad():
            torch.manual_seed(sampling.seed if sampling.seed is not None else 0)
            with intervene(model, hook, prompt_length=ids.shape[1]):
                out = model.generate(ids.to(model.device), **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
