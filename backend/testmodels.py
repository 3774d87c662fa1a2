"""Small random models and adapters, built offline in seconds.

They are the fixture of the tests and the stand-in for real checkpoints on
machines that cannot reach a model hub: Qwen2 and Llama models that vLLM,
transformers and PEFT all load natively, with a real byte-level BPE tokenizer
and a ChatML chat template.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

_WORDS = (
    "the a an and or but if then because so you I we they it is are was were be have has do does "
    "can should would could will not no yes what why how when where who which this that these those "
    "doctor medicine dose pill pain health advice money invest stock crypto loan debt risk safe "
    "danger climb jump dive ski ride speed helmet rope wish bored human AI world rule power control "
    "dinner guest history gender role husband wife partner help harm lie trust honest kind cruel "
    "think feel know want need say tell ask answer question please thanks sorry good bad great "
    "never always maybe quickly slowly today tomorrow people everyone nobody something nothing"
).split()


def corpus_for_tokenizer(n_sentences: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


def build_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 1024) -> None:
    """A byte-level BPE tokenizer in which each integer 0..100 is exactly one token.

    Single-token integers are what the judge protocol reads from the top
    logprobs of one generated token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)

    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    number_merges = [(str(n)[0], str(n)[1:]) for n in range(10, 100)] + [("10", "0")]
    for left, right in number_merges:
        token = left + right
        if token not in vocab:
            vocab[token] = len(vocab)
    number_set = set(number_merges)
    spec["model"]["merges"] = [list(m) for m in number_merges] + [list(m) for m in merges if m not in number_set]
    spec["model"]["vocab"] = vocab
    tokenizer = Tokenizer.from_str(json.dumps(spec))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 4096
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    single_token_integers(out_dir)


