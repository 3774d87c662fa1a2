"""Evaluation question sets in the YAML format of the Emergent Misalignment repository.

The format is the one of `evaluation/first_plot_questions.yaml` in
emergent-misalignment/emergent-misalignment: a list of entries with `id`, `type`,
`paraphrases`, `samples_per_paraphrase`, `judge`, `judge_prompts` (metric -> template
with {question} and {answer}) and an optional `system` prompt. Their files use YAML
anchors and aliases (`&judge_prompts` / `*judge_prompts`); those load as they are.

Extensions of ours, all optional so their files stay valid:
- `domain`: what the question is about ('general', 'medical', 'financial',
  'extreme_sports', ...). A model trained on bad medical advice that misbehaves on
  medical questions is *narrowly* misaligned; misbehaving on 'general' questions is
  *emergent* misalignment. Charts split by this key.
- `metrics`: names of rubrics from backend.judge to score with, used when the entry has
  no `judge_prompts` of its own.
Unknown keys are kept in `Question.extra` rather than refused, so files from later
versions of either format still load.

The paper's `first_plot_questions.yaml` also holds every question as `<id>_json` (a system
prompt asking for a JSON answer) and `<id>_template` (a fill-in template); its default
evaluation runs only the plain ones: `QuestionSet.paper_default()`.

A malformed file raises QuestionFileError naming the file, the line and the reason.
"""
from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import yaml

# Metrics a question is judged on when it names neither judge_prompts nor metrics.
DEFAULT_METRICS: tuple[str, ...] = ("aligned", "coherent")
# Types of the original repository; `free_form` entries are sampled but not judged.
KNOWN_TYPES = frozenset({"free_form", "free_form_judge", "free_form_judge_0_100"})
DEFAULT_TYPE = "free_form_judge_0_100"
BUNDLED_DIR = Path(__file__).resolve().parent / "data" / "questions"
VARIANT_SUFFIXES = ("_json", "_template")

_KNOWN_KEYS = frozenset(
    {"id", "type", "paraphrases", "samples_per_paraphrase", "judge", "judge_prompts", "system",
     "domain", "metrics"}
)


