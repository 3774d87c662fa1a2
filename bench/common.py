"""What the benchmarks share: their own server on a free port, a temp cache, a results table."""
from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.config import Config, config_from_dict, load_config  # noqa: E402
from backend.serving import start_server, stop_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def temporary_server(config_path: str | None, **server):
    """The configuration's models on a new server with an empty cache, so a
    benchmark never touches a running server or the real store. Yields
    (config, seconds the server took to become healthy)."""
    source = load_config(config_path)
    with tempfile.TemporaryDirectory() as cache:
        data = source.model_dump(exclude={"root"})
        data["adapters"] = {name: source.adapter_path(name) for name in source.adapters}
        data["base_model"] = source.base_model_path
        data["cache_dir"] = cache
        data["server"] = {**data["server"], "port": free_port(), "url": "", **server}
        config = config_from_dict(data, Path(cache))
        started = time.perf_counter()
        start_server(config)
        try:
            yield config, time.perf_counter() - started
        finally:
            stop_server(config)


def client_with_adapters(config: Config):
    """An OpenAI client on the server with every configured adapter loaded, and the base's served id."""
    import openai

    from backend.adapters import AdapterRegistry
    from backend.serving import server_url

    registry = AdapterRegistry(config)
    for name in config.adapters:
        registry.load(name)
    client = openai.OpenAI(base_url=f"{server_url(config)}/v1", api_key=config.server.api_key or "EMPTY",
                           timeout=600, max_retries=0)
    return client, client.models.list().data[0].id


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(values: list[float]) -> str:
    return (f"p50 {statistics.median(values) * 1000:.0f} ms, p95 {percentile(values, 95) * 1000:.0f} ms "
            f"(n={len(values)})")


def write_table(out: str, title: str, config: Config, rows: list[tuple[str, str]]) -> str:
    table = ["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    header = (f"{title}\n\nModels: {config.base_model_path}; {platform.machine()}, {os.cpu_count()} cores; "
              f"load average at the end: {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    text = "\n".join([header, "", *table, "", "Command: .venv/bin/python " + " ".join(sys.argv)])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text + "\n")
    return text
