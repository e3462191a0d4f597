"""benchmark/perf/bench_ppo.py and benchmark/perf/ppo_replay.py: the FLOP count, the steady-state summary, an end-to-end
run on a tiny model, and the rollout replay used to compare implementations on the same data."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark", "perf"))

import bench_ppo as B  # noqa: E402
import ppo_replay  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_training_flops_hand_worked():
    shape = {"n_body": 10, "n_body_value": 8, "layers": 2, "hidden": 4, "vocab": 16}
    record = {"perf/training_tokens": 100, "perf/training_attention_pairs": 1000}
    policy = 6 * 10 * 100 + 6 * 2 * 4 * 1000 + 6 * 4 * 16 * 5 * 3 * 2  # body, causal attention, LM head on R tokens
    value = 6 * 8 * 100 + 6 * 2 * 4 * 1000
    assert B.training_flops(record, shape, batch=2, epochs=3, response_length=5) == policy + value


@pytest.mark.parametrize("tied", [True, False])
def test_body_parameters_leave_out_embeddings_and_head(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, tie_word_embeddings=tied))
    total = sum(p.numel() for p in model.parameters())
    assert B.body_parameters(model) == total - 100 * 16 * (1 if tied else 2)


def test_summary_leaves_out_the_warm_up_update():
    def record(update_s, gen_s):
        return {"time/update": update_s, "time/generation": gen_s, "time/scoring": 1.0, "time/training": 2.0,
                "perf/generated_tokens": 80, "perf/training_tokens": 10, "perf/training_attention_pairs": 100,
                "time/peak_memory_gib": 1.5}

    args = B.parse_args(["--batch", "8", "--epochs", "1", "--response_length", "10"])
    shape = {"n_body": 1000, "n_body_value": 1000, "layers": 1, "hidden": 1, "vocab": 1}
    s = B.summarise([record(100.0, 50.0), record(4.0, 1.0), record(4.0, 1.0)], shape, args, peak_gflops=1.0)
    assert s["updates_timed"] == 2 and s["episodes_per_s"] == 2.0 and s["generated_tokens_per_s"] == 80.0
    flops = B.training_flops(record(0, 0), shape, 8, 1, 10)
    assert s["training_gflops_per_s"] == pytest.approx(flops / 2.0 / 1e9)
    assert B.median_over_runs([{"x": 1.0}, {"x": 5.0}, {"x": 2.0}]) == {"x": 2.0}
    floor = B.memory_floor_gib(2**30 // 4, 2**30 // 4)  # 2^28 parameters each: 1 GiB of fp32 weights each
    assert floor == {"trained_gib": 8.0, "frozen_gib": 2.0, "total_gib": 10.0}


def test_benchmark_runs_end_to_end_on_a_tiny_model(tiny_model, sft_data, tmp_path):
    out = str(tmp_path / "bench")
    B.main(["--model", "smollm2", "--base_model", tiny_model, "--data_dir", sft_data, "--out_dir", out,
            "--batch", "4", "--micro_batch", "2", "--rollout_batch", "4", "--response_length", "8",
            "--query_tokens", "40", "--updates", "2", "--runs", "1"])
    summary = json.load(open(os.path.join(out, "summary.json")))
    row = summary["median"]["ppo_tldr fp32"]
    assert row["updates_timed"] == 1 and row["episodes_per_s"] > 0 and row["generated_tokens_per_s"] > 0
    assert row["generation_s"] + row["scoring_s"] + row["training_s"] <= row["update_s"]
    # useful FLOPs can only be a fraction of what the same device's best matmul reaches
    assert 0 < row["training_fraction_of_matmul_peak"] < 1
    records = [json.loads(x) for x in open(os.path.join(out, "ours_fp32_run0", "metrics.jsonl")) if "time/update" in x]
    assert [r["perf/generated_tokens"] for r in records] == [4 * 8, 4 * 8]
    prompts = [json.loads(x) for x in open(os.path.join(out, "data", "train.jsonl"))]
    assert len(prompts) == 8  # batch x updates rows, all near the asked query length


def test_replayed_rollouts_replace_sampling(tiny_model, sft_data, tmp_path, monkeypatch):
    """ppo_tldr.py under the replay shim trains on the saved responses: here each one is EOS then filler, so
    every rollout ends at its first token. A query without a saved response is an error naming it."""
    from transformers import AutoTokenizer

    args = B.parse_args(["--model", "smollm2", "--base_model", tiny_model, "--data_dir", sft_data, "--batch", "4",
                         "--response_length", "6", "--query_tokens", "40"])
    out = str(tmp_path / "replay")
    models = B.prepare_models(args, out)
    prompts = B.prepare_prompts(args, out, models["sft"], 4)
    tok = AutoTokenizer.from_pretrained(models["sft"])
    replay = str(tmp_path / "replay.json")
    filler = tok.encode(" the", add_special_tokens=False)[0]
    with open(replay, "w") as f:
        json.dump([{"query": q, "response": [tok.eos_token_id] + [filler] * 5} for q in prompts], f)
    monkeypatch.setenv(ppo_replay.ENV, replay)
    run_dir = str(tmp_path / "run")
    import ppo_tldr

    original = ppo_tldr.generate_with_logprobs
    try:
        ppo_replay.run_ours(["--sft_model_path", models["sft"], "--reward_model_path", models["rm"], "--dataset",
                             os.path.join(out, "data"), "--output_dir", run_dir, "--response_length", "6",
                             "--batch_size", "4", "--local_micro_batch_size", "4", "--total_episodes", "4",
                             "--validation_probe_size", "0", "--no-run-eval", "--sample_every", "0"])
    finally:
        ppo_tldr.generate_with_logprobs = original
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    record = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if "objective/scores" in x][0]
    assert record["objective/eos_fraction"] == 1.0 and record["objective/response_length"] == 1.0
    assert abs(record["check/ratio_first_minibatch"] - 1) < 1e-5  # the replayed log-probs are the policy's own
    with pytest.raises(KeyError, match="query 0 of the batch"):
        ppo_replay.lookup_responses({}, torch.tensor([[5, 6, 7]]), pad_token_id=0)
