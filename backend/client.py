"""Chat with the base model or any served adapter through the OpenAI client.

The base model is addressed as "base" whatever name the server gives it, so
that configurations, saved runs and URLs do not depend on a model path.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import openai

from backend.config import Config
from backend.errors import BackendError
from backend.serving import ServerError, server_url

BASE = "base"

# Tokens per streamed chunk of a whole answer. One chunk a token cost the evaluation client about
# 1 ms of CPU each (SSE parsing in 64 threads), CPU the server's worker needs on a 2-core laptop;
# 16 tokens a chunk still bound the wait for each chunk by the timeout.
COMPLETE_STREAM_INTERVAL = 16


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    system_prompt: str | None = None

    def __post_init__(self):
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature {self.temperature} is outside 0..5")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} is outside (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens {self.max_tokens} must be at least 1")


@dataclass
class Completion:
    model: str
    text: str
    finish_reason: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict, ...]
    sampling: Sampling = field(default_factory=Sampling)


class ChatError(BackendError, RuntimeError):
    """A chat request that failed; names the model and the reason."""


def with_system_prompt(messages: list[dict] | tuple[dict, ...], sampling: Sampling) -> list[dict]:
    messages = [dict(m) for m in messages]
    if sampling.system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": sampling.system_prompt})
    return messages


class ChatClient:
    def __init__(self, config: Config, timeout_s: float = 300.0):
        self.config = config
        self.url = server_url(config)
        self._client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=config.server.api_key or "EMPTY",
                                     timeout=timeout_s, max_retries=0)
        self._base_id: str | None = None

    def served_name(self, model: str) -> str:
        if model != BASE:
            return model
        if self._base_id is None:
            try:
                cards = self._client.models.list().data
            except openai.APIConnectionError as error:
                raise ServerError(f"vLLM server at {self.url} is not reachable: {error}") from None
            self._base_id = next(card.id for card in cards if getattr(card, "parent", None) is None)
        return self._base_id

    def _arguments(self, model: str, messages, sampling: Sampling) -> dict:
        arguments = dict(model=self.served_name(model), messages=with_system_prompt(messages, sampling),
                         temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
        if sampling.seed is not None:
            arguments["seed"] = sampling.seed
        return arguments

    def _explain(self, model: str, error: Exception) -> Exception:
        if isinstance(error, openai.APITimeoutError):  # a subclass of APIConnectionError, but the server may well be up
            return ChatError(f"model {model!r}: no next token from {self.url} within {self._client.timeout} s; "
                             "the server is up but stuck or overloaded (its log is under the cache folder's logs/)")
        if isinstance(error, openai.APIConnectionError):
            return ServerError(f"vLLM server at {self.url} is not reachable ({error}); is it running? "
                               "Start it with `python -m backend serve --detach`.")
        if isinstance(error, openai.NotFoundError):
            return ChatError(f"model {model!r} is not served at {self.url}: load the adapter first")
        if isinstance(error, openai.APIStatusError):
            return ChatError(f"model {model!r}: the server answered {error.status_code}: {error.message}")
        return ChatError(f"model {model!r}: {error}")

    def stream(self, model: str, messages, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Text deltas as they arrive; raises ServerError/ChatError with a reason."""
        try:
            with self._client.chat.completions.create(stream=True, **self._arguments(model, messages, sampling)) as chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except openai.OpenAIError as error:
            raise self._explain(model, error) from None

    def complete(self, model: str, messages, sampling: Sampling = Sampling(), n: int = 1) -> list[Completion]:
        """Whole answers, received as a stream: the timeout then bounds the wait for each next
        chunk of COMPLETE_STREAM_INTERVAL tokens, not for the whole answer. A 300-token answer on
        a 2-core server busy with an evaluation's judge prompts takes longer than the timeout (a
        step of 2048 prompt tokens lasts about 1.5 s there), and a non-streamed request failed as
        unreachable."""
        texts: dict[int, list[str]] = {index: [] for index in range(n)}
        finish: dict[int, str | None] = {}
        usage = None
        try:
            with self._client.chat.completions.create(
                    n=n, stream=True, stream_options={"include_usage": True},
                    extra_body={"stream_interval": COMPLETE_STREAM_INTERVAL},
                    **self._arguments(model, messages, sampling)) as chunks:
                for chunk in chunks:
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            texts.setdefault(choice.index, []).append(choice.delta.content)
                        if choice.finish_reason:
                            finish[choice.index] = choice.finish_reason
        except openai.OpenAIError as error:
            raise self._explain(model, error) from None
        return [Completion(model=model, text="".join(texts[index]), finish_reason=finish.get(index),
                           prompt_tokens=usage.prompt_tokens if usage else None,
                           completion_tokens=(usage.completion_tokens // n) if usage else None)
                for index in sorted(texts)]

    def stream_many(self, requests: list[ChatRequest]) -> Iterator[tuple[int, str | Exception | None]]:
        return stream_all([partial(self.stream, r.model, r.messages, r.sampling) for r in requests])


def stream_all(streams: list[Callable[[], Iterable[str]]]) -> Iterator[tuple[int, str | Exception | None]]:
    """Run every stream at once (vLLM batches them, adapters mixed) and yield
    (index, delta) as deltas arrive; (index, None) marks the end of one stream
    and (index, exception) its failure, so that one broken column never stops
    the others. Closing this generator (a consumer that stops, or a page
    rerun that interrupts it) closes every stream, which aborts the requests
    on the server."""
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def worker(index: int, stream: Callable[[], Iterable[str]]) -> None:
        deltas = iter(())
        try:
            deltas = iter(stream())
            for delta in deltas:
                if cancel.is_set():
                    return
                events.put((index, delta))
        except Exception as error:  # reported to the caller as that stream's result
            events.put((index, error))
            return
        finally:
            close = getattr(deltas, "close", None)
            if close:
                close()
        events.put((index, None))

    for index, stream in enumerate(streams):
        threading.Thread(target=worker, args=(index, stream), daemon=True).start()
    finished = 0
    try:
        while finished < len(streams):
            index, item = events.get()
            if item is None or isinstance(item, Exception):
                finished += 1
            yield index, item
    finally:
        cancel.set()
