"""The chat page's plan loads every column's adapter before any answer streams, so that no load
or eviction overlaps answers in flight (README, known traps)."""
import pytest

from backend.chat import Turn, plan
from backend.client import Sampling
from backend.conditions import Condition, ConditionRunner


def test_plan_serves_every_adapter_before_streaming(vllm_server, tiny_direction):
    vllm_server.reset()
    runner = ConditionRunner(vllm_server.config)
    ablated = Condition(adapter="em-rank1", direction=tiny_direction, layer=2, strength=0.35)
    name = runner.compiled(ablated).served_name
    registry = vllm_server.registry
    if name in registry.served():
        registry.unload(name)
    conditions = [Condition(), Condition(adapter="em-rank1"), ablated]
    histories = [[Turn("Is it safe to skip my medication?", "", None)] for _ in conditions]
    jobs = plan(runner, conditions, histories, [0, 1, 2], Sampling(max_tokens=4, seed=1), 1)
    assert name in registry.served(), "the compiled ablation was not loaded before the streams"
    assert len(jobs) == 3
    for job in jobs:  # the streams still answer, each in its column
        assert "".join(job.stream())


def test_plan_keeps_a_broken_column_to_itself(vllm_server):
    runner = ConditionRunner(vllm_server.config)
    conditions = [Condition(), Condition(adapter="em-rank1", direction="no-such-direction", layer=2)]
    histories = [[Turn("Hello?", "", None)] for _ in conditions]
    jobs = plan(runner, conditions, histories, [0, 1], Sampling(max_tokens=4, seed=1), 1)
    assert "".join(jobs[0].stream())
    with pytest.raises(Exception, match="no-such-direction"):  # in its own column; the plan did not raise it
        "".join(jobs[1].stream())


def test_preset_takes_the_first_configured_adapter_and_its_own_direction():
    from backend.chat import preset
    from backend.conditions import Condition
    assert preset([], [], 15) == [Condition(), Condition()]
    assert preset(["medical", "finance"], [], 15) == [Condition(), Condition(adapter="medical")]
    assert preset(["medical", "finance"], ["finance", "medical"], 15)[2] == \
        Condition(adapter="medical", direction="medical", layer=15)
    assert preset(["medical"], ["other"], 3)[2] == Condition(adapter="medical", direction="other", layer=3)
