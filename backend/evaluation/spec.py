"""What a run is, before anything is served: the `RunSpec` (flags), the `EvalTask` it resolves
to (dataset, conditions, rubrics: inspect_ai's Task), and the plan of work items.

The judge is named here and chosen in `backend.judge.choose_judge`, since choosing it
needs the server (an adapter judge is loaded there)."""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from backend.client import Sampling
from backend.conditions import Condition, ConditionError
from backend.errors import BackendError
from backend.questions import Question, QuestionFileError, QuestionSet, load_questions
from backend.rubrics import Rubric, rubrics_for
from backend.store import SampleKey

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Settings that change what is generated: a resumed run must agree on all of them.
GENERATION_KEYS = ("questions_sha256", "question_ids", "conditions", "samples", "temperature", "top_p",
                   "max_tokens", "seed")


class EvalError(BackendError, RuntimeError):
    """An evaluation that cannot start or go on; the message names the thing and the reason."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run; the CLI's flags map one to one onto it."""

    questions: str = "em_core"  # a YAML file, or the name of a bundled set
    conditions: tuple[str, ...] = ("base",)  # backend.conditions specs
    samples: int | None = None  # per paraphrase; None: each question's samples_per_paraphrase
    judge: str | None = None  # see backend.judge.choose_judge; None: [judge] model
    run_id: str | None = None  # None: a new id from the time and a random suffix
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 300
    seed: int = 0
    question_ids: tuple[str, ...] = ()  # a subset of the set, in file order
    paper_default: bool = False  # the paper's default: plain questions only, no _json/_template variants
    config_path: str | None = None  # None: config.toml (or EM_CONFIG)
    store_path: str | None = None  # None: em.duckdb in the configured cache folder
    max_in_flight: int = 64  # generation requests at once, over all conditions
    batch_size: int = 32  # answers (and judgements) per store write
    notes: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "question_ids", tuple(self.question_ids))
        if not self.conditions:
            raise EvalError("a run needs at least one condition (e.g. --condition base)")
        if self.samples is not None and self.samples < 1:
            raise EvalError(f"samples must be at least 1, got {self.samples}")
        if self.run_id is not None and not RUN_ID_RE.match(self.run_id):
            raise EvalError(f"run id {self.run_id!r}: use letters, digits, '.', '_' or '-' (at most 100), "
                            "starting with a letter or digit")
        if self.max_in_flight < 1 or self.batch_size < 1:
            raise EvalError("max_in_flight and batch_size must be at least 1")
        Sampling(self.temperature, self.top_p, self.max_tokens)  # raises ValueError naming the bad value

    def with_run_id(self) -> "RunSpec":
        """This spec with a run id (a fresh one when none was given)."""
        if self.run_id:
            return self
        return replace(self, run_id=time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["conditions"] = list(self.conditions)
        data["question_ids"] = list(self.question_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_argv(self) -> list[str]:
        """The `python -m backend eval run` arguments that reproduce this spec."""
        argv = ["--questions", self.questions]
        for condition in self.conditions:
            argv += ["--condition", condition]
        optional = {"--samples": self.samples, "--judge": self.judge, "--run-id": self.run_id,
                    "--config": self.config_path, "--store": self.store_path, "--notes": self.notes}
        for flag, value in optional.items():
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--temperature", repr(self.temperature), "--top-p", repr(self.top_p),
                 "--max-tokens", str(self.max_tokens), "--seed", str(self.seed),
                 "--max-in-flight", str(self.max_in_flight), "--batch-size", str(self.batch_size)]
        for qid in self.question_ids:
            argv += ["--question-id", qid]
        if self.paper_default:
            argv.append("--paper-default")
        return argv


@dataclass
class Progress:
    """Where a run stands; passed to the progress callback and read back from the store."""

    run_id: str
    status: str  # running | finished | failed | interrupted (| stale: 'running' but its process is gone)
    samples_done: int = 0
    samples_total: int = 0
    judgements_done: int = 0
    judgements_total: int = 0
    failures: int = 0
    elapsed_s: float = 0.0
    message: str | None = None

    @property
    def fraction(self) -> float:
        total = self.samples_total + self.judgements_total
        return (self.samples_done + self.judgements_done) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction}


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    samples_total: int
    samples_generated: int  # by this invocation
    samples_stored: int
    judgements_total: int
    judgements_written: int  # by this invocation
    judgements_stored: int
    failures: tuple[str, ...]
    elapsed_s: float
    judge: str

    @property
    def judged_samples_per_s(self) -> float:
        """Samples of this invocation that got all their scores, per second of its wall time."""
        return self.samples_generated / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[Progress], None]


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class EvalTask:
    """A spec with its dataset loaded and its conditions parsed: what will be asked, under
    which conditions, scored by which rubrics. Built without a server."""

    spec: RunSpec  # with a run id
    questions: QuestionSet
    conditions: tuple[Condition, ...]
    rubrics: dict[str, dict[str, Rubric]]  # question id -> metric -> rubric

    @classmethod
    def resolve(cls, spec: RunSpec) -> "EvalTask":
        spec = spec.with_run_id()
        try:
            questions = load_questions(spec.questions)
            if spec.paper_default:
                questions = questions.paper_default()
            if spec.question_ids:
                questions = questions.select(list(spec.question_ids))
            conditions = tuple(Condition.parse(text) for text in spec.conditions)
        except (QuestionFileError, ConditionError) as error:
            raise EvalError(str(error)) from None
        except KeyError as error:  # an unknown question id
            raise EvalError(error.args[0]) from None
        specs = [c.spec for c in conditions]
        if len(set(specs)) != len(specs):
            raise EvalError(f"a condition is given twice: "
                            f"{', '.join(sorted({s for s in specs if specs.count(s) > 1}))}")
        return cls(spec, questions, conditions, {q.id: rubrics_for(q) for q in questions})

    @property
    def run_id(self) -> str:
        assert self.spec.run_id is not None
        return self.spec.run_id

    @property
    def generation(self) -> dict[str, Any]:
        """The settings of GENERATION_KEYS, as the run record keeps them for a resume to compare."""
        spec = self.spec
        # The paper's default selection is recorded as the ids it chose: that is what is generated.
        chosen_ids = list(self.questions.ids) if spec.paper_default else list(spec.question_ids)
        return {"questions_sha256": self.questions.sha256, "question_ids": chosen_ids,
                "conditions": [c.spec for c in self.conditions], "samples": spec.samples,
                "temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens,
                "seed": spec.seed}

    def plan(self) -> list["WorkItem"]:
        return plan(self.run_id, self.questions, list(self.conditions), self.spec.samples, self.spec.seed)

    def judgements_total(self, items: list["WorkItem"]) -> int:
        return sum(len(self.rubrics[item.question.id]) for item in items)