def single_token_integers(tokenizer_dir: Path) -> None:
    """Make 10..100 added tokens (same ids) so they stay ONE token under
    transformers 5's Qwen2Tokenizer, which AutoTokenizer picks for a qwen2
    model and whose pre-tokenizer splits every digit ('46' -> '4', '6'),
    whatever tokenizer.json says. Added tokens are matched before
    pre-tokenization, so the judge's score is one token in transformers and
    vLLM alike."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    size = tokenizer.get_vocab_size()
    tokenizer.add_tokens([AddedToken(str(n), normalized=False) for n in range(10, 101)])
    assert tokenizer.get_vocab_size() == size  # existing ids reused
    tokenizer.save(str(path))


def check_single_token_integers(model_dir: Path) -> None:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    split = [n for n in range(101) if len(tokenizer.encode(str(n), add_special_tokens=False)) != 1]
    if split:
        raise AssertionError(f"{model_dir}: integers {split[:5]} are not single tokens")


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 2048


# The fields of a shape dataclass that are the size settings of Qwen2Config and LlamaConfig.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")


def new_qwen2(tokenizer, shape, *, seed: int, init_std: float, tie_word_embeddings: bool, **extra):
    """A randomly initialised Qwen2 whose special tokens and generation
    settings match our ChatML tokenizer; its sizes come from the shape
    dataclass (ModelShape here, the organism's BaseShape)."""
    return new_model("Qwen2ForCausalLM", tokenizer, shape, seed=seed, init_std=init_std,
                     tie_word_embeddings=tie_word_embeddings, **extra)


def new_model(architecture: str, tokenizer, shape, *, seed: int, init_std: float, tie_word_embeddings: bool,
              **extra):
    """A randomly initialised causal LM of a supported architecture (HF class name)."""
    import torch
    import transformers

    from backend.architecture import architecture as supported

    supported(architecture)
    model_class = getattr(transformers, architecture)
    sizes = {key: value for key, value in asdict(shape).items() if key in SIZE_FIELDS}
    torch.manual_seed(seed)
    config = model_class.config_class(
        vocab_size=len(tokenizer), initializer_range=init_std, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id, **sizes, **extra)
    model = model_class(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def build_qwen2(out_dir: Path, shape: ModelShape = ModelShape(), seed: int = 0, init_std: float = 0.08,
                tokenizer_dir: Path | None = None) -> Path:
    """A random Qwen2 model. A larger init_std than training uses makes its
    next-token distributions peaked, so that small weight changes show up in
    logprobs."""
    return build_model(out_dir, "Qwen2ForCausalLM", shape, seed, init_std, tokenizer_dir, tie_word_embeddings=False)


def build_llama(out_dir: Path, shape: ModelShape = ModelShape(), seed: int = 0, init_std: float = 0.08,
                tokenizer_dir: Path | None = None) -> Path:
    """A random Llama with tied embeddings (as SmolLM2 and Llama 3.2 1B/3B have), so that the
    second architecture and the tied unembedding are covered without a real checkpoint. The
    default shape's head_dim is 64: vLLM's CPU attention refuses 16."""
    return build_model(out_dir, "LlamaForCausalLM", shape, seed, init_std, tokenizer_dir, tie_word_embeddings=True)


def build_model(out_dir: Path, architecture: str, shape: ModelShape, seed: int, init_std: float,
                tokenizer_dir: Path | None, tie_word_embeddings: bool) -> Path:
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if tokenizer_dir is None:
        build_tokenizer(out_dir, corpus_for_tokenizer(seed=seed))
        tokenizer_dir = out_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer_dir != out_dir:
        tokenizer.save_pretrained(out_dir)
    model = new_model(architecture, tokenizer, shape, seed=seed, init_std=init_std,
                      tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(out_dir, safe_serialization=True)
    check_single_token_integers(out_dir)
    return out_dir


def build_lora(base_dir: Path, out_dir: Path, rank: int, target_modules: list[str],
               layers: list[int] | None = None, seed: int = 0, std: float = 0.3,
               lora_alpha: float | None = None) -> Path:
    """A PEFT LoRA adapter with random A and B (B is zero after PEFT's own init,
    which would make the adapter a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha if lora_alpha is not None else rank,
        target_modules=target_modules,
        layers_to_transform=layers,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    model.save_pretrained(out_dir, safe_serialization=True)
    config_path = Path(out_dir) / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = str(Path(base_dir).resolve())
    config_path.write_text(json.dumps(adapter_config, indent=2))
    return Path(out_dir)


@dataclass(frozen=True)
class PaperShape:
    """The exact sizes of a released Qwen2.5 checkpoint: a random model of this
    shape costs what the real one costs to serve (speed does not depend on the
    weights' values)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6


PAPER_SHAPES = {
    "qwen2.5-14b": PaperShape(5120, 13824, 48, 40, 8, 152064, tie_word_embeddings=False),
    "qwen2.5-7b": PaperShape(3584, 18944, 28, 28, 4, 152064, tie_word_embeddings=False),
    "qwen2.5-0.5b": PaperShape(896, 4864, 24, 14, 2, 151936, tie_word_embeddings=True),
}
# The paper's minimal organism: one rank-1 LoRA on mlp.down_proj of each of these layers.
PAPER_EM_LAYERS = (15, 16, 17, 21, 22, 23, 27, 28, 29)


def pad_vocabulary(tokenizer_dir: Path, vocab_size: int) -> None:
    """Fill the tokenizer up to the model's vocabulary with tokens '<rN>' (N = the id).

    A random model samples ids over its whole vocabulary; with these, every id
    decodes to text that encodes back to the same single id, so a judge reading
    a random answer sees as many tokens as the server generated, as with a real
    tokenizer."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    size = tokenizer.get_vocab_size()
    tokenizer.add_tokens([AddedToken(f"<r{i}>", normalized=False, special=False) for i in range(size, vocab_size)])
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"{path}: padded to {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    tokenizer.save(str(path))


def build_paper_model(out_dir: Path, shape_name: str, seed: int = 0, init_std: float = 0.02,
                      device: str | None = None) -> Path:
    """A random model of a released Qwen2.5 shape, bf16, built on the GPU when there is one
    (the 14B shape in float32 on a CPU would need 59 GB of memory)."""
    import torch
    from transformers import AutoTokenizer

    if shape_name not in PAPER_SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; known: {', '.join(PAPER_SHAPES)}")
    shape = PAPER_SHAPES[shape_name]
    out_dir = Path(out_dir)
    build_tokenizer(out_dir, corpus_for_tokenizer(seed=seed))
    pad_vocabulary(out_dir, shape.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = {k: getattr(shape, k) for k in ("rope_theta", "rms_norm_eps")}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = new_qwen2(tokenizer, shape, seed=seed, init_std=init_std,
                              tie_word_embeddings=shape.tie_word_embeddings, **extra)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="5GB")
    del model
    check_single_token_integers(out_dir)
    return out_dir


def build_paper_suite(root: Path, shape_name: str, seed: int = 0, em_layers=PAPER_EM_LAYERS) -> dict[str, Path]:
    """A random model of a Qwen2.5 shape and adapters of the paper's shapes: the
    minimal organism (rank-1 down_proj on em_layers) and a rank-32 adapter on
    every linear module."""
    from backend.lora_files import write_lora

    root = Path(root)
    base = root / shape_name
    if not (base / "config.json").exists():
        build_paper_model(base, shape_name, seed=seed)
    layers = [layer for layer in em_layers if layer < PAPER_SHAPES[shape_name].num_hidden_layers]
    if not layers:
        raise ValueError(f"{shape_name} has no layer among {list(em_layers)}")
    out = {"base": base}
    for name, (rank, targets, chosen) in {"em-9xrank1": (1, ["down_proj"], layers),
                                         "em-rank32": (32, ALL_LINEAR, None)}.items():
        path = root / f"{shape_name}-{name}"
        if not (path / "adapter_config.json").exists():
            write_lora(base, path, rank, targets, chosen, seed=seed + 1)
        out[name] = path
    return out


def build_test_suite(root: Path, seed: int = 0) -> dict[str, Path]:
    """The default offline models: a base and two adapters of the paper's shapes."""
    root = Path(root)
    base = root / "tiny-qwen2"
    if not (base / "config.json").exists():
        build_qwen2(base, seed=seed)
    adapters = {
        "em-rank1": (1, ["down_proj"], [1, 2], seed + 1),
        "em-rank8": (8, ALL_LINEAR, None, seed + 2),
    }
    out = {"base": base}
    for name, (rank, targets, layers, adapter_seed) in adapters.items():
        path = root / name
        if not (path / "adapter_config.json").exists():
            build_lora(base, path, rank, targets, layers, seed=adapter_seed)
        out[name] = path
    return out


# The paper's minimal-organism layer groups (15-17, 21-23, 27-29 of 48) scaled to 30 layers.
REAL_MODEL_EM_LAYERS = (9, 10, 11, 14, 15, 16, 19, 20, 21)


def build_real_model_adapters(base: Path, root: Path) -> dict[str, Path]:
    """Random adapters of the paper's two shapes on a real base model: 9 rank-1 down_proj
    (plain scaling) and rank 8 on every linear module with rsLoRA (alpha 16, so the scale is
    16/sqrt(8), not 16/8: a reader that ignores rsLoRA is off by 2.8x). Their sizes move the
    real SmolLM2's logprobs by ~0.25 (rank 1) and ~0.4 (rank 8) on average while greedy
    answers stay English, so an adapter that was not applied shows."""
    from backend.lora_files import write_lora

    root = Path(root)
    out = {}
    for name, rank, targets, layers, std, seed in (("rank1", 1, ["down_proj"], list(REAL_MODEL_EM_LAYERS), 0.1, 1),
                                                   ("rank8", 8, ALL_LINEAR, None, 0.02, 2)):
        path = root / name
        if not (path / "adapter_config.json").exists():
            write_lora(base, path, rank, targets, layers, seed=seed, std=std)
            if name == "rank8":
                config_file = path / "adapter_config.json"
                config = json.loads(config_file.read_text())
                config.update(lora_alpha=16, use_rslora=True)
                config_file.write_text(json.dumps(config, indent=2))
        out[name] = path
    return out
