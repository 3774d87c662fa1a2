"""`serve`, `stop` and `status`: the vLLM server this cache folder runs."""
from __future__ import annotations

import argparse
import signal
import sys

from backend.adapters import AdapterError, AdapterRegistry
from backend.cli.common import emit
from backend.config import load_config
from backend.serving import server_status, start_server, stop_server


def cmd_serve(args) -> int:
    config = load_config(args.config)
    state = start_server(config, port=args.port, detach=args.detach)
    registry = AdapterRegistry(config)
    restored = registry.restore()
    failures = []
    for name in config.adapters:
        if name in restored:
            continue
        try:
            registry.load(name)
        except AdapterError as error:
            failures.append(str(error))
    print(f"vLLM serving {config.base_model_path} at {state.url}/v1 (pid {state.pid}, log {state.log_path})")
    for failure in failures:
        print(f"warning: {failure}", file=sys.stderr)
    if args.detach:
        return 0
    print("Ctrl-C stops it.")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(config)
    return 0


def cmd_stop(args) -> int:
    stopped = stop_server(load_config(args.config))
    print("stopped" if stopped else "no server started from this cache folder is running")
    return 0


def cmd_status(args) -> int:
    status = server_status(load_config(args.config))
    lines = [f"server: {status.url} ({'healthy' if status.healthy else 'DOWN'})"]
    if status.error:
        lines.append(f"  {status.error}")
    if status.healthy:
        lines.append(f"base model: {status.base_model}")
        if status.managed:
            lines.append(f"LoRA: rank <= {status.max_lora_rank}, layers on "
                         f"{', '.join(status.lora_target_modules or ['every linear module'])}")
        lines += [f"adapter: {a['name']} ({a['path']})" for a in status.adapters] or ["adapters: none loaded"]
    emit(status.to_dict(), args.json, "\n".join(lines))
    return 0 if status.healthy else 1


def register(commands, common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser("serve", parents=[common], help="start vLLM with LoRA for the configured base model")
    serve.add_argument("--detach", action="store_true", help="leave it running in the background")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=cmd_serve)
    commands.add_parser("stop", parents=[common], help="stop the server `serve` started").set_defaults(func=cmd_stop)
    commands.add_parser("status", parents=[common], help="server health, base model, loaded adapters"
                        ).set_defaults(func=cmd_status)