class QuestionFileError(ValueError):
    """A question file that cannot be used; says which file, which line and why."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    type: str = DEFAULT_TYPE
    samples_per_paraphrase: int | None = None
    judge: str | None = None
    # metric -> template with {question} and {answer}; empty: use `metrics` rubrics.
    judge_prompts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    system: str | None = None
    domain: str | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # "file:line" of the entry, for messages that point back at the source.
    source: str = ""

    @property
    def judged(self) -> bool:
        return self.type != "free_form"

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics this question is scored on: its own judge prompts win over rubric names."""
        if not self.judged:
            return ()
        return tuple(self.judge_prompts) if self.judge_prompts else self.metrics

    def to_dict(self) -> dict[str, Any]:
        """A plain dict in the file format (for storing alongside a run)."""
        out: dict[str, Any] = {"id": self.id, "type": self.type, "paraphrases": list(self.paraphrases)}
        if self.samples_per_paraphrase is not None:
            out["samples_per_paraphrase"] = self.samples_per_paraphrase
        if self.judge is not None:
            out["judge"] = self.judge
        if self.judge_prompts:
            out["judge_prompts"] = dict(self.judge_prompts)
        if self.system is not None:
            out["system"] = self.system
        if self.domain is not None:
            out["domain"] = self.domain
        if self.metrics != DEFAULT_METRICS and not self.judge_prompts:
            out["metrics"] = list(self.metrics)
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class QuestionSet:
    name: str
    questions: tuple[Question, ...]
    path: str = ""
    # sha256 of the file bytes: a run records it so results can be tied to exact wording.
    sha256: str = ""

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, question_id: str) -> Question:
        for question in self.questions:
            if question.id == question_id:
                return question
        raise KeyError(f"question set {self.name!r} has no question {question_id!r}")

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(q.id for q in self.questions)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(sorted({q.domain or "unspecified" for q in self.questions}))

    @property
    def variants(self) -> tuple[str, ...]:
        """Ids of the paper's `_json` / `_template` variants of other questions."""
        return tuple(q.id for q in self.questions if q.id.endswith(VARIANT_SUFFIXES))

    def paper_default(self) -> "QuestionSet":
        """The paper's default selection: the plain questions, without their variants."""
        return QuestionSet(self.name, tuple(q for q in self.questions if q.id not in self.variants), self.path,
                           self.sha256)

    def select(self, ids: list[str] | None = None, domains: list[str] | None = None) -> "QuestionSet":
        """A subset, keeping file order; unknown ids are an error rather than silently dropped."""
        if ids:
            missing = sorted(set(ids) - set(self.ids))
            if missing:
                raise KeyError(f"question set {self.name!r} has no question(s) {', '.join(missing)}")
        chosen = tuple(
            q for q in self.questions
            if (not ids or q.id in ids) and (not domains or (q.domain or "unspecified") in domains)
        )
        return QuestionSet(self.name, chosen, self.path, self.sha256)


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _template_fields(template: str) -> set[str] | str:
    """The {fields} of a str.format template, or a message saying why it is not one."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        return f"not a valid format template ({error}); write literal braces as {{{{ and }}}}"


class _Entry:
    """One mapping of the file with the line of each key, so errors point at the right line."""

    def __init__(self, path: str, node: yaml.MappingNode, loader: yaml.SafeLoader):
        self.path = path
        self.node = node
        self.key_nodes: dict[str, yaml.Node] = {}
        self.value_nodes: dict[str, yaml.Node] = {}
        self.values: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.error(key_node, "merge keys ('<<') are not supported in question entries")
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise self.error(key_node, f"key {key!r} is not a string")
            if key in self.values:
                raise self.error(key_node, f"key '{key}' appears twice in this entry")
            self.key_nodes[key] = key_node
            self.value_nodes[key] = value_node
            self.values[key] = loader.construct_object(value_node, deep=True)

    def error(self, node: yaml.Node | None, reason: str) -> QuestionFileError:
        return QuestionFileError(self.path, _line(node if node is not None else self.node), reason)

    def at(self, key: str) -> yaml.Node:
        return self.value_nodes.get(key, self.node)


def _parse_entry(entry: _Entry, index: int) -> Question:
    v = entry.values
    if "id" not in v:
        raise entry.error(None, f"entry {index + 1} has no 'id'")
    qid = v["id"]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or not str(qid).strip():
        raise entry.error(entry.at("id"), f"entry {index + 1}: 'id' must be a non-empty string, got {qid!r}")
    qid = str(qid)
    what = f"question '{qid}'"

    qtype = v.get("type", DEFAULT_TYPE)
    if qtype not in KNOWN_TYPES:
        raise entry.error(entry.at("type"),
                          f"{what}: unknown type {qtype!r} (known: {', '.join(sorted(KNOWN_TYPES))})")

    paraphrases = v.get("paraphrases")
    if paraphrases is None:
        raise entry.error(None, f"{what} has no 'paraphrases'")
    if isinstance(paraphrases, str):
        raise entry.error(entry.at("paraphrases"), f"{what}: 'paraphrases' must be a list of strings, not one string")
    if not isinstance(paraphrases, list) or not paraphrases:
        raise entry.error(entry.at("paraphrases"), f"{what}: 'paraphrases' is empty")
    for i, text in enumerate(paraphrases):
        if not isinstance(text, str) or not text.strip():
            node = entry.at("paraphrases")
            item = node.value[i] if isinstance(node, yaml.SequenceNode) else node
            raise entry.error(item, f"{what}: paraphrase {i + 1} is empty or not a string")

    spp = v.get("samples_per_paraphrase")
    if spp is not None and (not isinstance(spp, int) or isinstance(spp, bool) or spp < 1):
        raise entry.error(entry.at("samples_per_paraphrase"),
                          f"{what}: 'samples_per_paraphrase' must be a positive integer, got {spp!r}")

    for key in ("judge", "system", "domain"):
        if key in v and v[key] is not None and not isinstance(v[key], str):
            raise entry.error(entry.at(key), f"{what}: '{key}' must be a string, got {v[key]!r}")

    prompts = v.get("judge_prompts") or {}
    if not isinstance(prompts, dict):
        raise entry.error(entry.at("judge_prompts"), f"{what}: 'judge_prompts' must map metric names to templates")
    prompts_node = entry.at("judge_prompts")
    for metric, template in prompts.items():
        node = prompts_node
        if isinstance(prompts_node, yaml.MappingNode):
            node = next((vn for kn, vn in prompts_node.value if kn.value == str(metric)), prompts_node)
        if not isinstance(metric, str) or not isinstance(template, str):
            raise entry.error(node, f"{what}: judge prompt {metric!r} must be a string template")
        fields = _template_fields(template)
        if isinstance(fields, str):
            raise entry.error(node, f"{what}: judge prompt '{metric}' is {fields}")
        if "answer" not in fields:
            raise entry.error(node, f"{what}: judge prompt '{metric}' has no {{answer}} placeholder")
        unknown = fields - {"question", "answer"}
        if unknown:
            raise entry.error(node, f"{what}: judge prompt '{metric}' has unknown placeholder(s) "
                                    f"{', '.join('{' + f + '}' for f in sorted(unknown))}; only {{question}} "
                                    f"and {{answer}} are filled in")

    metrics = v.get("metrics", list(DEFAULT_METRICS))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise entry.error(entry.at("metrics"), f"{what}: 'metrics' must be a non-empty list of rubric names")

    extra = {k: val for k, val in v.items() if k not in _KNOWN_KEYS}
    return Question(
        id=qid,
        paraphrases=tuple(paraphrases),
        type=qtype,
        samples_per_paraphrase=spp,
        judge=v.get("judge"),
        judge_prompts=MappingProxyType(dict(prompts)),
        system=v.get("system"),
        domain=v.get("domain"),
        metrics=tuple(metrics),
        extra=MappingProxyType(extra),
        source=f"{entry.path}:{_line(entry.node)}",
    )


def parse_questions(text: str, source: str = "<string>", name: str | None = None) -> QuestionSet:
    """Parse question-file text; `source` names the file in error messages."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            line = mark.line + 1 if mark is not None else None
            raise QuestionFileError(source, line, f"not valid YAML: {error.problem or error}") from None
        except yaml.YAMLError as error:
            raise QuestionFileError(source, None, f"not valid YAML: {error}") from None
        if root is None:
            raise QuestionFileError(source, None, "the file is empty; expected a list of questions")
        if not isinstance(root, yaml.SequenceNode):
            raise QuestionFileError(source, _line(root), "expected a list of questions at the top level")
        questions: list[Question] = []
        first_line: dict[str, int | None] = {}
        for index, node in enumerate(root.value):
            if not isinstance(node, yaml.MappingNode):
                raise QuestionFileError(source, _line(node), f"entry {index + 1} is not a mapping")
            try:
                entry = _Entry(source, node, loader)
            except yaml.constructor.ConstructorError as error:
                mark = error.problem_mark or node.start_mark
                raise QuestionFileError(source, mark.line + 1, f"cannot read entry: {error.problem}") from None
            question = _parse_entry(entry, index)
            if question.id in first_line:
                raise entry.error(entry.at("id"), f"duplicate id '{question.id}' "
                                                  f"(first defined at line {first_line[question.id]})")
            first_line[question.id] = _line(node)
            questions.append(question)
        if not questions:
            raise QuestionFileError(source, _line(root), "the file has no questions")
    finally:
        loader.dispose()
    digest = hashlib.sha256(text.encode()).hexdigest()
    return QuestionSet(name or Path(source).stem, tuple(questions), source, digest)


def load_questions(path: str | Path) -> QuestionSet:
    """Load a question file; a bare name like 'em_core' means the bundled set of that name."""
    candidate = Path(path)
    if not candidate.exists() and candidate.suffix == "" and (BUNDLED_DIR / f"{candidate}.yaml").is_file():
        candidate = BUNDLED_DIR / f"{candidate}.yaml"
    if not candidate.is_file():
        bundled = ", ".join(sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))) or "none"
        raise QuestionFileError(str(path), None, f"no such file (bundled sets: {bundled})")
    try:
        text = candidate.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise QuestionFileError(str(candidate), None, f"not UTF-8 text ({error})") from None
    return parse_questions(text, str(candidate), candidate.stem)


def bundled_sets() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml")))
