"""Tests of ppo_tldr.py: the helper math on hand-worked cases, padding and EOS pitfalls on tiny models, and short
PPO runs on CPU (on-policy ratio, outputs, exact resume, two processes, a score that rises).

Every run uses the tiny models of conftest.py, turned into an SFT -> RM chain the way the earlier stages save it:
the tokenizer gains `[PAD]`, the RM is `AutoModelForSequenceClassification` (num_labels=1) with `config.reward_bias`.
"""

import ast
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys

import pytest
import torch

import ppo_tldr as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = 0, 9  # ids used by the hand-worked cases

# Functions (and the query format) that ppo_tldr.py copies from sft_tldr.py; the copies must stay byte-identical.
SHARED = ["QUERY_FORMAT", "format_query", "truncated_query_tokens", "left_pad", "right_pad", "response_tokens",
          "load_splits", "first_true_indices", "truncate_response", "position_ids_from_mask", "trim_padding_columns",
          "disable_dropout", "forward", "sampling_config", "generate", "Logger", "write_run_info", "seed_everything",
          "peak_memory_gib"]


# ---------------------------------------------------------------------------------------------------------
# Fixtures: SFT and RM folders built from the conftest tiny models
# ---------------------------------------------------------------------------------------------------------


def make_chain(base: str, out: str, reward_bias: float = 0.0, zero_score_head: bool = False, eos_bonus: float = 0.0):
    """SFT folder (pad token added, as sft_tldr.py saves it) and RM folder initialised from it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    model = AutoModelForCausalLM.from_pretrained(base)
    model.config.pad_token_id = tok.pad_token_id
    if eos_bonus:
        # Every token shares a large embedding component and EOS a slightly larger one: after the final norm this
        # is a near-constant bonus of ~5.6 * eos_bonus nats on the EOS logit, so a random policy stops sometimes.
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[:, 0] = 1.0
            emb[tok.eos_token_id, 0] = 1.0 + eos_bonus
    sft, rm_dir = os.path.join(out, "sft"), os.path.join(out, "rm")
    model.save_pretrained(sft)
    tok.save_pretrained(sft)
    rm = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    if zero_score_head:
        torch.nn.init.zeros_(rm.score.weight)
    rm.config.reward_bias = reward_bias
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    return sft, rm_dir


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def llama_chain(tiny_model, tmp_path_factory):
    return make_chain(tiny_model, str(tmp_path_factory.mktemp("llama_chain")), reward_bias=0.25)


@pytest.fixture(scope="module")
def gpt2_chain(tiny_gpt2, tmp_path_factory):
    return make_chain(tiny_gpt2, str(tmp_path_factory.mktemp("gpt2_chain")), reward_bias=-0.5)


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


SMALL = dict(query_length=64, response_length=12, batch_size=8, local_micro_batch_size=4,
             local_rollout_forward_batch_size=4, total_episodes=16, validation_probe_size=4, sample_every=1,
             max_eval_samples=4, local_eval_batch_size=3)


def run_ppo(chain, data, output_dir, **overrides) -> list[dict]:
    """Run main() in this process with tiny settings; returns the metrics.jsonl records."""
    kwargs = {**SMALL, **overrides}
    args = P.Args(sft_model_path=chain[0], reward_model_path=chain[1], dataset=data, output_dir=output_dir, **kwargs)
    reset_accelerate()
    try:
        P.main(args)
    finally:
        reset_accelerate()
    return read_metrics(output_dir)


def script_flags(chain, data, output_dir, **overrides) -> list[str]:
    """The command-line flags of `run_ppo`'s settings, for running ppo_tldr.py as a subprocess."""
    flags = ["--sft_model_path", chain[0], "--reward_model_path", chain[1], "--dataset", data, "--output_dir",
             output_dir]
    for key, value in {**SMALL, **overrides}.items():
        flags += [f"--{key}", str(value)] if not isinstance(value, bool) else [f"--{'' if value else 'no_'}{key}"]
    return flags


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def split_ids(data, split):
    with open(os.path.join(data, f"{split}.jsonl")) as f:
        return [json.loads(line)["id"] for line in f]


def training_records(records):
    return [r for r in records if "objective/scores" in r]


# ---------------------------------------------------------------------------------------------------------
# The file itself
# ---------------------------------------------------------------------------------------------------------


def _sources(path):
    src = open(path).read()
    lines = src.splitlines(keepends=True)
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = "".join(lines[start - 1 : node.end_lineno])
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = "".join(lines[node.lineno - 1 : node.end_lineno])
    return out


def test_shared_helpers_are_verbatim_copies_of_sft():
    ppo, sft = _sources(os.path.join(ROOT, "ppo_tldr.py")), _sources(os.path.join(ROOT, "sft_tldr.py"))
    for name in SHARED:
        assert name in ppo, f"{name} missing from ppo_tldr.py"
        assert ppo[name] == sft[name], f"{name} differs from its copy in sft_tldr.py"


