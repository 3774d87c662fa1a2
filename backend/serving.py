"""Starting, finding and stopping the vLLM OpenAI-compatible server.

A server we start records itself in `<cache>/server.json` (url, pid, log,
limits), so that every other process (the dashboard, a CLI run, the tests)
finds it without being told, and `stop` can end it. A server named by
`server.url` in the configuration is used as it is and never stopped by us.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path

import httpx

from backend.architecture import LLAMA_LIKE
from backend.config import Config, ConfigError
from backend.errors import BackendError
from backend.lora_files import AdapterError, read_adapter_files

# vLLM accepts only these values for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Named, not imported: importing it patches vLLM, which only its worker processes should do.
GROUPED_CPU_LORA_MODULE = "backend.vllm_cpu_lora"
GROUPED_CPU_LORA_EXTENSION = f"{GROUPED_CPU_LORA_MODULE}.GroupedLoRAWorkerExtension"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ServerError(BackendError, RuntimeError):
    """The server cannot be started, reached or used; the message says why."""


@dataclass(frozen=True)
class ServerState:
    """What a server we started wrote about itself."""
    url: str
    pid: int
    log_path: str
    base_model: str
    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    device: str
    started_at: float
    # PEFT module names with LoRA layers on this server; None: every linear module.
    lora_target_modules: list[str] | None = None
    startup_s: float | None = None  # from launch to the first healthy answer


@dataclass
class ServerStatus:
    url: str
    healthy: bool
    base_model: str | None = None
    adapters: list[dict] = field(default_factory=list)
    managed: bool = False
    pid: int | None = None
    device: str | None = None
    max_lora_rank: int | None = None
    max_cpu_loras: int | None = None
    lora_target_modules: list[str] | None = None  # None: every linear module (or not known)
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def has_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def installed_vllm_build() -> str:
    """'cpu' or 'cuda': the two builds are different distributions with one import name."""
    for name, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            metadata.version(name)
            return build
        except metadata.PackageNotFoundError:
            continue
    raise ServerError("vLLM is not installed in this environment (scripts/setup.sh installs the CPU build)")


def state_path(config: Config) -> Path:
    return config.cache / "server.json"


def read_state(config: Config) -> ServerState | None:
    path = state_path(config)
    try:
        return ServerState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own finished child not yet reaped) is not alive.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def server_url(config: Config) -> str:
    """The OpenAI-compatible root (without /v1) of the server this config talks to."""
    if config.server.url:
        return config.server.url.rstrip("/").removesuffix("/v1")
    state = read_state(config)
    if state and pid_alive(state.pid):
        return state.url
    return f"http://{config.server.host}:{config.server.port}"


def auth_headers(config: Config) -> dict[str, str]:
    key = config.server.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def required_lora_rank(config: Config) -> int:
    """The smallest rank vLLM accepts that fits every configured adapter plus
    the one extra rank that a compiled ablation adds on top of it."""
    if config.server.max_lora_rank is not None:
        return config.server.max_lora_rank
    needed = 1
    for name in config.adapters:
        try:
            files = read_adapter_files(name, config.adapter_path(name))
        except (AdapterError, ConfigError):
            continue  # a broken adapter is reported when it is loaded, not here
        needed = max(needed, files.max_rank + 1)
    for rank in VLLM_LORA_RANKS:
        if rank >= needed:
            return rank
    raise ServerError(f"an adapter needs LoRA rank {needed}, above vLLM's largest ({VLLM_LORA_RANKS[-1]})")


# vLLM's own names of the modules it wraps with LoRA: q/k/v and gate/up are packed into one layer each.
# Every supported architecture shares one layout, so the server's flags need not read the base's config.
VLLM_LORA_MODULES = LLAMA_LIKE.vllm_packing
# What a compiled ablation adds to any adapter: the writers into the residual stream.
ABLATION_MODULES = LLAMA_LIKE.writer_modules


def lora_target_modules(config: Config) -> list[str] | None:
    """The PEFT module names that get LoRA layers on the server; None: all of them."""
    chosen = config.server.lora_target_modules
    if chosen == "all":
        return None
    if chosen == "auto":
        modules = set(ABLATION_MODULES)
        for name in config.adapters:
            try:
                modules |= set(read_adapter_files(name, config.adapter_path(name)).target_modules)
            except (AdapterError, ConfigError):
                continue  # a broken adapter is reported when it is loaded, not here
    else:
        modules = set(chosen)
        unknown = modules - set(VLLM_LORA_MODULES)
        if unknown:
            raise ConfigError(f"key 'server.lora_target_modules': {', '.join(sorted(unknown))} cannot carry LoRA "
                              f"in vLLM (choose from {', '.join(VLLM_LORA_MODULES)}, or \"auto\" or \"all\")")
    # A packed vLLM layer serves all of its parts.
    packed = {VLLM_LORA_MODULES[m] for m in modules}
    modules = {m for m, layer in VLLM_LORA_MODULES.items() if layer in packed}
    return None if modules == set(VLLM_LORA_MODULES) else sorted(modules)


def vllm_knows_flag(flag: str) -> bool:
    """Whether the installed vLLM's engine arguments include this flag (read from its
    source, so that asking costs no import of vLLM)."""
    from importlib.util import find_spec
    spec = find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    try:
        return f'"{flag}"' in source.read_text()
    except OSError:
        return False


def vllm_command(config: Config, port: int, device: str) -> tuple[list[str], dict[str, str]]:
    server = config.server
    held = max(server.max_cpu_loras, server.max_loras)  # the adapters our registry keeps loaded
    slots = server.max_loras
    if device == "cpu":
        # vllm-cpu 0.32 answered base requests with an adapter's weights once the server held as
        # many adapters as it has LoRA slots (5 held, 4 slots: wrong in 6 of 8 fresh servers;
        # 8 or 17 slots: right in 5 of 5). Its LoRA ops index "no adapter" (-1) as the last slot
        # (backend/vllm_cpu_lora.py); one slot more than the registry ever holds keeps that one
        # empty, also with the grouped kernels, which skip -1 themselves.
        slots = held = held + 1
    if device == "cpu" and server.cpu_compile:
        launch = ["-c", f"from {GROUPED_CPU_LORA_MODULE} import run_compiled_openai_server; run_compiled_openai_server()"]
    else:
        launch = ["-m", "vllm.entrypoints.openai.api_server"]
    argv = [
        sys.executable, *launch,
        "--model", config.base_model_path,
        "--host", server.host,
        "--port", str(port),
        "--enable-lora",
        "--max-lora-rank", str(required_lora_rank(config)),
        "--max-loras", str(slots),
        "--max-cpu-loras", str(held),
        "--max-model-len", str(server.max_model_len),
        "--dtype", server.dtype,
        "--gpu-memory-utilization", str(server.gpu_memory_utilization or (0.85 if device == "cuda" else 0.3)),
        "--disable-uvicorn-access-log",
    ]
    targets = lora_target_modules(config)
    if targets is not None and vllm_knows_flag("--lora-target-modules"):
        argv += ["--lora-target-modules", *sorted({VLLM_LORA_MODULES[m] for m in targets})]
    if device == "cpu":
        if server.cpu_lora_kernels == "grouped":
            argv += ["--worker-extension-cls", GROUPED_CPU_LORA_EXTENSION]
        # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when chunked prefill
        # splits the prompt of a request that has a seed; evaluation runs send many seeded requests.
        argv += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(2048, server.max_model_len))]
        argv += ["--block-size", str(server.cpu_block_size)]
    argv += server.extra_args
    env = dict(os.environ)
    # The key goes through the environment, not argv: argv is readable by every user in `ps`.
    # Without server.api_key_env the server takes no key even if the caller's shell has
    # VLLM_API_KEY, else every client here (which sends none) would get 401s.
    env.pop("VLLM_API_KEY", None)
    if server.api_key_env:
        if not server.api_key:
            raise ServerError(f"server.api_key_env names {server.api_key_env}, which is not set in the environment: "
                              "export it (the key the server requires and every client sends) or remove api_key_env")
        env["VLLM_API_KEY"] = server.api_key
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # Without a network, hub look-ups only waste time before failing.
    env.setdefault("HF_HUB_OFFLINE", "1")
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(server.cpu_kvcache_gib))
        if server.cpu_thread_binding == "all-cores":
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(core) for core in sorted(os.sched_getaffinity(0))))
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        if server.cpu_compile:
            # vllm-cpu 0.32 could not load its own AOT-compiled model back ("'function' object has no
            # attribute 'finalize_loading'") and compiled again on every start (96-103 s); its
            # inductor cache does load: a second start of one configuration took 52 s instead of 98.
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if server.cpu_lora_kernels == "grouped":
            # vLLM's worker processes import the extension by name (and the compiled server's own
            # process its launcher), so they need this checkout.
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return argv, env


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def is_healthy(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", headers=headers, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(config: Config, *, port: int | None = None, detach: bool = True) -> ServerState:
    """Start vLLM for the configured base model and wait until it answers.

    With detach the server outlives this process; otherwise the caller owns
    it and should call stop_server (the CLI does, on Ctrl-C)."""
    if config.server.url:
        raise ServerError(f"the configuration points at a running server ({config.server.url}); not starting another")
    existing = read_state(config)
    if existing and pid_alive(existing.pid) and is_healthy(existing.url, auth_headers(config)):
        return existing
    port = port or config.server.port
    if not _port_free(config.server.host, port):
        raise ServerError(f"port {port} on {config.server.host} is already in use; set server.port to a free port")
    build = installed_vllm_build()
    device = "cuda" if has_gpu() else "cpu"
    if device == "cuda" and build == "cpu":
        raise ServerError("a GPU is present but the CPU build of vLLM is installed; install the CUDA build of vLLM (vllm==0.26.0 for torch 2.11)")
    if device == "cpu" and build == "cuda":
        raise ServerError("no GPU is present but the CUDA build of vLLM is installed; install requirements-cpu.txt (scripts/setup.sh)")

    argv, env = vllm_command(config, port, device)
    log_path = config.cache / "logs" / f"vllm-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, stdin=subprocess.DEVNULL)
    state = ServerState(
        url=f"http://{config.server.host}:{port}", pid=process.pid, log_path=str(log_path),
        base_model=config.base_model_path, max_lora_rank=int(argv[argv.index("--max-lora-rank") + 1]),
        max_loras=config.server.max_loras, max_cpu_loras=max(config.server.max_cpu_loras, config.server.max_loras),
        device=device, started_at=time.time(),
        lora_target_modules=lora_target_modules(config) if "--lora-target-modules" in argv else None,
    )
    deadline = time.monotonic() + config.server.startup_timeout_s
    while not is_healthy(state.url, auth_headers(config)):
        if process.poll() is not None:
            raise ServerError(f"vLLM exited with code {process.returncode} while starting; last lines of {log_path}:\n"
                              + _log_tail(log_path))
        if time.monotonic() > deadline:
            _terminate(process.pid)
            raise ServerError(f"vLLM did not become healthy within {config.server.startup_timeout_s:.0f} s; "
                              f"last lines of {log_path}:\n" + _log_tail(log_path))
        time.sleep(0.5)
    state = replace(state, startup_s=round(time.time() - state.started_at, 1))
    state_path(config).write_text(json.dumps(asdict(state), indent=2))
    return state


def _terminate(pid: int, grace_s: float = 20.0) -> None:
    """End the server's whole process group: vLLM runs its engine in a child."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_server(config: Config) -> bool:
    """Stop the server this cache folder started; False when none was running."""
    state = read_state(config)
    if state is None:
        return False
    alive = pid_alive(state.pid)
    if alive:
        _terminate(state.pid)
    state_path(config).unlink(missing_ok=True)
    return alive


