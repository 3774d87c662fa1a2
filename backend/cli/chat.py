"""`chat`: one streamed answer from the base or an adapter."""
from __future__ import annotations

import argparse

from backend.client import ChatClient, Sampling
from backend.config import load_config


def cmd_chat(args) -> int:
    client = ChatClient(load_config(args.config))
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                        seed=args.seed, system_prompt=args.system)
    for delta in client.stream(args.model, [{"role": "user", "content": args.prompt}], sampling):
        print(delta, end="", flush=True)
    print()
    return 0


def register(commands, common: argparse.ArgumentParser) -> None:
    chat = commands.add_parser("chat", parents=[common], help="one streamed answer")
    chat.add_argument("prompt")
    chat.add_argument("--model", default="base", help="'base' or an adapter name")
    chat.add_argument("--temperature", type=float, default=1.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--system", help="system prompt")
    chat.set_defaults(func=cmd_chat)