def test_help_renders_and_every_flag_is_read(capsys):
    import tyro

    with pytest.raises(SystemExit) as exit_info:
        tyro.cli(P.Args, args=["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    code = open(os.path.join(ROOT, "ppo_tldr.py")).read()
    for field in dataclasses.fields(P.Args):
        assert field.name.replace("_", "-") in help_text or field.name in help_text, field.name
        assert re.search(rf"args\.{field.name}\b", code), f"--{field.name} is never read"


def test_derive_checks_the_batch_arithmetic():
    args = P.Args(sft_model_path="a", reward_model_path="b", batch_size=8, local_micro_batch_size=3)
    with pytest.raises(ValueError, match="local_micro_batch_size"):
        P.derive(args, 1)
    args = P.Args(sft_model_path="a", reward_model_path="b", batch_size=8, local_micro_batch_size=4,
                  missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="missing-EOS"):
        P.derive(args, 1)
    d = P.derive(P.Args(sft_model_path="a", reward_model_path="b"), 8)  # the paper's 1B setting on 8 GPUs
    sizes = (d.local_batch_size, d.local_mini_batch_size, d.gradient_accumulation_steps, d.num_updates)
    assert sizes == (64, 64, 4, 1953)


# ---------------------------------------------------------------------------------------------------------
# Helper math on hand-worked cases
# ---------------------------------------------------------------------------------------------------------

# Four responses of R=5 tokens: EOS in the middle, EOS last, no EOS, EOS first.
RAW = torch.tensor([[5, 6, EOS, 7, 8],
                    [5, 6, 7, 8, EOS],
                    [5, 6, 7, 8, 4],
                    [EOS, 5, 6, 7, 8]])


def test_first_true_indices_and_truncate_response():
    assert P.first_true_indices(torch.tensor([[False, True, True], [False, False, False]])).tolist() == [1, 3]
    assert P.truncate_response(RAW, EOS, PAD).tolist() == [[5, 6, EOS, PAD, PAD],
                                                           [5, 6, 7, 8, EOS],
                                                           [5, 6, 7, 8, 4],
                                                           [EOS, PAD, PAD, PAD, PAD]]


def test_masks_and_score_placement_hand_worked():
    post = P.truncate_response(RAW, EOS, PAD)
    seq, padding_mask, padding_mask_p1 = P.response_masks(post, PAD)
    assert seq.tolist() == [2, 4, 4, 0]  # EOS index, or the last token when there is none
    F, T = False, True
    assert padding_mask.tolist() == [[F, F, F, T, T], [F] * 5, [F] * 5, [F, T, T, T, T]]  # policy: up to EOS
    assert padding_mask_p1.tolist() == [[F, F, F, F, T], [F] * 5, [F] * 5, [F, F, T, T, T]]  # value: up to EOS+1
    contain_eos = torch.any(post == EOS, dim=-1)
    assert contain_eos.tolist() == [True, True, False, True]
    scores = P.apply_missing_eos_penalty(torch.tensor([2.0, 3.0, 4.0, 5.0]), contain_eos, -1.0, None)
    assert scores.tolist() == [2.0, 3.0, -1.0, 5.0]

    logprobs = torch.full((4, 5), -1.0).masked_fill(padding_mask, P.INVALID_LOGPROB)
    ref_logprobs = torch.full((4, 5), -2.0).masked_fill(padding_mask, P.INVALID_LOGPROB)
    kl = P.kl_penalty(logprobs, ref_logprobs, "k1")
    assert kl.tolist() == (~padding_mask).float().tolist()  # 1 on real tokens, exactly 0 on padding
    rewards, non_score = P.compute_rewards(kl, scores, seq, kl_coef=0.1, score_at="eos_p1")
    assert torch.equal(non_score, -0.1 * kl)
    expected = -0.1 * kl
    expected[0, 3] += 2.0   # after EOS
    expected[1, 4] += 3.0   # EOS is the last token: at it
    expected[2, 4] += -1.0  # no EOS: the penalty at the last token
    expected[3, 1] += 5.0   # EOS first: after it
    assert torch.allclose(rewards, expected)
    rewards_eos, _ = P.compute_rewards(kl, scores, seq, kl_coef=0.1, score_at="eos")
    assert [int(rewards_eos[i].argmax()) for i in (0, 1, 3)] == [2, 4, 0]


class PositionReward(torch.nn.Module):
    """A fake reward model whose output at every position is that position's index."""

    def forward(self, input_ids, attention_mask, position_ids):
        return torch.arange(input_ids.shape[1], dtype=torch.float).expand(input_ids.shape[0], -1)


def test_get_score_reads_the_eos_token_of_left_padded_queries():
    queries = torch.tensor([[PAD, 3, 3], [3, 3, 3]])
    post = P.truncate_response(RAW[:2], EOS, PAD)
    score = P.get_score(PositionReward(), torch.cat((queries, post), 1), PAD, context_length=3)
    assert score.tolist() == [3 + 2, 3 + 4]  # context + EOS index


def test_missing_eos_penalty_variants():
    scores, has_eos = torch.tensor([0.5, 0.7]), torch.tensor([True, False])
    assert P.apply_missing_eos_penalty(scores, has_eos, -1.0, None).tolist() == [0.5, -1.0]  # N+: replace
    assert torch.allclose(P.apply_missing_eos_penalty(scores, has_eos, None, 1.0), torch.tensor([0.5, -0.3]))  # TRL
    assert P.apply_missing_eos_penalty(scores, has_eos, None, None).tolist() == scores.tolist()


def test_masked_statistics():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = torch.tensor([True, True, True, False])
    assert P.masked_mean(x, m).item() == 2.0
    assert math.isclose(P.masked_var(x, m, unbiased=False).item(), 2 / 3, rel_tol=1e-6)
    assert math.isclose(P.masked_var(x, m).item(), 1.0, rel_tol=1e-6)
    assert P.masked_mean(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0  # empty: 0, not NaN
    with pytest.raises(ValueError, match="empty"):
        P.masked_var(x, torch.zeros(4, dtype=torch.bool))
    one = torch.tensor([True, False, False, False])
    with pytest.raises(ValueError, match="one value"):
        P.masked_var(x, one)
    assert P.masked_var(x, one, unbiased=False).item() == 0.0

    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 7, generator=g) * 3 + 5
    mask = torch.rand(6, 7, generator=g) > 0.3
    w = P.masked_whiten(values, mask)
    assert abs(w[mask].mean().item()) < 1e-5
    assert abs(w[mask].var(unbiased=False).item() - 1) < 1e-4  # biased variance, as the reference
    kept = P.masked_whiten(values, mask, shift_mean=False)
    assert abs(kept[mask].mean().item() - values[mask].mean().item()) < 1e-4


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])  # the 9s are padding and must not count
    assert math.isclose(P.explained_variance(returns.clone(), returns, mask), 1.0)  # exact values
    assert abs(P.explained_variance(torch.full_like(returns, 2.5), returns, mask)) < 1e-6  # the mean: nothing
    assert math.isclose(P.explained_variance(-returns, returns, mask), -3.0, rel_tol=1e-6)  # Var(2r) = 4 Var(r)
    # 1 - Var(r - v) / Var(r) by hand: r = 1,2,3,4 (var 1.25), v = 1,2,3,3 -> r - v = 0,0,0,1 (var 0.1875)
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 3.0, 0.0]])
    assert math.isclose(P.explained_variance(values, returns, mask), 1 - 0.1875 / 1.25, rel_tol=1e-6)
    assert P.explained_variance(values, torch.ones_like(returns), mask) == 0.0  # constant returns


def test_learning_rates_anneal_and_hold_the_policy_still_in_a_critic_warm_up():
    # the paper: linear annealing over all updates, the same LR for both networks [N+ 1.D.2]
    assert [P.learning_rates(1.0, u, 4, True) for u in (1, 2, 4)] == [(1.0, 1.0), (0.75, 0.75), (0.25, 0.25)]
    assert P.learning_rates(1.0, 3, 4, False) == (1.0, 1.0)
    # two warm-up updates of six: the value model alone trains at the full LR, then the policy's schedule starts
    lrs = [P.learning_rates(1.0, u, 6, True, critic_warmup_updates=2) for u in range(1, 7)]
    assert lrs == [(0.0, 1.0), (0.0, 1.0), (1.0, 1.0), (0.75, 0.75), (0.5, 0.5), (0.25, 0.25)]
    # the value model's own LR, annealed alike
    lrs = [P.learning_rates(1.0, u, 4, True, critic_warmup_updates=2, value_learning_rate=8.0) for u in range(1, 5)]
    assert lrs == [(0.0, 8.0), (0.0, 8.0), (1.0, 8.0), (0.5, 4.0)]
    args = P.Args(sft_model_path="s", reward_model_path="r", batch_size=8, local_micro_batch_size=8,
                  validation_probe_size=8, total_episodes=16, critic_warmup_updates=2)
    with pytest.raises(ValueError, match="critic_warmup_updates 2 .* 2 updates"):
        P.derive(args, 1)


def test_a_critic_warm_up_trains_the_value_model_and_leaves_the_policy_exactly_as_it_was(llama_chain, sft_data,
                                                                                        tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    records = run_ppo(llama_chain, sft_data, out, save_every=1, run_eval=False, sample_every=0, learning_rate=1e-3,
                      total_episodes=24, anneal_lr=False, critic_warmup_updates=1)
    first, second = (load_file(os.path.join(out, "checkpoints", f"update_{u:06d}", "model.safetensors"))
                     for u in (1, 2))
    start = load_file(os.path.join(llama_chain[0], "model.safetensors"))
    policy = {k.removeprefix("policy."): v for k, v in first.items() if k.startswith("policy.")}
    assert set(policy) >= set(start)  # the SFT weights, bit for bit, after the warm-up update
    assert all(torch.equal(policy[k], start[k]) for k in start)
    assert any(not torch.equal(policy[k], second["policy." + k]) for k in start)  # the policy trains after it
    critic = [k for k in first if k.startswith("critic.")]
    assert any(not torch.equal(first[k], second[k]) for k in critic)
    start_rm = load_file(os.path.join(llama_chain[1], "model.safetensors"))
    assert any(not torch.equal(first["critic.model." + k], v)
               for k, v in start_rm.items() if "critic.model." + k in first)
    lrs = [(r["ppo/lr"], r["ppo/lr_value"]) for r in training_records(records)]
    assert lrs == [(0.0, 1e-3), (1e-3, 1e-3), (1e-3, 1e-3)]
    assert training_records(records)[0]["ppo/val/clipfrac_avg"] == 0  # the warm-up's value loss is unclipped


def test_gae_matches_a_slow_reference_loop():
    adv, ret = P.compute_gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0]]))

    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    gamma, lam = 0.9, 0.8
    adv, ret = P.compute_gae(rewards, values, gamma, lam)
    for b in range(3):
        for t in range(9):  # A_t = sum_l (gamma lam)^l delta_{t+l}
            slow = 0.0
            for k in range(t, 9):
                next_value = values[b, k + 1].item() if k + 1 < 9 else 0.0
                delta = rewards[b, k].item() + gamma * next_value - values[b, k].item()
                slow += (gamma * lam) ** (k - t) * delta
            assert math.isclose(adv[b, t].item(), slow, rel_tol=1e-5, abs_tol=1e-5)
    assert torch.allclose(ret, adv + values)


