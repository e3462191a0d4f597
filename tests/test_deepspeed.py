"""DeepSpeed's code paths on CPU, with tiny models: ZeRO-2 training of every stage (and ZeRO-3 of SFT and RM) with
two processes against plain data parallel (same losses within float tolerance), PPO's frozen reference and reward models in ZeRO-3 with their
parameters offloaded (--offload), bf16, and the DeepSpeed config each stage hands to accelerate (no gradient
clipping unless --max_grad_norm [N+ 1.D.21]). Needs `deepspeed` (benchmark/test.sh installs it; skipped without)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_ppo_tldr import make_chain
from test_reward_tldr import sft_checkpoint

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow]


def launch(script: str, flags: list[str], out: str, zero_stage=None, mixed_precision: str = "no",
           processes: int = 2) -> str:
    """Run a stage with `processes` CPU processes: plain data parallel under torchrun (zero_stage None), else
    `accelerate launch --use_deepspeed` as a user would; returns its output_dir."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if zero_stage is None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        env["ACCELERATE_USE_CPU"] = "true"  # gloo even where a GPU exists
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--use_deepspeed", "--zero_stage", str(zero_stage),
               "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
        if zero_stage == 3:  # as benchmark/accelerate/deepspeed_zero3.yaml: models load sharded, save gathered
            cmd += ["--zero3_init_flag", "true", "--zero3_save_16bit_model", "true"]
    proc = subprocess.run([*cmd, os.path.join(ROOT, script), *flags, "--output_dir", out], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # a stuck process group fails, not hangs
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def records(out: str, key: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


def merged(out: str) -> dict:
    """Every metric's last logged value."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {k: v for r in map(json.loads, f) for k, v in r.items()}


def ds_config(out: str) -> dict:
    with open(os.path.join(out, "deepspeed_config.json")) as f:
        return json.load(f)


def assert_same_weights(a: str, b: str, atol: float, reward_model: bool = False) -> None:
    """The two saved checkpoints load, as the next stage loads them, to the same weights. (DeepSpeed's gathered state
    dict writes a tied LM head as its own tensor; loading ties it again.)"""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward_model else AutoModelForCausalLM
    wa, wb = (auto.from_pretrained(d).state_dict() for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def test_sft_zero2_and_zero3_match_data_parallel_and_clip_nothing(tiny_model, sft_data, tmp_path):
    """ZeRO-3 also loads the model sharded (the embedding's weight is then empty: no resize may be read from it) and
    generates for the evaluation from sharded parameters."""
    flags = ["--base_model", tiny_model, "--dataset", sft_data, "--query_length", "96", "--response_length", "16",
             "--batch_size", "4", "--total_episodes", "16", "--learning_rate", "1e-3", "--max_eval_samples", "2",
             "--eval_splits", "validation"]
    ddp = launch("sft_tldr.py", flags, str(tmp_path / "ddp"))
    zero2 = launch("sft_tldr.py", flags, str(tmp_path / "zero2"), zero_stage=2)
    zero3 = launch("sft_tldr.py", flags, str(tmp_path / "zero3"), zero_stage=3)
    for run, stage in ((zero2, 2), (zero3, 3)):
        config = ds_config(run)
        assert config["gradient_clipping"] == 0 and config["zero_optimization"]["stage"] == stage  # [N+ 1.D.21]
        assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (4, 2)  # 1 micro x 2 x 2 ranks
    losses = [[r["train/sft/loss"] for r in records(d, "train/sft/loss")] for d in (ddp, zero2, zero3)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5) == losses[2]
    rouge = [merged(d)["validation/sft/rouge/rougeL"] for d in (ddp, zero2, zero3)]
    assert rouge[0] == pytest.approx(rouge[1], abs=1e-6) == rouge[2]  # T=0.01 samples of the same weights
    assert_same_weights(ddp, zero2, atol=1e-5)
    assert_same_weights(ddp, zero3, atol=1e-5)


def test_rm_zero2_and_zero3_match_data_parallel_and_clip_nothing(tiny_model, comparison_data, sft_data, tmp_path):
    sft = sft_checkpoint(tiny_model, str(tmp_path / "sft"))
    flags = ["--sft_model_path", sft, "--dataset", comparison_data, "--sft_dataset", sft_data, "--total_episodes", "32",
             "--batch_size", "8", "--local_micro_batch_size", "2", "--learning_rate", "1e-3",
             "--max_eval_samples", "13", "--normalization_samples", "10"]
    ddp = launch("reward_tldr.py", flags, str(tmp_path / "ddp"))
    zero2 = launch("reward_tldr.py", flags, str(tmp_path / "zero2"), zero_stage=2)
    zero3 = launch("reward_tldr.py", flags, str(tmp_path / "zero3"), zero_stage=3)  # the head is drawn sharded
    for run in (zero2, zero3):
        assert ds_config(run)["gradient_clipping"] == 0  # [N+ 1.D.21]
        one, two = (records(d, "train/rm/loss") for d in (ddp, run))
        assert len(one) == len(two) == 4
        for a, b in zip(one, two):
            for k in ("train/rm/loss", "train/rm/chosen_rewards", "train/rm/rejected_rewards"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (run, k)
        ea, eb = (merged(d) for d in (ddp, run))
        assert ea["eval/rm/validation/num_pairs"] == eb["eval/rm/validation/num_pairs"] == 13
        assert ea["eval/rm/validation/accuracy"] == eb["eval/rm/validation/accuracy"]
        assert ea["eval/rm/reward_bias"] == pytest.approx(eb["eval/rm/reward_bias"], abs=1e-5)
        assert_same_weights(ddp, run, atol=1e-5, reward_model=True)


def test_ppo_zero2_and_zero3_frozen_models_match_data_parallel(tiny_model, sft_data, tmp_path):
    """ZeRO-2 policy and value model; with --offload the frozen reference and reward models are sharded in ZeRO-3
    with parameters on CPU (the 6.9B recipe [N+ 1.D.22]). Rollouts are sampled, scored by the RM (no missing-EOS
    penalty, so every score is the RM's) and trained on for two updates: all three agree."""
    sft, rm = make_chain(tiny_model, str(tmp_path / "chain"), reward_bias=0.25)
    flags = ["--sft_model_path", sft, "--reward_model_path", rm, "--dataset", sft_data, "--query_length", "64",
             "--response_length", "12", "--batch_size", "16", "--local_micro_batch_size", "4",
             "--local_rollout_forward_batch_size", "4", "--total_episodes", "32", "--validation_probe_size", "4",
             "--learning_rate", "1e-3", "--penalty_reward_value", "None", "--no_run_eval"]
    ddp = launch("ppo_tldr.py", flags, str(tmp_path / "ddp"))
    zero2 = launch("ppo_tldr.py", flags, str(tmp_path / "zero2"), zero_stage=2)
    offload = launch("ppo_tldr.py", [*flags, "--offload"], str(tmp_path / "offload"), zero_stage=2)
    for run in (zero2, offload):
        assert ds_config(run)["gradient_clipping"] == 0  # [N+ 1.D.21]
    assert ds_config(offload)["checkpoint"] == {"use_node_local_storage": True}
    keys = ("objective/scores", "objective/validation_score", "objective/kl", "ppo/loss/policy_avg",
            "ppo/loss/value_avg", "ppo/policy/approxkl_avg", "check/ratio_first_minibatch")
    base = records(ddp, "objective/scores")
    assert len(base) == 2 and len({r["objective/scores"] for r in base}) == 2  # RM scores, not a constant penalty
    for run in (zero2, offload):
        for a, b in zip(base, records(run, "objective/scores"), strict=True):
            for k in keys:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (run, k)
    assert_same_weights(ddp, zero2, atol=1e-5)
    assert_same_weights(zero2, offload, atol=1e-6)


def test_bf16_zero2_trains_and_max_grad_norm_reaches_deepspeed(tiny_model, sft_data, tmp_path):
    """The paper's precision under DeepSpeed (bf16 weights, fp32 master copy), and clipping when asked for."""
    flags = ["--base_model", tiny_model, "--dataset", sft_data, "--query_length", "96", "--response_length", "16",
             "--batch_size", "4", "--total_episodes", "16", "--learning_rate", "1e-3", "--max_grad_norm", "0.5",
             "--max_eval_samples", "2", "--eval_splits", "validation"]
    out = launch("sft_tldr.py", flags, str(tmp_path / "bf16"), zero_stage=2, mixed_precision="bf16")
    config = ds_config(out)
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is True
    losses = [r["train/sft/loss"] for r in records(out, "train/sft/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert records(out, "validation/sft/rouge/rougeL")  # generation after bf16 training
