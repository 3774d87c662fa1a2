"""Evaluation runs: sample answers under every condition, judge them, store everything.

The shape is Inspect AI's: a task is a dataset (a QuestionSet), a solver (generation under
each model condition) and a scorer (the LLM judge, one rubric per metric), and every score
keeps its explanation (label, numeric mass, reason for a null, the raw top logprobs).

spec.py         what a run is: RunSpec (the CLI's flags), the EvalTask it resolves to, the plan
persistence.py  what a run writes to and reads back from the store and its run file
runner.py       run_eval: generating, judging, storing in batches, resuming, stopping
launch.py       launch_run: a run in its own process, for the dashboard
Which judge a name means is `backend.judge.choose_judge`.
"""
from backend.evaluation.launch import RunHandle, launch_run
from backend.evaluation.persistence import read_progress
from backend.evaluation.runner import run_eval
from backend.evaluation.spec import EvalError, EvalTask, Progress, ProgressCallback, RunResult, RunSpec

__all__ = ["EvalError", "EvalTask", "Progress", "ProgressCallback", "RunHandle", "RunResult", "RunSpec",
           "launch_run", "read_progress", "run_eval"]