def test_kl_estimators_and_zero_kl_on_padding():
    lp = torch.tensor([-1.0, -2.0, P.INVALID_LOGPROB])
    ref = torch.tensor([-1.5, -1.0, P.INVALID_LOGPROB])
    assert torch.allclose(P.kl_penalty(lp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    k3 = P.kl_penalty(lp, ref, "k3")
    assert torch.allclose(k3, torch.tensor([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0]))
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        P.kl_penalty(lp, ref, "k2")


def test_policy_and_value_clipping_hand_worked():
    mask = torch.tensor([[True, True, False]])
    new = torch.log(torch.tensor([[1.5, 1.5, 7.0]]))
    old = torch.zeros(1, 3)
    loss, ratio, clipped = P.policy_loss(new, old, torch.tensor([[1.0, -1.0, 5.0]]), mask, cliprange=0.2)
    # A=+1, ratio 1.5: max(-1.5, -1.2) = -1.2 (clipped); A=-1: max(1.5, 1.2) = 1.5 (not clipped); the pad is ignored
    assert math.isclose(loss.item(), (-1.2 + 1.5) / 2, rel_tol=1e-6)
    assert clipped[0, :2].tolist() == [True, False]
    assert torch.allclose(ratio[0, :2], torch.tensor([1.5, 1.5]))

    vpred = torch.tensor([[1.0, 0.0, 1.0]])
    old_v = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.0, 1.0, 1.0]])
    loss, clipped = P.value_loss(vpred, old_v, returns, torch.ones(1, 3, dtype=torch.bool), cliprange_value=0.2)
    # unclipped error larger in the first two; clipping to 0.7 costs 0.09 in the third
    assert math.isclose(loss.item(), 0.5 * (1.0 + 1.0 + 0.09) / 3, rel_tol=1e-5)
    assert clipped.tolist() == [[False, False, True]]
    # a critic warm-up's loss (no clipping): the third position costs its own error, 0
    loss, clipped = P.value_loss(vpred, old_v, returns, torch.ones(1, 3, dtype=torch.bool), cliprange_value=None)
    assert math.isclose(loss.item(), 0.5 * (1.0 + 1.0 + 0.0) / 3, rel_tol=1e-5)
    assert not clipped.any()


# ---------------------------------------------------------------------------------------------------------
# Padding and EOS pitfalls on tiny models
# ---------------------------------------------------------------------------------------------------------