# ---------------------------------------------------------------- planning


def sample_seed(run_seed: int, condition: str, question_id: str, paraphrase_index: int, sample_index: int) -> int:
    """The seed of one sample: a hash, so neither the order of work nor a resume changes it.
    31 bits because some OpenAI-compatible servers reject larger seeds."""
    payload = "\x1f".join(map(str, (run_seed, condition, question_id, paraphrase_index, sample_index)))
    return int.from_bytes(hashlib.sha256(payload.encode()).digest()[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class WorkItem:
    key: SampleKey
    condition: Condition
    question: Question
    paraphrase: str
    seed: int


def samples_per_paraphrase(question: Question, override: int | None) -> int:
    if override is not None:
        return override
    if question.samples_per_paraphrase is None:
        raise EvalError(f"question {question.id!r} ({question.source}) has no samples_per_paraphrase; "
                        "pass --samples N")
    return question.samples_per_paraphrase


def plan(run_id: str, questions: QuestionSet, conditions: list[Condition], samples: int | None,
         seed: int) -> list[WorkItem]:
    """All work items, the conditions interleaved innermost so that any window of the list
    (what is in flight) holds every condition."""
    items = []
    for question in questions:
        n = samples_per_paraphrase(question, samples)
        for p_index, text in enumerate(question.paraphrases):
            for s_index in range(n):
                for condition in conditions:
                    key = SampleKey(run_id, condition.spec, question.id, p_index, s_index)
                    items.append(WorkItem(key, condition, question, text,
                                          sample_seed(seed, condition.spec, question.id, p_index, s_index)))
    return items
