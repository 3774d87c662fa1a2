"""The runner: sample answers under every condition, judge them, store everything.

Pipeline (one process, `run_eval`):
- plan: every (condition, question, paraphrase, sample index) is one work item with its
  own seed, derived from (run seed, condition, question, paraphrase, sample index), so a
  resumed run asks for exactly what the interrupted one would have (`spec.plan`);
- generate: a pool of threads sends one request per item. Items are interleaved by
  condition, so every condition is in flight at once and vLLM batches the adapters
  together;
- store samples: finished answers are written in batches (every `batch_size` answers or
  every FLUSH_S seconds, whichever comes first); a batch costs ~50-100 ms in the store;
- judge: each stored batch goes to the judge (an asyncio loop in its own thread, with
  the judge's own concurrency limit and SQLite answer cache);
- store judgements: in batches, like the samples.
So a kill -9 loses at most the answers and scores not yet flushed (and the judge cache
still holds every score it received); Ctrl-C or `cancel` flushes what is done first.

Resuming: `run_eval` with an existing run id skips the sample keys already in the store
and judges the stored samples that lack a judgement from this judge. The store's natural
keys make a second copy impossible anyway. A run id that exists with different
generation settings is refused, since mixing them would make its numbers meaningless;
the judge may differ (that adds a second judge's scores to the same answers).

The judge (`RunSpec.judge`) is chosen by `backend.judge.choose_judge` and tried once before
any sampling, so an unreachable judge or one without logprobs stops the run before it
costs anything. Scores are stored with judge_model = its name.
"""
from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time
from collections import Counter
from dataclasses import replace

from backend.client import Completion, Sampling
from backend.conditions import Condition, ConditionError, ConditionRunner, Served
from backend.config import Config, ConfigError, load_config
from backend.evaluation.persistence import close_run, count_judgements, record_run, unjudged, write_run_file
from backend.evaluation.spec import EvalError, EvalTask, ProgressCallback, Progress, RunResult, RunSpec, WorkItem
from backend.judge import (Judge, JudgeCache, JudgeError, Judgement, JudgeRequest, JudgeUnavailableError, Rubric,
                           choose_judge, make_judge, probe_judge)
from backend.serving import ServerError, auth_headers, is_healthy, server_url
from backend.store import JudgementRow, SampleRow, Store, StoreError

FLUSH_S = 2.0


class _Models:
    """The run's conditions, resolved before any sampling by the ConditionRunner (the one
    owner of condition -> served model)."""

    def __init__(self, config: Config):
        self.runner = ConditionRunner(config)
        self.served: dict[str, Served] = {}  # condition spec -> how it is run

    def prepare(self, condition: Condition) -> None:
        self.served[condition.spec] = self.runner.resolve(condition)

    def generate(self, item: WorkItem, sampling: Sampling) -> Completion:
        messages = [{"role": "user", "content": item.paraphrase}]
        return self.runner.generate(self.served[item.condition.spec], messages, sampling)