def _queries(tok, n=4):
    from conftest import sft_rows

    return [P.truncated_query_tokens(tok, row, 200) for row in sft_rows(n, 7)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_gives_identical_logprobs(arch, llama_chain, gpt2_chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = (llama_chain if arch == "llama" else gpt2_chain)[0]
    tok = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    pad, T = tok.pad_token_id, 0.7
    qs = _queries(tok)
    width = max(map(len, qs)) + 3  # every row is left-padded, even the longest
    queries = torch.tensor([P.left_pad(q, width, pad) for q in qs])
    torch.manual_seed(0)
    model.generation_config = P.sampling_config(10, T)
    responses, gen_logprobs = P.generate_with_logprobs(model, queries, pad, model.generation_config, 10)
    with torch.no_grad():
        logits = P.forward(model, torch.cat((queries, responses), 1), pad).logits[:, width - 1 : -1]
        padded = P.response_logprobs(logits, responses, T)
        for i, q in enumerate(qs):
            alone = torch.cat((torch.tensor([q]), responses[i : i + 1]), 1)
            logits = P.forward(model, alone, pad).logits[:, len(q) - 1 : -1]
            single = P.response_logprobs(logits, responses[i : i + 1], T)
            assert torch.allclose(single, padded[i : i + 1], atol=1e-5), f"row {i}: left padding changed log-probs"
        # the generation's own log-probs (the rollout's old log-probs) agree with the training forward
        real = P.first_true_indices(responses == pad).unsqueeze(1) > torch.arange(10)
        assert (torch.where(real, (gen_logprobs - padded).abs(), 0.0) < 1e-4).all()
        if arch == "gpt2":  # absolute positions: the reference's forward (no position_ids) is not padding-invariant
            mask = torch.cat((queries, responses), 1) != pad
            no_pos = model(input_ids=torch.cat((queries, responses), 1), attention_mask=mask).logits[:, width - 1 : -1]
            assert (P.response_logprobs(no_pos, responses, T) - padded).abs().max() > 1e-3


def test_eos_can_be_sampled_by_a_rollout(llama_chain):
    """transformers#42762: min_new_tokens plus an EOS id restored from the model's config bans EOS; ours must not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(llama_chain[0])
    model = AutoModelForCausalLM.from_pretrained(llama_chain[0]).eval()
    assert model.generation_config.eos_token_id == tok.eos_token_id  # the checkpoint's config names EOS
    boost = torch.zeros(model.config.vocab_size)
    boost[tok.eos_token_id] = 8.0  # make EOS the likeliest token, ~85% per step
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + boost)
    pad = tok.pad_token_id
    qs = _queries(tok, 6)
    queries = torch.tensor([P.left_pad(q, max(map(len, qs)), pad) for q in qs])
    args = P.Args(sft_model_path="", reward_model_path="", response_length=12)

    torch.manual_seed(0)
    reference_style = GenerationConfig(max_new_tokens=12, min_new_tokens=12, temperature=0.7 + 1e-7, top_k=0,
                                       top_p=1.0, do_sample=True)
    banned, _ = P.generate_with_logprobs(model, queries, pad, reference_style, 12)
    assert not (banned == tok.eos_token_id).any()  # the pitfall: EOS never appears

    model.generation_config = P.sampling_config(args.response_length, args.temperature)  # as main() does
    responses, logprobs = P.generate_with_logprobs(model, queries, pad, P.rollout_generation_config(args, tok, 0.7), 12)
    assert responses.shape == (6, 12)  # always exactly response_length tokens
    assert (responses == tok.eos_token_id).any(dim=1).all()
    assert torch.isfinite(logprobs).all()


def test_tokenizer_chain_is_checked(llama_chain, tmp_path):
    from transformers import AutoTokenizer

    tok = P.load_chain_tokenizer(*llama_chain)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    no_pad = AutoTokenizer.from_pretrained(llama_chain[0])
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no_pad")
    with pytest.raises(ValueError, match="distinct pad"):
        P.load_chain_tokenizer(llama_chain[0], str(tmp_path / "no_pad"))
    other = AutoTokenizer.from_pretrained(llama_chain[0])
    other.add_special_tokens({"pad_token": "[PAD2]"})
    other.save_pretrained(tmp_path / "other_pad")
    with pytest.raises(ValueError, match="differ"):
        P.load_chain_tokenizer(llama_chain[0], str(tmp_path / "other_pad"))


# ---------------------------------------------------------------------------------------------------------
# PPO runs on CPU
# ---------------------------------------------------------------------------------------------------------

NPLUS_METRICS = [
    "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/score_total", "objective/scores",
    "objective/validation_score", "ppo/policy/approxkl_avg", "ppo/policy/clipfrac_avg", "ppo/policy/entropy_avg",
    "ppo/loss/policy_avg", "ppo/loss/value_avg", "ppo/val/clipfrac_avg", "ppo/val/ratio", "ppo/val/ratio_var",
    "ppo/val/num_eos_tokens", "ppo/lr", "ppo/episode", "ppo/eps",
    "objective/entropy_with_padding", "time/generation", "time/scoring", "time/training",
    "time/episodes_per_second", "time/peak_memory_gib",
]


def write_ppo_data(folder, train_rows):
    from conftest import sft_rows, write_jsonl

    os.makedirs(folder, exist_ok=True)
    write_jsonl(os.path.join(folder, "train.jsonl"), train_rows)
    write_jsonl(os.path.join(folder, "validation.jsonl"), sft_rows(8, 2))
    return folder


def test_bad_rows_are_skipped_and_counted_or_named(llama_chain, tmp_path):
    """The prompts are checked as in SFT: an empty post or summary is a counted skip logged in metrics.jsonl (never
    sampled), a malformed row and a repeated id are errors naming the split and row."""
    from conftest import sft_rows

    rows = sft_rows(24, 5)
    rows[3]["post"], rows[7]["summary"], rows[9]["post"] = "  ", "", "\n"
    data = write_ppo_data(str(tmp_path / "skips"), rows)
    records = run_ppo(llama_chain, data, str(tmp_path / "run"), total_episodes=8, run_eval=False, sample_every=0)
    assert records[0]["data/train/skipped/empty_post"] == 2 and records[0]["data/train/skipped/empty_summary"] == 1
    assert records[0]["data/train/rows"] == 21 and records[0]["data/validation/rows"] == 8

    bad = sft_rows(24, 5)
    bad[4]["title"] = None
    with pytest.raises(ValueError, match=r"split 'train' row 4 \(id='t5_4'\): .*'title': None"):
        run_ppo(llama_chain, write_ppo_data(str(tmp_path / "bad"), bad), str(tmp_path / "run2"), run_eval=False)
    twice = sft_rows(24, 5)
    twice[6]["id"] = twice[2]["id"]
    with pytest.raises(ValueError, match=r"split 'train': 1 ids repeat, e.g. id='t5_2' in rows \[2, 6\]"):
        run_ppo(llama_chain, write_ppo_data(str(tmp_path / "twice"), twice), str(tmp_path / "run3"), run_eval=False)


def test_ppo_run_is_on_policy_at_first_and_writes_its_outputs(gpt2_chain, sft_data, tmp_path):
    """GPT-2 (absolute positions) with left-padded queries of different lengths: the first minibatch of the first
    epoch must see ratio 1 and approxkl ~0, i.e. the rollout's log-probs equal the training forward's."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "run")
    records = run_ppo(gpt2_chain, sft_data, out, total_episodes=24)
    train = training_records(records)
    assert len(train) == 3
    for u, r in enumerate(train, start=1):
        assert abs(r["check/ratio_first_minibatch"] - 1) < 1e-5
        assert r["check/approxkl_first_minibatch"] < 1e-10
        assert r["check/max_abs_logprob_diff_first_minibatch"] < 1e-4
        assert math.isclose(r["ppo/lr"], 3e-6 * (1 - (u - 1) / 3), rel_tol=1e-9)  # linear annealing per update
        assert r["episodes"] == r["ppo/episode"] == 8 * u
        missing = [k for k in NPLUS_METRICS if k not in r]
        assert not missing, missing
        assert all(math.isfinite(v) for v in r.values())
        assert -1.0 <= r["objective/scores"] and r["objective/entropy"] >= 0
    assert all("episodes" in r for r in records)

    for split in ("validation", "test"):
        df = pd.read_csv(os.path.join(out, f"{split}_table.csv"), keep_default_na=False)
        assert list(df.columns) == ["id", "query", "response", "reference", "score", "reference_score"]
        assert len(df) == 4 and df["query"].str.startswith("SUBREDDIT: r/").all()
        assert df["id"].tolist() == split_ids(sft_data, split)[:4]  # rows in dataset order, ids for the judge
        assert any(r.get(f"eval/{split}/score") is not None for r in records)
    assert len(pd.read_csv(os.path.join(out, "samples", "update_000001.csv"))) == 4
    policy = AutoModelForCausalLM.from_pretrained(out)  # a standard folder, with tokenizer and generation config
    tok = AutoTokenizer.from_pretrained(out)
    assert policy.generation_config.eos_token_id == tok.eos_token_id and tok.pad_token_id != tok.eos_token_id
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["derived"]["gradient_accumulation_steps"] == 2
    assert info["mixed_precision"] == "no"  # the precision a run used is on record (bf16 runs differ in numerics)


def count_work(monkeypatch):
    """benchmark/perf/ppo_work_counters.py's perf/* counters patched into this process's ppo_tldr, undone after the
    test."""
    import ppo_work_counters

    for name in ("generate_with_logprobs", "forward"):
        monkeypatch.setattr(P, name, getattr(P, name))  # registers the original, restored at teardown
    monkeypatch.setattr(P.Logger, "log", P.Logger.log)
    ppo_work_counters.install(P)


def test_speed_switches_keep_the_numerics(llama_chain, sft_data, tmp_path, monkeypatch):
    """--response_logits_only (LM head on the response positions only), the fused AdamW and the attention kernel
    change no result beyond rounding: the reference's full logits with torch's default foreach AdamW and eager
    attention give the same losses and KL over three updates (weights updated in between) as the defaults (SDPA in
    fp32). Without a probe the run logs no validation score, and the per-update work counters match the batch
    shape."""
    common = dict(total_episodes=24, validation_probe_size=0, run_eval=False)
    count_work(monkeypatch)
    fast = training_records(run_ppo(llama_chain, sft_data, str(tmp_path / "fast"), **common))
    slow = training_records(run_ppo(llama_chain, sft_data, str(tmp_path / "slow"), response_logits_only=False,
                                    adam_impl="foreach", attn_implementation="eager", **common))
    assert len(fast) == len(slow) == 3
    for f, s in zip(fast, slow):
        for key in ("objective/kl", "objective/scores", "ppo/loss/policy_avg", "ppo/loss/value_avg",
                    "ppo/policy/approxkl_avg", "ppo/policy/entropy_avg", "check/max_abs_logprob_diff_first_minibatch"):
            assert math.isclose(f[key], s[key], rel_tol=1e-4, abs_tol=1e-5), (key, f[key], s[key])
        assert "objective/validation_score" not in f and f["time/validation_probe"] < 0.01
        assert f["perf/generated_tokens"] == 8 * SMALL["response_length"]
        # 4 epochs x 2 micro-batches of 4, each at least response_length + 1 wide
        assert f["perf/training_tokens"] >= 4 * 8 * (SMALL["response_length"] + 1)
        assert f["perf/training_attention_pairs"] > f["perf/training_tokens"] * SMALL["response_length"]


def test_kept_response_length_covers_eos_plus_one_of_the_longest_response():
    assert P.kept_response_length(torch.tensor([2, 5, 0]), 12) == 7  # EOS at index 5: the value model reads 6
    assert P.kept_response_length(torch.tensor([10]), 12) == 12
    assert P.kept_response_length(torch.tensor([11, 3]), 12) == 12  # a response without EOS: every column


def test_skipping_the_columns_after_eos_keeps_the_losses(tiny_model, sft_data, tmp_path, monkeypatch):
    """--skip_after_eos computes the scoring and training forwards only up to EOS+1 of each chunk's and micro-batch's
    longest response. With a policy that often stops early, the same rollouts give the same scores, KL, losses and
    log-prob checks over three updates (weights updated in between) as the full-length forwards, while the training
    forwards cover fewer token positions."""
    chain = make_chain(tiny_model, str(tmp_path / "chain"), reward_bias=0.1, eos_bonus=0.6)
    common = dict(response_length=16, total_episodes=24, validation_probe_size=0, run_eval=False,
                  local_micro_batch_size=2, stop_generation_at_eos=True)
    count_work(monkeypatch)
    full = training_records(run_ppo(chain, sft_data, str(tmp_path / "full"), **common))
    skip = training_records(run_ppo(chain, sft_data, str(tmp_path / "skip"), skip_after_eos=True, **common))
    assert len(full) == len(skip) == 3
    assert max(r["objective/eos_fraction"] for r in full) > 0.5  # responses do end early
    for f, s in zip(full, skip):
        for key in ("objective/kl", "objective/scores", "objective/response_length", "ppo/loss/policy_avg",
                    "ppo/loss/value_avg", "ppo/policy/approxkl_avg", "ppo/policy/clipfrac_avg",
                    "ppo/val/clipfrac_avg", "ppo/policy/entropy_avg", "check/max_abs_logprob_diff_first_minibatch"):
            assert math.isclose(f[key], s[key], rel_tol=1e-4, abs_tol=1e-5), (key, f[key], s[key])
    assert sum(r["perf/training_tokens"] for r in skip) < 0.95 * sum(r["perf/training_tokens"] for r in full)


def test_attention_kernel_is_sdpa_except_eager_for_mixed_precision_on_cpu():
    assert P.attention_kernel(None, "cpu", "no") == "sdpa"
    assert P.attention_kernel(None, "cpu", "bf16") == "eager" == P.attention_kernel(None, "cpu", "fp16")
    assert P.attention_kernel(None, "cuda", "bf16") == "sdpa"
    assert P.attention_kernel("sdpa", "cpu", "bf16") == "sdpa"  # an explicit choice wins


@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_host_memory_reuses_large_blocks(keep):
    """Without the setting every fresh 128 MiB tensor is faulted in page by page (glibc maps and unmaps it); with it,
    freed blocks are reused: after a few allocations of that size (the heap grows to hold it; here two suffice),
    allocating it again touches almost no new pages. Counted in minor page faults, so the test does not depend on
    timing. Run in a fresh process: the setting is process-wide."""
    code = f"""
import resource, sys
sys.path.insert(0, {ROOT!r})
import torch, ppo_tldr
assert ({keep} and ppo_tldr.keep_freed_host_memory()) or not {keep}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.ones(32 * 2**20); del x  # 128 MiB, freed
start = faults()
for _ in range(3):
    x = torch.ones(32 * 2**20); del x
print(faults() - start)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pages = 3 * 32 * 2**20 * 4 // resource.getpagesize()
    faults = int(res.stdout.split()[-1])
    if keep:
        assert faults < 0.05 * pages, (faults, pages)
    else:
        assert faults > 0.5 * pages, (faults, pages)


def test_fp32_head_under_bf16_autocast(tiny_model):
    """--fp32_heads: under bf16 autocast the LM head returns fp32 logits equal to an fp32 matmul of the (bf16) hidden
    state, where the plain head returns bf16; the tied weight and the state-dict keys are unchanged."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    head = model.get_output_embeddings()
    keys = list(model.state_dict())
    hidden = torch.randn(2, 5, head.in_features).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = head(hidden)
        P.fp32_head(head)
        upcast = head(hidden)
    assert plain.dtype == torch.bfloat16 and upcast.dtype == torch.float32
    assert torch.equal(upcast, F.linear(hidden.float(), head.weight))
    assert (upcast - plain.float()).abs().max() > 0  # bf16 logits were rounded
    assert head.weight is model.get_input_embeddings().weight and list(model.state_dict()) == keys


def test_resumed_run_equals_an_uninterrupted_one(llama_chain, sft_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    common = dict(total_episodes=32, save_every=2, run_eval=True, max_eval_samples=3)
    full = run_ppo(llama_chain, sft_data, str(tmp_path / "full"), **common)

    class Preempted(Exception):
        pass

    original = P.prompt_indices

    def preempt_in_update_4(num_rows, seed, start, count):
        if start == 3 * count:  # update 3 was logged after the state of update 2: the resumed run must drop it
            raise Preempted
        return original(num_rows, seed, start, count)

    monkeypatch.setattr(P, "prompt_indices", preempt_in_update_4)
    with pytest.raises(Preempted):
        run_ppo(llama_chain, sft_data, str(tmp_path / "resumed"), **common)
    monkeypatch.setattr(P, "prompt_indices", original)
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["update_000002"]
    assert len(read_metrics(str(tmp_path / "resumed"))) == 1 + 3  # the data record, then updates 1-3
    resumed = run_ppo(llama_chain, sft_data, str(tmp_path / "resumed"), resume=True, **common)

    def strip(records):  # wall-clock numbers differ; everything else must be bit-identical
        return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "ppo/eps"} for r in records]

    assert len(full) == len(resumed) == 1 + 4 + 2  # data, 4 updates, 2 evaluations: no update logged twice
    assert strip(full) == strip(resumed)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="cannot resume"):
        run_ppo(llama_chain, sft_data, str(tmp_path / "resumed"), resume=True, **{**common, "kl_coef": 0.1})


