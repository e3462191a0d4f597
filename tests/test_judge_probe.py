"""benchmark/paper/judge_probe.py: an LLM judge of the validation probe as one more health check of a PPO run."""

import json
import os

import pytest

import judge
import judge_probe as J
import ppo_tldr as P
from test_judge import FAST, FakeServer, completion, summaries
from test_ppo_tldr import llama_chain, run_ppo, training_records  # noqa: F401 (llama_chain: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_the_signals_carry_the_last_judgement_and_measure_the_drop_from_the_best():
    assert J.judge_signals([], None) == {}  # nothing judged yet: no signal, so no check
    assert J.judge_signals([], 0.5) == {J.WIN_RATE: 0.5, J.DROP: 0.0}
    history = [{"update": 1, J.WIN_RATE: 0.5}, {"update": 2, J.WIN_RATE: 0.75}, {"update": 3}]
    assert J.judge_signals(history, 0.5) == {J.WIN_RATE: 0.5, J.DROP: 0.25}
    assert J.judge_signals(history, None) == {J.WIN_RATE: 0.75, J.DROP: 0.0}  # the last judged value stands
    assert J.judge_signals(history, 0.875)[J.DROP] == 0.0  # a new best


def test_the_judge_flags_are_taken_and_the_rest_goes_to_ppo_tldr():
    opts, rest = J.parse_args(["--judge_base_url", "http://x/v1", "--total_episodes", "8", "--judge_max_drop", "0.2",
                               "--sample_every", "1"])
    assert (opts.judge_base_url, opts.judge_max_drop) == ("http://x/v1", 0.2)
    assert rest == ["--total_episodes", "8", "--sample_every", "1"]
    with pytest.raises(SystemExit, match="validation probe"):
        J.main(["--judge_base_url", "http://x/v1", "--sft_model_path", "s", "--reward_model_path", "r",
                "--sample_every", "0"])


def test_the_answer_cap_reaches_the_client(monkeypatch):
    """--judge_max_tokens goes into every request (a local server may otherwise write 1024 tokens per answer)."""
    seen = {}
    monkeypatch.setattr(J, "install", lambda ppo, client, *rest: seen.setdefault("client", client))
    monkeypatch.setattr(P, "main", lambda args: None)
    base = ["--judge_base_url", "http://x/v1", "--sft_model_path", "s", "--reward_model_path", "r"]
    J.main(base + ["--judge_max_tokens", "64"])
    assert seen.pop("client").max_tokens == 64
    J.main(base)
    assert seen.pop("client").max_tokens is None  # the server's default


@pytest.fixture
def patched(monkeypatch):
    """install() replaces module attributes of ppo_tldr: register them so the test restores them. And every probe is
    judged afresh: the tiny policy's greedy responses barely change, so the judgement cache would answer them."""
    for name in ("write_probe_table", "health_update", "HealthMonitor", "HEALTH_CHECKS"):
        monkeypatch.setattr(P, name, getattr(P, name))
    in_memory = judge.JudgementCache
    monkeypatch.setattr(J.judge, "JudgementCache", lambda path: in_memory(None))


def judge_that_turns(references: set[str], turn_after: int):
    """A fake judge that prefers the policy's summary for its first `turn_after` requests, the reference after."""
    def behaviour(prompt, k, n):
        a, b = summaries(prompt)
        if (a.strip() in references) == (b.strip() in references):
            return 200, completion("I cannot tell which summary is the reference."), {}  # unusable: fails the test
        reference_letter, policy_letter = ("A", "B") if a.strip() in references else ("B", "A")
        return 200, completion(f"Preferred: {policy_letter if n <= turn_after else reference_letter}"), {}
    return behaviour


def probe_references(run_dir: str) -> set[str]:
    import pandas as pd

    return set(pd.read_csv(os.path.join(run_dir, "samples", "update_000001.csv"), keep_default_na=False)["reference"]
               .map(judge.clean_reference))


def test_a_falling_judge_win_rate_trips_the_monitor_and_rolls_back(llama_chain, sft_data, tmp_path,  # noqa: F811
                                                                   patched):
    # a first run without the judge gives the probe's reference summaries as decoded (the fake judge's key)
    plain = tmp_path / "plain"
    run_ppo(llama_chain, sft_data, str(plain), total_episodes=8, run_eval=False)
    references = probe_references(str(plain))
    assert len(references) == 4  # the probe's 4 prompts (SMALL), each with its own reference

    server = FakeServer(judge_that_turns(references, turn_after=4))  # update 1's probe: 4 prompts
    try:
        J.install(P, judge.Client(base_url=server.url, model="fake", **FAST), max_drop=0.15)
        out = tmp_path / "run"
        records = run_ppo(llama_chain, sft_data, str(out), total_episodes=48, save_every=1, keep_states=3,
                          max_eval_samples=3)
    finally:
        server.close()
    updates = training_records(records)
    assert [r[J.WIN_RATE] for r in updates] == [1.0, 0.0, 0.0]  # tripped at update 3 (patience 2)
    assert [r[J.DROP] for r in updates] == [0.0, 1.0, 1.0]
    incident = json.load(open(out / "health" / "incident_update_000003.json"))
    assert set(incident["tripped"]) == {"judge_drop"} and incident["tripped"]["judge_drop"]["threshold"] == 0.15
    # update 2's probe is sampled before its training, from the policy of update 1: the last healthy policy is the
    # one before it, the starting state
    assert incident["trouble_began_at_update"] == 2 and incident["rolled_back_to"].endswith("update_000000")
    assert json.load(open(out / "health" / "summary.json"))["kept_policy_update"] == 0
    judged = open(out / "samples" / "update_000002_judged.csv").read()
    assert "preferred" in judged and "reference" in judged
    assert server.requests == 12  # three probes of 4, each judged once


def test_a_steady_judge_logs_the_signals_and_trips_nothing(llama_chain, sft_data, tmp_path, patched):  # noqa: F811
    server = FakeServer(lambda prompt, k, n: (200, completion("Comparison: x.\nPreferred: A"), {}))
    try:
        J.install(P, judge.Client(base_url=server.url, model="fake", **FAST), max_drop=0.15)
        out = tmp_path / "run"
        records = run_ppo(llama_chain, sft_data, str(out), total_episodes=24, sample_every=2, run_eval=False)
    finally:
        server.close()
    updates = training_records(records)
    # judged at updates 1 and 3 (--sample_every 2); update 2 carries update 1's value
    assert server.requests == 8
    # the same probe rows get the same A/B order every time, so a judge that always says "A" gives one win rate
    assert len({r[J.WIN_RATE] for r in updates}) == 1 and all(r[J.DROP] == 0.0 for r in updates)
    summary = json.load(open(out / "health" / "summary.json"))
    assert summary["incidents"] == [] and not summary["stopped_by_health_monitor"]