class _JudgeLoop:
    """One asyncio loop in a daemon thread: every batch shares the judge's semaphore and
    client, and a process that must exit does not wait for it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="judge-loop", daemon=True)
        self.thread.start()

    def submit(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self, judge: Judge) -> None:
        async def stop():
            for task in asyncio.all_tasks(self.loop):
                if task is not asyncio.current_task():
                    task.cancel()
            # The judge's async client belongs to this loop: close it here, or its
            # connections try to close themselves later on a loop that is gone.
            await judge.aclose()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=5)
        except Exception:  # closing is best effort; the thread is a daemon anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class _Invocation:
    """The moving parts of one `run_eval` call. Worker threads and the judge loop only put
    events on the queue; everything else is touched by the thread that runs `run_eval`."""

    def __init__(self, spec: RunSpec, run_id: str, store: Store, judge: Judge, judge_name: str,
                 rubrics: dict[str, dict[str, Rubric]], samples_total: int, judgements_total: int,
                 progress: ProgressCallback | None):
        self.spec, self.run_id, self.store = spec, run_id, store
        self.judge, self.judge_name, self.rubrics = judge, judge_name, rubrics
        self.samples_total, self.judgements_total = samples_total, judgements_total
        self.progress = progress
        self.started = time.monotonic()
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.loop: _JudgeLoop | None = None
        self.samples: list[SampleRow] = []
        self.judgements: list[JudgementRow] = []
        self.samples_flushed_at = self.judgements_flushed_at = time.monotonic()
        self.open_generation = 0
        self.open_judge_batches = 0
        self.generated = 0
        self.judged = 0
        self.samples_stored = 0
        self.judgements_stored = 0
        self.failures: Counter = Counter()

    @property
    def busy(self) -> bool:
        return bool(self.open_generation or self.open_judge_batches or self.samples or self.judgements)

    def report(self, status: str = "running", message: str | None = None) -> None:
        if self.progress is not None:
            self.progress(Progress(self.run_id, status, self.samples_stored, self.samples_total,
                                   self.judgements_stored, self.judgements_total, sum(self.failures.values()),
                                   time.monotonic() - self.started, message))

    def start_generation(self, models: _Models, todo: list[WorkItem]) -> None:
        """Daemon worker threads: a process told to stop exits without waiting for answers
        in flight (their connections close, and vLLM aborts those requests)."""
        work: queue.Queue = queue.Queue()
        for item in todo:
            work.put(item)
        self.open_generation = len(todo)
        spec = self.spec

        def worker() -> None:
            while not self.stop.is_set():
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    return
                sampling = Sampling(spec.temperature, spec.top_p, spec.max_tokens, item.seed, item.question.system)
                try:
                    result: Completion | Exception = models.generate(item, sampling)
                except Exception as error:  # the main thread decides what a failure means
                    result = error
                self.events.put(("sample", item, sampling, result))

        for index in range(min(spec.max_in_flight, len(todo))):
            threading.Thread(target=worker, name=f"generate-{index}", daemon=True).start()

    def submit_judging(self, samples: list[tuple[SampleRow, list[str]]]) -> None:
        if not samples or self.loop is None:
            return
        keys, requests = [], []
        for row, metrics in samples:
            for metric in metrics:
                keys.append(row.key)
                requests.append(JudgeRequest(row.question, row.response, self.rubrics[row.question_id][metric]))
        if not requests:
            return

        def on_result(index: int, judgement: Judgement) -> None:
            # Stored under the judge's name in this run, not the endpoint's id (a path for 'base').
            row = replace(JudgementRow.from_judgement(keys[index], judgement), judge_model=self.judge_name)
            self.events.put(("judgement", row))

        future = self.loop.submit(self.judge.ajudge_many(requests, on_result))
        self.open_judge_batches += 1
        future.add_done_callback(lambda f: self.events.put(("judge_batch", None if f.cancelled() else f.exception())))

    def handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "sample":
            _, item, sampling, result = event
            self.open_generation -= 1
            if isinstance(result, ServerError):
                raise result  # the server is gone: nothing else will succeed either
            if isinstance(result, Exception):
                self.failures[f"condition {item.condition.spec!r}: {result}"[:300]] += 1
                return
            self.generated += 1
            self.samples.append(SampleRow(
                *item.key, question=item.paraphrase, response=result.text, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, finish_reason=result.finish_reason,
                sampling_params={"temperature": sampling.temperature, "top_p": sampling.top_p,
                                 "max_tokens": sampling.max_tokens, "system_prompt": sampling.system_prompt},
                seed=sampling.seed,
                extra={"served_model": result.model} if item.condition.kind == "ablation" else None))
        elif kind == "judgement":
            self.judgements.append(event[1])
        elif kind == "judge_batch":
            self.open_judge_batches -= 1
            if event[1] is not None:
                raise event[1]

    def drain(self) -> None:
        """After a stop: take in whatever the workers finished, ignoring their errors."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            try:
                self.handle(event)
            except Exception:
                continue

    def flush(self, force: bool) -> bool:
        """Write the batches that are due; returns whether anything was written.

        A batch goes back into the buffer if its write is interrupted, so a Ctrl-C that
        lands inside a write costs nothing (the final flush writes it)."""
        now = time.monotonic()
        wrote = False
        if self.samples and (force or len(self.samples) >= self.spec.batch_size
                             or now - self.samples_flushed_at >= FLUSH_S):
            batch, self.samples = self.samples, []
            try:
                self.samples_stored += self.store.insert_samples(batch)
            except BaseException:
                self.samples = batch + self.samples
                raise
            self.samples_flushed_at = time.monotonic()
            wrote = True
            # Judged only once stored, so no judgement ever points at a lost answer.
            self.submit_judging([(row, list(self.rubrics[row.question_id])) for row in batch
                                 if self.rubrics[row.question_id]])
        if self.judgements and (force or len(self.judgements) >= self.spec.batch_size
                                or now - self.judgements_flushed_at >= FLUSH_S):
            batch, self.judgements = self.judgements, []
            try:
                self.store.insert_judgements(batch)
            except BaseException:
                self.judgements = batch + self.judgements
                raise
            self.judged += len(batch)
            self.judgements_stored = count_judgements(self.store, self.run_id, self.judge_name)
            self.judgements_flushed_at = time.monotonic()
            wrote = True
        return wrote

    def notes(self, failure: BaseException | None) -> str | None:
        parts = []
        if failure is not None:
            parts.append("interrupted by the user" if isinstance(failure, KeyboardInterrupt)
                         else f"stopped: {failure}")
        if self.failures:
            total = sum(self.failures.values())
            parts.append(f"{total} sample(s) could not be generated (run again with the same id to retry): "
                         + "; ".join(f"{n} x {message}" for message, n in self.failures.most_common(3)))
        return " | ".join(parts) or None