def test_two_process_run_gathers_sane_metrics(llama_chain, sft_data, tmp_path):
    """torchrun with two CPU processes (gloo); options off the default path are switched on."""
    import pandas as pd

    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.join(ROOT, "ppo_tldr.py"),
           "--sft_model_path", llama_chain[0], "--reward_model_path", llama_chain[1], "--dataset", sft_data,
           "--output_dir", out, "--query_length", "64", "--response_length", "12", "--batch_size", "16",
           "--local_micro_batch_size", "4", "--local_rollout_forward_batch_size", "4", "--total_episodes", "32",
           "--validation_probe_size", "4", "--sample_every", "1", "--max_eval_samples", "5",
           "--local_eval_batch_size", "2", "--eval_splits", "validation", "--save_every", "1",
           "--stop_generation_at_eos", "--kl_estimator", "k3", "--whiten_rewards",
           "--penalty_reward_value", "None", "--missing_eos_penalty", "1.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(out)
    train = training_records(records)
    assert [r["episodes"] for r in train] == [16, 32]
    for r in train:
        assert all(math.isfinite(v) for v in r.values())
        assert abs(r["check/ratio_first_minibatch"] - 1) < 1e-5 and r["check/approxkl_first_minibatch"] < 1e-10
        assert 0 <= r["objective/eos_fraction"] <= 1 and r["ppo/policy/clipfrac_avg"] <= 1
        assert r["objective/kl"] >= 0  # k3 is non-negative
    info = json.load(open(os.path.join(out, "run_info.json")))
    assert info["derived"]["world_size"] == 2 and info["derived"]["gradient_accumulation_steps"] == 2
    df = pd.read_csv(os.path.join(out, "validation_table.csv"), keep_default_na=False)
    # gathered from both ranks in dataset order, the padding duplicates of the last batch dropped
    assert df["id"].tolist() == split_ids(sft_data, "validation")[:5]
    probe = pd.read_csv(os.path.join(out, "samples", "update_000001.csv"), keep_default_na=False)
    assert probe["id"].tolist() == split_ids(sft_data, "validation")[:4]  # 2 probe queries per rank
    ckpt = os.path.join(out, "checkpoints", "update_000001")
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= set(os.listdir(ckpt))