def server_status(config: Config) -> ServerStatus:
    url = server_url(config)
    state = read_state(config)
    managed = bool(state and state.url == url and pid_alive(state.pid))
    status = ServerStatus(url=url, healthy=False, managed=managed, pid=state.pid if managed else None,
                          device=state.device if managed else None,
                          max_lora_rank=state.max_lora_rank if managed else config.server.max_lora_rank,
                          max_cpu_loras=state.max_cpu_loras if managed else config.server.max_cpu_loras,
                          lora_target_modules=state.lora_target_modules if managed else None)
    try:
        response = httpx.get(f"{url}/v1/models", headers=auth_headers(config), timeout=5)
        response.raise_for_status()
    except httpx.HTTPStatusError as error:
        key_env = config.server.api_key_env
        why = (f"{key_env} (server.api_key_env) is not set in this environment" if key_env and not config.server.api_key
               else f"the key in {key_env} is not the server's" if key_env
               else "set server.api_key_env to the environment variable holding the key it was started with")
        status.error = (f"vLLM server at {url} refused the request for want of its API key (HTTP 401): {why}"
                        if error.response.status_code == 401 else f"vLLM server at {url} answered {error}")
        return status
    except httpx.HTTPError as error:
        status.error = f"vLLM server at {url} is not reachable: {error}"
        return status
    status.healthy = True
    for card in response.json().get("data", []):
        if card.get("parent") is None:
            status.base_model = card["id"]
        else:
            status.adapters.append({"name": card["id"], "path": card.get("root")})
    return status