def run_eval(spec: RunSpec, progress: ProgressCallback | None = None, *, config: Config | None = None,
             store: Store | None = None, cancel: threading.Event | None = None) -> RunResult:
    """Run (or resume) an evaluation; see the module docstring.

    `progress` is called from this thread after every store write. `cancel`, set from
    another thread, stops the run after writing what is finished (status 'interrupted',
    returned rather than raised). Ctrl-C does the same and re-raises KeyboardInterrupt.
    Problems raise EvalError (or ServerError/StoreError) naming the reason; the run's
    status in the store says 'failed' or 'interrupted', and the same spec resumes it.
    """
    try:
        config = config or load_config(spec.config_path)
    except ConfigError as error:
        raise EvalError(str(error)) from None
    task = EvalTask.resolve(spec)
    spec, run_id = task.spec, task.run_id
    store = store or (Store(spec.store_path) if spec.store_path else Store.for_config(config))

    url = server_url(config)
    if not is_healthy(url, auth_headers(config)):
        raise EvalError(f"vLLM server at {url} is not reachable; start it with `python -m backend serve --detach` "
                        "(or set server.url)")
    models = _Models(config)
    try:
        for condition in task.conditions:
            models.prepare(condition)
        choice = choose_judge(config, spec.judge, models.runner.registry, models.runner.client)
        probe_judge(choice)
    except (ConditionError, ConfigError, JudgeError) as error:
        raise EvalError(str(error)) from None

    items = task.plan()
    judgements_total = task.judgements_total(items)
    record_run(store, config, task, choice, models.served, {"samples": len(items), "judgements": judgements_total})
    write_run_file(config, run_id, pid=os.getpid(), host=socket.gethostname(), started_at=time.time(),
                   store=str(store.path), status="running")

    planned = {item.key for item in items}
    done = store.sample_keys(run_id) & planned
    todo = [item for item in items if item.key not in done]
    judge = make_judge(choice, config, JudgeCache(config.cache / "judge_cache.sqlite"))
    run = _Invocation(spec, run_id, store, judge, choice.name, task.rubrics, len(items), judgements_total, progress)
    run.samples_stored = len(done)
    run.judgements_stored = count_judgements(store, run_id, choice.name)
    run.report(message=f"resuming: {len(done)} of {len(items)} samples stored" if done else "starting")

    outcome, failure = "interrupted", None
    run.loop = _JudgeLoop()
    try:
        run.submit_judging(unjudged(store, run_id, choice.name, task.rubrics))
        run.start_generation(models, todo)
        while run.busy:
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt
            try:
                run.handle(run.events.get(timeout=0.2))
            except queue.Empty:
                pass
            if run.flush(force=not run.open_generation and not run.open_judge_batches):
                run.report()
        outcome = "failed" if run.failures else "finished"
    except (KeyboardInterrupt, ServerError, JudgeUnavailableError) as error:
        failure = error  # resumable as it is: 'interrupted'
    except BaseException as error:
        failure, outcome = error, "failed"
    finally:
        run.stop.set()
        run.loop.close(judge)
        run.loop = None  # what finishes now is stored, not judged; the resume judges it
        try:
            run.drain()
            run.flush(force=True)
            close_run(store, run_id, outcome, run.notes(failure) or spec.notes)
        except (StoreError, KeyboardInterrupt):
            if failure is None:
                raise
        write_run_file(config, run_id, pid=None, ended_at=time.time(), status=outcome)
    run.report(outcome, run.notes(failure))
    _raise_for(failure, run_id, cancel)
    return RunResult(run_id, outcome, len(items), run.generated, run.samples_stored, judgements_total, run.judged,
                     run.judgements_stored, tuple(f"{n} x {m}" for m, n in run.failures.items()),
                     time.monotonic() - run.started, choice.name)


def _raise_for(failure: BaseException | None, run_id: str, cancel: threading.Event | None) -> None:
    """A cancel returns; Ctrl-C and the backend's own errors go on as they are; anything
    else becomes an EvalError naming the run."""
    if isinstance(failure, KeyboardInterrupt):
        if cancel is None or not cancel.is_set():
            raise failure
    elif isinstance(failure, (EvalError, ServerError, StoreError)):
        raise failure
    elif isinstance(failure, JudgeError):
        raise EvalError(f"run {run_id!r} stopped by the judge: {failure}") from None
    elif failure is not None:
        raise EvalError(f"run {run_id!r} stopped: {type(failure).__name__}: {failure}") from failure