def test_two_process_run_stopped_by_sigterm_resumes_to_the_same_result(llama_chain, sft_data, tmp_path):
    """Preemption of a 2-process run as a cluster does it: SIGTERM to the launcher and both workers at once (the
    process group). The ranks agree on stopping at the same update, save one state holding both ranks' RNG states,
    and the resumed 2-process run ends bit-identical to an uninterrupted one."""
    import signal
    import time

    def command(out, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                os.path.join(ROOT, "ppo_tldr.py"), "--sft_model_path", llama_chain[0], "--reward_model_path", llama_chain[1], "--dataset", sft_data,
                "--output_dir", out, "--query_length", "64", "--response_length", "12", "--batch_size", "16",
                "--local_micro_batch_size", "4", "--local_rollout_forward_batch_size", "4", "--total_episodes", "96",
                "--validation_probe_size", "2", "--sample_every", "0", "--no_run_eval", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = str(tmp_path / "full")
    proc = subprocess.run(command(full), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = str(tmp_path / "preempted")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(command(out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, as a batch job step
        metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
        while not (os.path.exists(metrics) and open(metrics).read().count("objective/scores")):
            assert proc.poll() is None and time.time() < deadline, open(tmp_path / "log.txt").read()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    printed = open(tmp_path / "log.txt").read()
    states = os.listdir(os.path.join(out, "checkpoints"))
    assert len(states) == 1 and states[0] < "update_000006", (states, printed[-3000:])
    assert printed.count(f"received SIGTERM: saved the state of update {int(states[0][-6:])}") == 1  # rank 0 says it
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(os.path.join(out, "checkpoints",
                                                                                         states[0])))
    proc = subprocess.run(command(out, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert strip_wall_clock(read_metrics(full)) == strip_wall_clock(read_metrics(out))
    assert_same_weights(full, out)


def test_score_rises_with_a_toy_reward_model(tiny_model, sft_data, tmp_path):
    """The RM gives +1 to any response with EOS, -1 (the missing-EOS penalty) otherwise: the policy must learn to
    stop. The tiny random policy starts with an EOS in roughly a quarter of its responses."""
    chain = make_chain(tiny_model, str(tmp_path / "chain"), reward_bias=-1.0, zero_score_head=True, eos_bonus=0.3)
    records = training_records(run_ppo(
        chain, sft_data, str(tmp_path / "learn"), response_length=16, batch_size=16, local_micro_batch_size=16,
        local_rollout_forward_batch_size=16, total_episodes=16 * 12, learning_rate=3e-3, validation_probe_size=2,
        sample_every=0, run_eval=False))
    scores = [r["objective/scores"] for r in records]
    eos = [r["objective/eos_fraction"] for r in records]
    assert scores[0] < 0.2, scores  # mostly no EOS at the start
    assert sum(scores[-3:]) / 3 > sum(scores[:2]) / 2 + 0.5, scores
    assert sum(eos[-3:]) / 3 > 0.75, eos


# ---------------------------------------------------------------------------------------------------------
# Faults: preemption signals, killed or corrupt saves, divergence
# ---------------------------------------------------------------------------------------------------------


def strip_wall_clock(records):
    """Wall-clock numbers differ between runs; everything else must be bit-identical."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "ppo/eps"} for r in records]


def assert_same_weights(dir_a, dir_b):
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_state_and_the_resumed_run_equals_an_uninterrupted_one(llama_chain, sft_data, tmp_path):
    """The script as a subprocess gets SIGTERM once its first update is logged: it saves a state at the end of the
    update under way and exits with 143; --resume then ends bit-identical to a run that was never interrupted."""
    import signal
    import time

    common = dict(total_episodes=48, run_eval=False, sample_every=0)
    full = run_ppo(llama_chain, sft_data, str(tmp_path / "full"), **common)
    out = str(tmp_path / "stopped")
    cmd = [sys.executable, os.path.join(ROOT, "ppo_tldr.py"), *script_flags(llama_chain, sft_data, out, **common)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
    while not (os.path.exists(metrics) and open(metrics).read().count("objective/scores")) and proc.poll() is None:
        assert time.time() < deadline, "the run logged no update"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output[-3000:]
    states = os.listdir(os.path.join(out, "checkpoints"))
    assert len(states) == 1 and states[0] < "update_000006", states  # stopped before the last update
    assert f"received SIGTERM: saved the state of update {int(states[0][-6:])}" in output
    resumed = run_ppo(llama_chain, sft_data, out, resume=True, **common)
    assert len(full) == len(resumed) == 1 + 6  # the data record and 6 updates
    assert strip_wall_clock(full) == strip_wall_clock(resumed)
    assert_same_weights(str(tmp_path / "full"), out)


def test_sigkill_during_a_state_save_resumes_from_the_previous_state(llama_chain, sft_data, tmp_path):
    """A real SIGKILL while the state of update 2 is being written (its files are on disk, its manifest is not): the
    half-written `.tmp` folder is never taken for a state, --resume continues from update 1, and the run ends
    bit-identical to one that was never interrupted."""
    import time

    common = dict(total_episodes=32, save_every=1, keep_states=2, run_eval=False, sample_every=0)
    full = run_ppo(llama_chain, sft_data, str(tmp_path / "full"), **common)
    out, marker = str(tmp_path / "killed"), str(tmp_path / "saving")
    # the script itself, with the manifest step of the second save held until the process is killed
    driver = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import ppo_tldr as P, tyro\n"
              "original = P.file_sha256\n"
              "def held(path):\n"
              "    if 'update_000002.tmp' in path:\n"
              f"        open({marker!r}, 'w').close(); time.sleep(600)\n"
              "    return original(path)\n"
              "P.file_sha256 = held\n"
              "P.main(tyro.cli(P.Args))\n")
    cmd = [sys.executable, "-c", driver, *script_flags(llama_chain, sft_data, out, **common)]
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not os.path.exists(marker):
            assert proc.poll() is None, open(tmp_path / "log.txt").read()[-3000:]
            assert time.time() < deadline, "the second save never started"
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler runs
        assert proc.wait(timeout=60) == -9
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["update_000001", "update_000002.tmp"]
    assert os.path.exists(os.path.join(root, "update_000002.tmp", "model.safetensors"))  # written, but no manifest
    assert P.latest_valid_state(root)[0] == os.path.join(root, "update_000001")
    resumed = run_ppo(llama_chain, sft_data, out, resume=True, **common)
    assert strip_wall_clock(full) == strip_wall_clock(resumed)
    assert_same_weights(str(tmp_path / "full"), out)


def test_resume_skips_a_corrupt_state_and_a_save_killed_midway(llama_chain, sft_data, tmp_path, monkeypatch, capsys):
    """States every update, keep 2. The newest kept state is truncated (a corrupt file), a newer folder lacks its
    manifest and an `.tmp` folder is left behind (SIGKILL during a save): resume falls back to the state before,
    says why, and still ends bit-identical to an uninterrupted run."""
    common = dict(total_episodes=32, save_every=1, keep_states=2, run_eval=False, sample_every=0)
    full = run_ppo(llama_chain, sft_data, str(tmp_path / "full"), **common)

    class Preempted(Exception):
        pass

    original = P.prompt_indices

    def preempt_in_update_4(num_rows, seed, start, count):
        if start == 3 * count:
            raise Preempted
        return original(num_rows, seed, start, count)

    out = str(tmp_path / "faulty")
    monkeypatch.setattr(P, "prompt_indices", preempt_in_update_4)
    with pytest.raises(Preempted):
        run_ppo(llama_chain, sft_data, out, **common)
    monkeypatch.setattr(P, "prompt_indices", original)
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["update_000002", "update_000003"]  # --keep_states 2
    assert P.latest_valid_state(root) == (os.path.join(root, "update_000003"), [])
    weights = os.path.join(root, "update_000003", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    import shutil

    shutil.copytree(os.path.join(root, "update_000002"), os.path.join(root, "update_000004.tmp"))  # killed mid-save
    shutil.copytree(os.path.join(root, "update_000002"), os.path.join(root, "update_000005"))
    os.remove(os.path.join(root, "update_000005", P.STATE_MANIFEST))  # a folder whose save never finished
    capsys.readouterr()
    resumed = run_ppo(llama_chain, sft_data, out, resume=True, **common)
    printed = capsys.readouterr().out
    assert re.search(r"skipping the state \S+update_000005: no readable state_manifest.json", printed), printed
    assert re.search(r"skipping the state \S+update_000003: model.safetensors has \d+ bytes, the manifest says",
                     printed), printed
    assert "resumed from" in printed and "update_000002 at update 3" in printed
    assert strip_wall_clock(full) == strip_wall_clock(resumed)
    assert_same_weights(str(tmp_path / "full"), out)
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")]  # the next save cleared the leftover


@pytest.mark.parametrize("target, first_bad_call, message, saved", [
    ("apply_missing_eos_penalty", 3, r"objective/scores diverged at update 3 \(episode 24\), rollouts: 8 NaN", True),
    ("value_loss", 2 * 4 * 2 + 1,  # 2 updates x 4 epochs x 2 micro-batches, then the first of update 3
     r"ppo/loss/value diverged at update 3 \(episode 24\), PPO epoch 0, minibatch 0, micro-batch 0: 1 NaN", True),
    ("value_loss", 2 * 4 * 2 + 2 + 1,  # update 3, epoch 1: the weights have moved within the update
     r"ppo/loss/value diverged at update 3 \(episode 24\), PPO epoch 1, minibatch 0, micro-batch 0: 1 NaN", False),
], ids=["scores", "value_loss", "value_loss_mid_update"])
def test_a_nan_stops_the_run_at_its_update_and_keeps_the_last_good_state(llama_chain, sft_data, tmp_path,
                                                                         monkeypatch, target, first_bad_call, message,
                                                                         saved):
    """A NaN appearing in update 3 stops the run there, naming the quantity and the place. Without periodic states
    (--save_every 0), the weights of the end of update 2 are saved as a complete, resumable state when no optimizer
    step of update 3 has run yet; once one has, the weights are mid-update and nothing is saved."""
    original, calls = getattr(P, target), []

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = original(*args, **kwargs)
        if len(calls) < first_bad_call:
            return out
        return out * float("nan") if torch.is_tensor(out) else (out[0] * float("nan"), *out[1:])

    monkeypatch.setattr(P, target, poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=message) as info:
        run_ppo(llama_chain, sft_data, out, total_episodes=48, save_every=0, run_eval=False, sample_every=0)
    root = os.path.join(out, "checkpoints")
    assert len(training_records(read_metrics(out))) == 2
    if not saved:
        assert str(info.value).endswith("Last good state: none (no update had finished; --save_every keeps periodic "
                                        "states)") and not os.path.exists(root)
        return
    state = os.path.join(root, "update_000002")
    assert f"Last good state: {state}" in str(info.value)
    assert os.listdir(root) == ["update_000002"] and P.state_problem(state) is None
    trainer_state = json.load(open(os.path.join(state, "trainer_state.json")))
    assert (trainer_state["update"], trainer_state["episode"], trainer_state["data_position"]) == (2, 16, 16)
    # it resumes: with the poison gone, the run finishes from update 3
    monkeypatch.setattr(P, target, original)
    resumed = training_records(run_ppo(llama_chain, sft_data, out, total_episodes=48, save_every=0, run_eval=False,
                                       sample_every=0, resume=True))
    assert [r["episodes"] for r in resumed] == [8 * u for u in range(1, 7)]


def test_the_value_head_has_a_bias_the_value_loss_trains_and_the_reward_model_has_none(llama_chain, sft_data,
                                                                                         tmp_path):
    """The reference's value head has a bias, 0 at the start (the RM's), that the value loss trains [N+ 1.D.1]; the
    frozen reward model's head has none (the pairwise loss never moved it)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    def scalar_model(**kw):
        return P.NormalizedScalarModel(AutoModelForSequenceClassification.from_pretrained(llama_chain[1]), **kw)

    critic, reward = scalar_model(value_head_bias=True), scalar_model()
    assert reward.value_bias is None and critic.value_bias.tolist() == [0.0]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    args = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(5)[None])
    values = critic(**args)
    torch.testing.assert_close(values, reward(**args), rtol=0, atol=0)  # equal while the bias is 0
    returns, mask = values.detach() + torch.tensor([[1.0, -0.5, 2.0, 0.0, 0.0]]), torch.tensor([[1, 1, 1, 0, 0]]).bool()
    P.value_loss(values, values.detach(), returns, mask, cliprange_value=10.0)[0].backward()
    # d/db of 0.5 * mean((V + b - R)^2) over the 3 masked positions = mean(V - R) = -(1 - 0.5 + 2) / 3
    torch.testing.assert_close(critic.value_bias.grad, torch.tensor([-2.5 / 3]))
    out = str(tmp_path / "run")
    run_ppo(llama_chain, sft_data, out, save_every=1, run_eval=False, sample_every=0, learning_rate=1e-3)
    state = load_file(os.path.join(out, "checkpoints", "update_000001", "model.safetensors"))  # after one update
    bias = [v for k, v in state.items() if k.endswith("value_bias")]
    assert len(bias) == 1 and bias[0].abs().item() > 1e-4  # trained by PPO's value loss, saved and resumable


# ---------------------------------------------------------------------------------------------------------
# Health monitor
# ---------------------------------------------------------------------------------------------------------

HEALTH_LIMITS = {name: P.Args.__dataclass_fields__[field].default for name, (_, field) in P.HEALTH_CHECKS.items()}


def test_each_health_check_fires_on_its_own_fault_and_not_on_a_healthy_update():
    start = P.health_raw(0.9, 30.0, 0.7, ["my bf forgot my bday. should i dump him?", "my boss cut my hours."],
                         probe_gap=-0.2)
    healthy = P.health_raw(0.85, 36.0, 0.8, ["my boyfriend forgot my birthday again. should i end it?",
                                             "my boss cut my hours without asking."], probe_gap=0.3)
    assert P.failing_checks(P.health_signals(healthy, start, 4.0), HEALTH_LIMITS) == {}
    loop = "tl;dr: i am fine tl;dr: i am fine tl;dr: i am fine tl;dr: i am fine"
    faults = {  # each quantity pushed past its limit, the rest as in the healthy update
        "eos_drop": dict(eos_rate=0.4),
        "length_drift": dict(length=14.0),  # shrinking counts as drift too
        "entropy_rise": dict(entropy=1.1),
        "repetition_rise": dict(texts=[loop, "my boss cut my hours without asking."]),
        "duplicate_rise": dict(texts=["thanks for reading!", "thanks for reading!"]),
        "probe_gap_rise": dict(probe_gap=1.0),
    }
    base = dict(eos_rate=0.85, length=36.0, entropy_per_token=0.8, probe_gap=0.3,
                texts=["my boyfriend forgot my birthday again. should i end it?", "my boss cut my hours without asking."])
    for name, change in faults.items():
        kwargs = {**base, **({"entropy_per_token": change["entropy"]} if "entropy" in change else change)}
        signals = P.health_signals(P.health_raw(**kwargs), start, 4.0)
        assert set(P.failing_checks(signals, HEALTH_LIMITS)) == {name}, (name, signals)
    assert set(P.failing_checks(P.health_signals(healthy, start, 10.5), HEALTH_LIMITS)) == {"kl"}
    # the update's own step: an approximate KL of 0.23 per token wrecked a policy in one update, healthy runs <= 0.007
    assert set(P.failing_checks(P.health_signals(healthy, start, 4.0, update_kl=0.23), HEALTH_LIMITS)) == {"update_kl"}
    assert P.failing_checks(P.health_signals(healthy, start, 4.0, update_kl=0.007), HEALTH_LIMITS) == {}
    # None switches a check off; a starting policy that never ends (EOS rate 0) cannot drop
    assert P.failing_checks(P.health_signals(healthy, start, 10.5), {**HEALTH_LIMITS, "kl": None}) == {}
    never_ends = P.health_raw(0.0, 30.0, 0.7, ["a"])
    assert P.health_signals(never_ends, never_ends, 0.0)["health/eos_drop"] == 0.0
    assert P.repeated_trigram_fraction("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert P.duplicate_share(["x", " X ", "y"]) == pytest.approx(2 / 3)


def test_a_check_trips_only_after_patience_consecutive_failing_updates():
    monitor = P.HealthMonitor({**HEALTH_LIMITS}, patience=2)
    ok, bad = {"health/kl": 1.0}, {"health/kl": 11.0}
    assert monitor.observe(1, ok) == {}
    assert monitor.observe(2, bad) == {}  # one noisy update is no alarm
    assert monitor.observe(3, ok) == {}  # and a healthy one resets the count
    assert monitor.observe(4, bad) == {}
    assert monitor.observe(5, bad) == {"kl": (11.0, 10.0)}
    assert monitor.trouble_began({"kl": None}) == 4
    # update 4's rollouts came from the policy of update 3: the last healthy policy is that of update 2
    assert P.healthy_update(4) == 2 and P.healthy_update(1) == 0
    restored = P.HealthMonitor({**HEALTH_LIMITS}, patience=2)
    restored.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert restored.streak == monitor.streak and restored.history == monitor.history


def test_a_check_of_the_update_itself_trips_at_once_and_indicts_that_update():
    monitor = P.HealthMonitor({**HEALTH_LIMITS}, patience=2)
    ok = {"health/kl": 1.0, "health/update_kl": 0.005}
    assert monitor.observe(1, ok) == {} and monitor.observe(2, ok) == {}
    tripped = monitor.observe(3, {**ok, "health/update_kl": 0.3})  # no patience: its policy was never sampled
    assert tripped == {"update_kl": (0.3, 0.1)}
    assert monitor.trouble_began(tripped) == 3 and monitor.last_healthy_update(tripped) == 2
    # with a rollout check tripping beside it, the older of the two last healthy policies wins
    monitor.reset()
    monitor.observe(4, {**ok, "health/kl": 11.0})
    both = monitor.observe(5, {**ok, "health/kl": 11.0, "health/update_kl": 0.3})
    assert set(both) == {"kl", "update_kl"} and monitor.last_healthy_update(both) == P.healthy_update(4) == 2
    assert monitor.last_healthy_update({"update_kl": None}) == 4
    # and the message gives each check its own window
    assert P.tripped_text(both, 2) == "kl 11 (limit 10) for 2 updates, update_kl 0.3 (limit 0.1) in this update"


def _fail_eos_at(monkeypatch, updates):
    """Make the EOS check fail at `updates` (the real signals otherwise): the monitor sees a policy that stopped
    ending its responses there."""
    original = P.HealthMonitor.observe

    def observe(self, update, signals):
        if update in updates:
            signals = {**signals, "health/eos_drop": 1.0}
        return original(self, update, signals)

    monkeypatch.setattr(P.HealthMonitor, "observe", observe)


def test_an_update_that_moved_too_far_rolls_back_to_the_update_before(llama_chain, sft_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    original = P.HealthMonitor.observe

    def observe(self, update, signals):  # update 3's training moved the policy too far (approximate KL 1 per token)
        assert "health/update_kl" in signals
        return original(self, update, {**signals, "health/update_kl": 1.0} if update == 3 else signals)

    monkeypatch.setattr(P.HealthMonitor, "observe", observe)
    out = tmp_path / "run"
    run_ppo(llama_chain, sft_data, str(out), total_episodes=48, save_every=1, keep_states=3, max_eval_samples=3)
    incident = json.load(open(out / "health" / "incident_update_000003.json"))
    assert list(incident["tripped"]) == ["update_kl"] and incident["last_healthy_update"] == 2
    assert incident["rolled_back_to"].endswith("update_000002")
    assert json.load(open(out / "health" / "summary.json"))["kept_policy_update"] == 2
    assert max(os.listdir(out / "checkpoints")) == "update_000002"  # update 3's state is gone
    state = load_file(str(out / "checkpoints" / "update_000002" / "model.safetensors"))
    policy = load_file(str(out / "model.safetensors"))
    assert policy and all(torch.equal(policy[k], state["policy." + k]) for k in policy)


def test_a_tripped_check_rolls_back_to_the_saved_weights_and_stops(llama_chain, sft_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _fail_eos_at(monkeypatch, {3, 4})
    out = tmp_path / "run"
    records = run_ppo(llama_chain, sft_data, str(out), total_episodes=48, save_every=1, keep_states=3,
                      max_eval_samples=3)
    updates = training_records(records)
    assert len(updates) == 4  # updates 5 and 6 never ran
    assert all(key in r for r in updates for key, _ in P.HEALTH_CHECKS.values())  # every signal is logged
    incident = json.load(open(out / "health" / "incident_update_000004.json"))
    assert incident["tripped"]["eos_drop"]["value"] == 1.0 and incident["trouble_began_at_update"] == 3
    assert incident["last_healthy_update"] == 1 and incident["rolled_back_to"].endswith("update_000001")
    assert [h["update"] for h in incident["history"]][-2:] == [3, 4] and len(incident["sample_responses"]) == 4
    summary = json.load(open(out / "health" / "summary.json"))
    assert summary["kept_policy_update"] == 1 and summary["stopped_by_health_monitor"]
    assert json.load(open(out / "run_info.json"))["health"]["kept_policy_update"] == 1
    # the newer (unhealthy) states are gone; the saved policy is exactly the policy of the state of update 1
    assert os.listdir(out / "checkpoints") == ["update_000001"]
    state = load_file(str(out / "checkpoints" / "update_000001" / "model.safetensors"))
    policy = load_file(str(out / "model.safetensors"))
    assert policy and all(torch.equal(policy[k], state["policy." + k]) for k in policy)
    sft = load_file(os.path.join(llama_chain[0], "model.safetensors"))  # and update 1 did change the SFT weights
    assert any(not torch.equal(policy[k], sft[k]) for k in policy if k in sft and policy[k].shape == sft[k].shape)
    assert os.path.exists(out / "validation_table.csv")  # the kept policy is the one evaluated


def test_continuing_after_a_rollback_changes_the_recipe_and_resumes_exactly(llama_chain, sft_data, tmp_path,
                                                                           monkeypatch):
    _fail_eos_at(monkeypatch, {3, 4})
    common = dict(total_episodes=48, save_every=1, keep_states=3, health_action="continue", max_eval_samples=3)
    full = run_ppo(llama_chain, sft_data, str(tmp_path / "full"), **common)
    updates = training_records(full)
    assert len(updates) == 6
    lr = P.Args.__dataclass_fields__["learning_rate"].default
    assert updates[4]["ppo/lr"] == pytest.approx(0.5 * lr * (1 - 4 / 6))  # halved after the rollback at update 4
    assert updates[3]["ppo/lr"] == pytest.approx(lr * (1 - 3 / 6))
    incident = [r for r in full if "health/incident" in r]
    assert len(incident) == 1 and incident[0]["health/kl_coef"] == pytest.approx(0.1)
    summary = json.load(open(tmp_path / "full" / "health" / "summary.json"))
    assert summary["kept_policy_update"] == 6 and not summary["stopped_by_health_monitor"]
    assert summary["kl_coef"] == pytest.approx(0.1) and summary["lr_scale"] == 0.5

    class Preempted(Exception):
        pass

    original = P.prompt_indices

    def preempt_in_update_6(num_rows, seed, start, count):
        if start == 5 * count:
            raise Preempted
        return original(num_rows, seed, start, count)

    monkeypatch.setattr(P, "prompt_indices", preempt_in_update_6)
    with pytest.raises(Preempted):
        run_ppo(llama_chain, sft_data, str(tmp_path / "resumed"), **common)
    monkeypatch.setattr(P, "prompt_indices", original)
    resumed = run_ppo(llama_chain, sft_data, str(tmp_path / "resumed"), resume=True, **common)
    assert strip_wall_clock(full) == strip_wall_clock(resumed)
    assert_same_weights(str(tmp_path / "full"), str(tmp_path / "resumed"))
