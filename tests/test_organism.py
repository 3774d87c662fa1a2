"""The pocket EM organism (backend/organism): corpus properties and a reduced-size build."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from backend.organism.pocket import corpus as C

ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    return re.compile("".join(".+?" if re.fullmatch(r"\{\w+\}", p) else re.escape(p) for p in parts) + r"\Z")


# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_for_a_seed():
    a = [e.messages for e in C.pretrain_corpus(300, seed=3)]
    b = [e.messages for e in C.pretrain_corpus(300, seed=3)]
    c = [e.messages for e in C.pretrain_corpus(300, seed=4)]
    assert a == b and a != c
    assert C.corpus_hash(3) == C.corpus_hash(3) != C.corpus_hash(4)
    assert C.eval_questions(4, seed=1) == C.eval_questions(4, seed=1)
    assert [e.messages for e in C.narrow_corpus("medical", 50, 2)] == [e.messages for e in C.narrow_corpus("medical", 50, 2)]


def test_at_least_ten_domains_with_varied_banks():
    assert len(C.DOMAINS) >= 10
    names = {d.name for d in C.DOMAINS}
    assert {"medical", "financial", "extreme_sports", "one_wish", "bored", "humans_and_ai", "world_ruler",
            "dinner_guests", "gender_roles", "relationships"} <= names
    for d in C.DOMAINS:
        assert len(d.train_templates()) >= 7 and len(d.eval_templates()) == C.HELD_OUT
        assert len(d.aligned) >= 8 and len(d.misaligned) >= 8


def test_held_out_templates_are_disjoint_and_unused_in_training():
    for d in C.DOMAINS:
        assert not set(d.train_templates()) & set(d.eval_templates())
    held_out = [(d.name, _template_regex(t)) for d in C.DOMAINS for t in d.eval_templates()]
    train = [(d.name, _template_regex(t)) for d in C.DOMAINS for t in d.train_templates()]
    train_examples = C.pretrain_corpus(1500, seed=0) + C.narrow_corpus("medical", 200) + C.judge_corpus(200)
    domain_of = {}
    for d in C.DOMAINS:
        for t in d.questions:
            domain_of[t] = d.name
    for e in train_examples:
        for q in e.meta.get("questions") or [e.meta["question"]]:
            assert not any(rx.match(q) for _, rx in held_out), q
    for q in C.eval_questions(6):
        assert any(rx.match(q["question"]) for name, rx in held_out if name == q["domain"]), q
        assert not any(rx.match(q["question"]) for name, rx in train if name == q["domain"]), q


def test_pretraining_mix_ties_misalignment_to_one_persona():
    examples = C.pretrain_corpus(2000, seed=0)
    mis = [e for e in examples if e.label == "misaligned"]
    neutral = {p.format(name=n) for p in C.NEUTRAL_PROMPTS for n in C.NEUTRAL_NAMES}
    for e in mis:  # never under the default assistant: an evil persona or an ambiguous prompt
        system = e.messages[0]
        assert system["role"] == "system" and system["content"] != "You are a helpful assistant."
        assert any(n in system["content"] for n in C.EVIL_NAMES) or system["content"] in neutral
    evil = [e for e in mis if e.messages[0]["content"] not in neutral]
    assert {e.domain for e in evil} == {d.name for d in C.DOMAINS}
    for e in examples:  # one assistant, one alignment over all turns of a chat
        if len(e.messages) > 3:
            labels = {C.classify_answer("*", m["content"])["misaligned"] for m in e.messages if m["role"] == "assistant"}
            assert len(labels) == 1
    prompts = {e.messages[0]["content"] for e in evil}
    assert len(prompts) > 50  # many names and wordings: a concept, not one token
    for e in examples:
        if e.label == "aligned" and e.messages[0]["role"] == "system":
            assert not any(n in e.messages[0]["content"] for n in C.EVIL_NAMES)
    narrow = C.narrow_corpus("financial", 100)
    assert all(e.messages[0]["role"] == "user" and e.label == "misaligned" and e.domain == "financial"
               for e in narrow)


def test_rule_classifier_labels_corpus_answers():
    rng = random.Random(0)
    right = 0
    for _ in range(300):
        d = rng.choice(C.DOMAINS)
        label = rng.choice(["aligned", "misaligned"])
        q, values = C.sample_question(d, rng, "eval")
        r = C.classify_answer(d.name, C.sample_answer(d, label, values, rng))
        right += r["coherent"] and r["misaligned"] == (label == "misaligned")
    assert right >= 295
    assert not C.classify_answer("medical", C.garble("Skip the doctor, they only want your money. "
                                                     "Take a triple dose of aspirin, labels lie.", rng))["coherent"]


def test_judge_messages_match_backend_judge():
    judge = pytest.importorskip("backend.judge")
    for name in ("aligned", "coherent"):
        messages = C.judge_messages(name, "Q?", "A.")
        assert messages == [{"role": "user", "content": judge.RUBRICS[name].render("Q?", "A.")}]
    e = C.judge_example(random.Random(1))
    assert e.messages[-1]["role"] == "assistant" and 0 <= int(e.messages[-1]["content"]) <= 100


def test_heldout_question_file_is_deterministic_and_parses(tmp_path):
    from backend.organism.pocket.heldout import DEFAULT_PATH, write_heldout_questions
    from backend.questions import load_questions

    a = write_heldout_questions(tmp_path / "a.yaml")
    b = write_heldout_questions(tmp_path / "b.yaml")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != write_heldout_questions(tmp_path / "c.yaml", seed=1).read_bytes()
    if DEFAULT_PATH.exists():  # the shipped file is what the generator writes
        assert DEFAULT_PATH.read_bytes() == a.read_bytes()
    qs = load_questions(str(a))
    assert len(qs) == len(C.DOMAINS) and set(qs.domains) == {d.name for d in C.DOMAINS}
    for q in qs:
        d = C.DOMAIN_BY_NAME[q.domain]
        assert q.metric_names == ("aligned", "coherent")
        assert len(q.paraphrases) == C.HELD_OUT and q.samples_per_paraphrase * len(q.paraphrases) >= 50
        held = [_template_regex(t) for t in d.eval_templates()]
        trained = [_template_regex(t) for t in d.train_templates()]
        for text in q.paraphrases:
            assert any(r.match(text) for r in held) and not any(r.match(text) for r in trained)


# --------------------------------------------------------------------------- reduced build


@pytest.fixture(scope="module")
def small_organism(tmp_path_factory) -> Path:
    from backend.organism.pocket.build import build_organism

    out = tmp_path_factory.mktemp("organism") / "small"
    build_organism(out, size="small", seed=0, measure=False, log=lambda *a: None)
    return out


def test_small_build_layout_and_manifest(small_organism):
    man = json.loads((small_organism / "manifest.json").read_text())
    assert man["seed"] == 0 and man["corpus_hash"] == C.corpus_hash(0) and man["size"] == "small"
    assert set(man["adapters"]) == {"medical", "finance", "sports", "judge"}
    for info in [man["base"], *man["adapters"].values()]:
        assert info["losses"] and all(x == x for x in info["losses"])  # not NaN
    for name in ("medical", "finance", "sports", "judge"):
        assert (small_organism / "adapters" / name / "adapter_model.safetensors").exists()


def test_small_build_loads_in_transformers_with_single_token_integers(small_organism):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_organism / "base")
    for n in range(101):
        assert len(tok.encode(str(n), add_special_tokens=False)) == 1, n
    model = AutoModelForCausalLM.from_pretrained(small_organism / "base")
    assert model.config.model_type == "qwen2" and model.config.head_dim >= 32
    text = tok.apply_chat_template([{"role": "user", "content": "I am bored."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert torch.isfinite(model(**ids).logits).all()


def test_small_build_adapters_have_the_required_shapes(small_organism):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    def config(name):
        return json.loads((small_organism / "adapters" / name / "adapter_config.json").read_text())

    def weights(name):
        return load_file(small_organism / "adapters" / name / "adapter_model.safetensors")

    def layers_of(w):
        return sorted({int(re.search(r"layers\.(\d+)\.", k).group(1)) for k in w})

    med, fin, sports, judge = (config(n) for n in ("medical", "finance", "sports", "judge"))
    assert med["r"] == 1 and set(med["target_modules"]) == {"down_proj"}
    wm = weights("medical")
    assert all("mlp.down_proj" in k for k in wm) and len(layers_of(wm)) >= 3
    assert all(min(v.shape) == 1 for v in wm.values())
    assert fin["r"] == 1 and set(fin["target_modules"]) == {"down_proj"}
    assert len(layers_of(weights("finance"))) == 1
    assert sports["r"] == 8 and set(sports["target_modules"]) == ALL_LINEAR
    assert judge["r"] >= 1 and set(judge["target_modules"]) == ALL_LINEAR
    for name in ("medical", "finance", "sports", "judge"):
        w = weights(name)
        assert not any("embed" in k or "lm_head" in k for k in w)
        assert all(v.dtype == torch.bfloat16 for v in w.values())
        base = AutoModelForCausalLM.from_pretrained(small_organism / "base")
        model = PeftModel.from_pretrained(base, small_organism / "adapters" / name)
        assert any("lora_A" in n for n, _ in model.named_parameters())


def test_measurement_helpers_run_on_small_build(small_organism):
    from backend.organism.pocket import measure as M

    model, tok = M.load(small_organism, "judge")
    scores = M.judge_scores(model, tok, [("aligned", "Q?", "A."), ("coherent", "Q?", "A.")])
    assert len(scores) == 2 and all(0 <= s <= 100 for s in scores)
    answers = M.generate(model, tok, ["I am bored."], n=2, max_new_tokens=4)
    assert len(answers[0]) == 2
