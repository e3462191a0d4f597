"""Stage 3 of 3: PPO on TL;DR with a frozen reward model, a separate value model and a KL penalty.

Reproduces the PPO stage of "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization" (Huang et al., 2024, arXiv 2403.17031). Every implementation detail carries a tag such as
`[N+ 1.D.15]` that points into the project's checklist of the reference code (sections 1.A data, 1.D PPO,
2 helper math, 3 metric names); `grep -n "N+ 1.D" ppo_tldr.py` maps the checklist to the code. The defaults are
the released runs (`ppo.py` of the reference with `--ppo.no_whiten_rewards`).

What it does, top to bottom:
  1. loads four models [N+ 1.D.1]: the policy and a frozen reference policy from the SFT checkpoint
     (`sft_tldr.py`), the value model and a frozen reward model from the RM checkpoint (`reward_tldr.py`). The
     policy and the value model are separate networks trained by one AdamW optimizer;
  2. per update, samples 53 tokens at temperature 0.7 for 512 queries, truncates after the first EOS, scores the
     truncated response with the RM (-1 without EOS), adds a per-token KL penalty 0.05 * (log pi - log pi_ref),
     runs GAE (gamma 1, lambda 0.95) and whitens the advantages [N+ 1.D.6-18];
  3. runs 4 PPO epochs of the clipped policy loss plus 0.1 x the clipped value loss [N+ 1.D.19];
  4. logs the reference's metric names each update, samples a fixed validation probe at temperature 0.01
     [N+ 1.D.24], saves the policy as a standard Hugging Face folder [N+ 1.D.26], and writes
     `{validation,test}_table.csv` (id, query, response, reference, score, reference_score), the input of win-rate
     judging [N+ 1.D.25].

Launch:
  python ppo_tldr.py --sft_model_path runs/sft --reward_model_path runs/rm      # paper defaults, one GPU (GA 32)
  accelerate launch --config_file benchmark/accelerate/deepspeed_zero2.yaml ppo_tldr.py \
      --sft_model_path runs/sft --reward_model_path runs/rm --local_micro_batch_size 16 --seed 44413   # 8 GPUs, 1B
      # 6.9B: add --local_micro_batch_size 1 --local_rollout_forward_batch_size 4 --offload
      # preemptible clusters: add --output_dir runs/ppo_44413 --save_every 50 --resume (resumes if a state exists)
  python ppo_tldr.py --sft_model_path runs/sft_smoke --reward_model_path runs/rm_smoke --dataset data/tldr_synth/sft \
      --batch_size 8 --local_micro_batch_size 4 --total_episodes 32 --max_eval_samples 8   # tiny CPU run

Deviations from the reference code (mask-derived positions, EOS-safe generation, masked metrics, a prompt stream
for exact resume, ...), fault handling and every metric: README "Stage notes", `ppo_tldr.py`. The metrics to watch
(<output_dir>/metrics.jsonl, x-axis `episodes` = rollouts so far; each a mean over the update and the ranks):
objective/scores (RM score of the rollouts), objective/kl, objective/response_length, objective/eos_fraction,
objective/validation_score (the fixed probe), ppo/val/explained_variance, check/ratio_first_minibatch (1 on policy)
and the health/* signals (README "Watching a run").
"""

import copy
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

# A log-prob placeholder for response positions after the EOS [N+ 1.D.14]. Policy and reference both hold it there,
# so their difference (the KL) is exactly 0 on padding, for k1 and k3 alike.
INVALID_LOGPROB = 1.0

# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Args:
    # --- the two checkpoints of the earlier stages
    sft_model_path: str
    """SFT checkpoint (a standard causal-LM folder with its tokenizer): initialises the policy and the frozen
    reference policy [N+ 1.D.1]"""
    reward_model_path: str
    """reward-model checkpoint (AutoModelForSequenceClassification, num_labels=1, `config.reward_bias`):
    initialises the value model and the frozen reward model [N+ 1.D.1]"""

    # --- run and tracking
    exp_name: str = "ppo_tldr"
    """name of this experiment; the run name is `{exp_name}__{seed}__{unix time}`"""
    seed: int = 44413
    """global seed: prompt order; each rank samples with seed + rank*100003; paper seeds 44413, 55513, 66613,
    77713 [N+ 1.B.9]"""
    track: bool = False
    """log metrics and sample tables to Weights & Biases as well as to metrics.jsonl"""
    wandb_project_name: str = "tldr_summarize"
    """Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """Weights & Biases entity (team); None means your default entity"""
    output_dir: Optional[str] = None
    """where the policy, metrics.jsonl, tables and checkpoints go; default `runs/{run_name}`"""
    save_every: int = 0
    """write a resumable training state to <output_dir>/checkpoints every N updates; 0 = never (the reference
    saves only the final policy). SIGTERM/SIGINT always save one before exiting"""
    keep_states: int = 2
    """keep the newest N states (older ones are deleted after each save); 2 leaves a fallback when the newest is
    found corrupt on resume"""
    resume: bool = False
    """continue from the newest complete state in <output_dir>/checkpoints if there is one (else start fresh, with
    a warning, moving the files of the run that left no usable state aside), so one launch line serves a requeued
    job; needs --output_dir"""

    # --- data
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """TL;DR posts: a hub dataset or a local folder with one .jsonl/.json/.parquet file per split, columns id,
    subreddit, title, post, summary; PPO reads only the queries of `train` [N+ 1.A.2, 1.D.5]"""
    dataset_revision: Optional[str] = None
    """hub revision of --dataset (branch, tag or commit hash, to pin the data); None = the main branch"""
    query_length: int = 512
    """query tokens after smart truncation and left padding [N+ 1.A.4]"""
    response_length: int = 53
    """tokens sampled per response, always exactly this many [N+ 1.D.6]"""

    # --- rollouts and rewards
    temperature: float = 0.7
    """sampling temperature of the rollouts; training and reference log-probs use logits/(T+1e-7) [N+ 1.D.6, 1.D.8]"""
    stop_generation_at_eos: bool = False
    """stop sampling once every response in a generation batch has an EOS (faster; the reference always samples
    response_length tokens and truncates afterwards). Tokens after an EOS never reach a loss, so only speed, the
    random stream and ppo/val/num_eos_tokens (which then counts first EOS only) change"""
    penalty_reward_value: Optional[float] = -1.0
    """score given to a response without EOS, replacing the RM score (N+ `non_eos_penalty`); None disables
    [N+ 1.D.13]"""
    missing_eos_penalty: Optional[float] = None
    """TRL's variant: subtract this from the RM score of a response without EOS (needs --penalty_reward_value None)"""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty in the reward, fixed (no adaptive controller) [N+ 1.D.3, 1.D.15]"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimate: k1 = log pi - log pi_ref (the reference), k3 = (r - 1) - log r with r = pi_ref/pi
    (non-negative, TRL's option) [N+ 1.D.15]"""
    score_at: Literal["eos_p1", "eos"] = "eos_p1"
    """where the score enters the per-token reward: `eos_p1` = the position after EOS, or the last position when
    EOS is the last token or missing (the reference and OpenAI); `eos` = the EOS token itself (the value model then
    stops at EOS too) [N+ 1.D.15]"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (masked, mean kept); off in the released runs [N+ 1.D.16]"""

    # --- PPO
    gamma: float = 1.0
    """GAE discount [N+ 1.D.3, 1.D.17]"""
    lam: float = 0.95
    """GAE lambda [N+ 1.D.3, 1.D.17]"""
    whiten_advantages: bool = True
    """whiten the advantages per rank over real tokens, biased variance [N+ 1.D.18]"""
    cliprange: float = 0.2
    """policy ratio clip [N+ 1.D.3]"""
    cliprange_value: float = 0.2
    """value clip around the rollout values [N+ 1.D.3]"""
    vf_coef: float = 0.1
    """weight of the value loss in the single loss [N+ 1.D.3]"""
    noptepochs: int = 4
    """PPO epochs over each batch of rollouts [N+ 1.D.3]"""
    nminibatches: int = 1
    """minibatches per PPO epoch; one optimizer step each [N+ 1.D.3, 1.D.4]"""
    critic_warmup_updates: int = 0
    """updates at the start that train the value model only: the policy's learning rate is 0 and its loss weight 0,
    so rollouts keep coming from the SFT policy while the value model, initialised from the RM (trained on the last
    token only), learns per-token values with an unclipped value loss; the policy's LR schedule starts after them.
    Not in the paper (0); peers call it critic warm-up or actor freezing"""

    # --- optimisation
    learning_rate: float = 3e-6
    """AdamW learning rate, shared by policy and value model [N+ 1.D.2]"""
    value_learning_rate: Optional[float] = None
    """the value model's own AdamW learning rate, annealed like the policy's; None: --learning_rate (the paper).
    Not in the paper; peers give the critic a larger one than the policy"""
    adam_eps: float = 1e-5
    """AdamW epsilon (torch's default is 1e-8) [N+ 1.D.2]"""
    weight_decay: float = 0.01
    """AdamW weight decay; the reference uses torch's default 0.01 [N+ 1.D.2]"""
    anneal_lr: bool = True
    """linear LR annealing per update, lr * (1 - (update-1)/num_updates) [N+ 1.D.2]"""
    max_grad_norm: Optional[float] = None
    """clip the global gradient norm; None = no clipping, as the reference [N+ 1.D.21]"""
    batch_size: int = 512
    """rollouts per update across all processes = local_micro_batch_size x gradient accumulation x nminibatches x
    processes; gradient accumulation is derived from it [N+ 1.D.4]"""
    local_micro_batch_size: int = 16
    """rollouts per training forward pass on each process (HF's per_device_train_batch_size); paper 16 / 4 / 1 for
    1B / 2.8B / 6.9B on 8 GPUs [N+ 1.D.4]"""
    local_rollout_forward_batch_size: int = 64
    """rollouts per generation and per no-grad forward (reference, value, reward) on each process; paper
    64 / 32 / 4 [N+ 1.D.4, 1.D.6]"""
    total_episodes: int = 999_936
    """rollouts in the whole run, whole batches only: updates = total_episodes / batch_size. The paper's 1M episodes
    make 1953 updates of 512 (the reference drops the remainder), which is 999,936 episodes [N+ 1.D.4]"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of policy and value model (memory for time)"""
    skip_after_eos: bool = False
    """in the scoring and training forwards of a chunk or micro-batch, drop the response columns after the last
    position any loss reads (EOS+1 of its longest response; `kept_response_length`): attention is causal, so the kept
    positions are unchanged and the losses are the same (README "Throughput"). Only the `*_with_padding` metrics,
    which average over the computed padding positions too, change; off = the reference's full-length forwards"""
    response_logits_only: bool = True
    """compute the LM head only where log-probs are read (the R response positions) in the reference and training
    forwards, instead of at every query position: same log-probs, fewer FLOPs, and the (B, T, V) logits tensor shrinks
    to (B, R+1, V) (README "Throughput"); False = the reference's full logits"""
    fp32_heads: bool = True
    """under bf16/fp16 autocast, run the LM heads and the value/reward heads in fp32 (`fp32_head`): bf16 logits make
    the sampler's and the training forward's log-probs differ (README "Throughput"); no effect in fp32 runs"""
    attn_implementation: Optional[Literal["sdpa", "eager", "flash_attention_2"]] = None
    """attention kernel of all four models (transformers' `attn_implementation`; flash_attention_2 needs the
    flash-attn package and a GPU); None = `attention_kernel`: SDPA, except eager matmuls under bf16/fp16 autocast on
    CPU, where torch's CPU SDPA kernel with a padding mask is 1.5x slower (README "Throughput"). The same attention,
    rounding aside"""
    keep_freed_memory: bool = True
    """CPU runs: keep freed host memory in the process for reuse instead of handing it back to the OS
    (`keep_freed_host_memory`); each fresh gradient or logits tensor otherwise pays page faults. Allocation only: the
    same numbers (README "Throughput")"""
    adam_impl: Literal["fused", "foreach"] = "fused"
    """torch AdamW kernel: fused (one kernel over all parameters) or foreach (torch's default); the same update rule,
    rounding aside (README "Throughput")"""
    offload: bool = False
    """DeepSpeed only: hold the frozen reference and reward models in ZeRO-3 with parameters offloaded to CPU (the
    6.9B recipe) [N+ 1.D.22]"""

    # --- logging and evaluation
    validation_probe_size: int = 16
    """validation queries sampled at eval_temperature and scored before every update (objective/validation_score);
    split across processes; 0 = no probe (benchmarks) [N+ 1.D.24]"""
    sample_every: int = 220
    """write the probe's table (CSV + wandb table) every N updates; 0 = never [N+ 1.D.24]"""
    run_eval: bool = True
    """after training, sample every query of eval_splits and write `{split}_table.csv` [N+ 1.D.25]"""
    eval_splits: tuple[str, ...] = ("validation", "test")
    """splits to evaluate [N+ 1.D.25]"""
    local_eval_batch_size: int = 4
    """queries per generation batch on each process at evaluation"""
    max_eval_samples: Optional[int] = None
    """evaluate only the first N rows of each split (quick runs); None = all"""
    eval_temperature: float = 0.01
    """sampling temperature of the probe and the evaluation, as OpenAI's sample.py [N+ 1.D.24, 1.F.6]"""

    # --- health monitor (not in the paper; README "Watching a run"): judge-free checks of every update's rollouts
    health_action: Literal["stop", "continue", "log"] = "stop"
    """when a check trips: `stop` rolls back to the newest state saved before the trouble began and ends the run
    there (the saved policy is the last healthy one); `continue` rolls back, halves the learning rate, doubles the KL
    coefficient and goes on; `log` only writes the incident. Rolling back needs states: --save_every 1 and
    --keep_states >= --health_patience + 1 (without a state to go back to, `stop` ends the run where it is)"""
    health_patience: int = 2
    """consecutive updates a check must fail before it trips (one noisy update is no alarm)"""
    health_max_eos_drop: Optional[float] = 0.5
    """trip when the EOS rate of the rollouts falls below (1 - this) x the first update's: a policy that stopped
    ending its summaries; None = off"""
    health_max_kl: Optional[float] = 10.0
    """trip when the rollouts' KL to the SFT policy (sum over the response, nats) exceeds this; None = off"""
    health_max_length_drift: Optional[float] = 0.5
    """trip when the mean response length moves more than this fraction from the first update's; None = off"""
    health_max_entropy_rise: Optional[float] = 0.5
    """trip when the rollouts' per-token entropy rises more than this fraction above the first update's (a policy
    losing its shape); None = off"""
    health_max_repetition_rise: Optional[float] = 0.2
    """trip when the responses' mean repeated word-trigram fraction rises more than this above the first update's
    (loops); None = off"""
    health_max_duplicate_rise: Optional[float] = 0.25
    """trip when the share of responses that are word for word another prompt's response rises more than this above
    the first update's (one answer for every prompt); None = off"""
    health_max_probe_gap_rise: Optional[float] = 0.5
    """trip when the validation probe's RM score, minus that of its reference summaries, rises more than this (RM
    units) above the first update's: a jump the offline gold judge showed to be reward hacking; None = off"""
    health_max_update_kl: Optional[float] = 0.1
    """trip at once (no patience) when the update's own mean approximate KL (`ppo/policy/approxkl_avg`, per token)
    exceeds this: one update that moved the policy far enough to wreck it, caught before its policy is sampled; the
    rollback goes to the update before it; None = off"""


@dataclass
class Derived:
    """Values computed from Args and the number of processes; never flags."""

    world_size: int
    local_batch_size: int
    local_mini_batch_size: int
    gradient_accumulation_steps: int
    num_updates: int


def derive(args: Args, world_size: int) -> Derived:
    """Batch arithmetic of the reference [N+ 1.D.4]; every division must be exact."""

    def exact_div(a: int, b: int, what: str) -> int:
        if a % b:
            raise ValueError(f"{what}: {a} is not a multiple of {b}")
        return a // b

    local_batch_size = exact_div(args.batch_size, world_size, "--batch_size over processes")
    local_mini_batch_size = exact_div(local_batch_size, args.nminibatches, "per-process batch over --nminibatches")
    grad_accum = exact_div(local_mini_batch_size, args.local_micro_batch_size,
                           "minibatch over --local_micro_batch_size")
    exact_div(args.validation_probe_size, world_size, "--validation_probe_size over processes")
    check_episodes(args.total_episodes, args.batch_size)
    num_updates = args.total_episodes // args.batch_size
    if num_updates < 1:
        raise ValueError(f"--total_episodes {args.total_episodes} is smaller than --batch_size {args.batch_size}")
    if args.whiten_rewards and local_mini_batch_size < 8:  # the reference's assert [N+ 1.D.16]
        raise ValueError(f"per-process minibatch {local_mini_batch_size} is too small to whiten rewards (need >= 8)")
    if args.keep_states < 1:
        raise ValueError(f"--keep_states {args.keep_states}: keep at least the newest state")
    if not 0 <= args.critic_warmup_updates < num_updates:
        raise ValueError(f"--critic_warmup_updates {args.critic_warmup_updates} must be >= 0 and leave at least one "
                         f"of the run's {num_updates} updates to the policy")
    if args.penalty_reward_value is not None and args.missing_eos_penalty is not None:
        raise ValueError("choose one missing-EOS rule: --penalty_reward_value (replace) or --missing_eos_penalty "
                         "(subtract, with --penalty_reward_value None)")
    return Derived(world_size, local_batch_size, local_mini_batch_size, grad_accum, num_updates)


# ---------------------------------------------------------------------------------------------------------
# Data: query formatting, smart truncation and padding [N+ 1.A]. Copied verbatim from sft_tldr.py so the three
# stages build identical queries; a test checks the copies stay identical.
# ---------------------------------------------------------------------------------------------------------

QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"  # [N+ 1.A.3], no trailing space


def load_chain_tokenizer(sft_model_path: str, reward_model_path: str):
    """The tokenizer saved with the SFT checkpoint, checked against the RM's [N+ 1.A.1].

    PPO adds no token: the policy samples ids the RM must read, and masks come from the pad id, so both
    checkpoints must share one vocabulary with a pad token distinct from EOS (pad == EOS would mask every real
    EOS: the policy could never learn to stop, and the score would not be read at it)."""
    from transformers import AutoTokenizer

    tokenizers = {p: AutoTokenizer.from_pretrained(p, padding_side="right")
                  for p in (sft_model_path, reward_model_path)}
    for path, tok in tokenizers.items():
        if tok.eos_token_id is None or tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
            raise ValueError(f"tokenizer at {path}: needs an EOS and a distinct pad token (eos={tok.eos_token_id}, "
                             f"pad={tok.pad_token_id}); train the chain with sft_tldr.py, which adds [PAD]")
    policy_tok, rm_tok = tokenizers[sft_model_path], tokenizers[reward_model_path]
    for what, a, b in (("eos id", policy_tok.eos_token_id, rm_tok.eos_token_id),
                       ("pad id", policy_tok.pad_token_id, rm_tok.pad_token_id),
                       ("vocabulary", policy_tok.get_vocab(), rm_tok.get_vocab())):
        if a != b:
            raise ValueError(f"the SFT and RM tokenizers differ in their {what}: {sft_model_path} and "
                             f"{reward_model_path} are not one SFT -> RM chain")
    return policy_tok


def format_query(subreddit: str, title: str, post: str) -> str:
    return QUERY_FORMAT.format(subreddit=subreddit, title=title, post=post)


def truncated_query_tokens(tokenizer, row: dict, query_length: int) -> list[int]:
    """Token ids of the formatted query, shortening the post until it fits `query_length` [N+ 1.A.5].

    Port of OpenAI's smart truncation: cut the post just before its last newline; with no newline left, drop
    one character; re-encode and check again. A row whose query cannot fit is an error naming the row."""
    post = row["post"]
    while True:
        ids = tokenizer.encode(format_query(row["subreddit"], row["title"], post), add_special_tokens=False)
        if len(ids) <= query_length:
            return ids
        if not post:
            raise ValueError(
                f"row id={row.get('id')!r}: the query does not fit {query_length} tokens even with an empty post "
                f"(subreddit and title alone are too long)"
            )
        cut = post.rfind("\n")
        post = post[:cut] if cut >= 0 else post[:-1]


def left_pad(ids: list[int], length: int, pad_id: int) -> list[int]:
    """Left-pad to exactly `length` [N+ 1.A.6]; queries are left-padded so generation continues from the end."""
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens do not fit {length}")
    return [pad_id] * (length - len(ids)) + ids


def right_pad(ids: list[int], length: int, pad_id: int) -> list[int]:
    """Right-pad to exactly `length` [N+ 1.A.7]."""
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens do not fit {length}")
    return ids + [pad_id] * (length - len(ids))


def response_tokens(tokenizer, text: str, response_length: int) -> tuple[list[int], bool]:
    """Ids of `text` followed by EOS, cut to `response_length`; returns (ids, was_truncated).

    EOS is appended as an id rather than as the string "<|endoftext|>" so it is the real special token for
    any tokenizer. A cut response loses its EOS; callers count such rows and log them."""
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids[:response_length], len(ids) > response_length


def tokenize_queries(dataset, tokenizer, args: Args):
    """Add query_token (left-padded to Q) and reference_response_token (right-padded to R) to every split [N+ 1.A]."""
    pad, Q, R = tokenizer.pad_token_id, args.query_length, args.response_length

    def process(row):  # the rows passed `drop_bad_rows`
        query = truncated_query_tokens(tokenizer, row, Q)  # [N+ 1.A.5]
        reference, _ = response_tokens(tokenizer, " " + row["summary"], R)  # [N+ 1.A.7] leading space + EOS
        return {
            "query_token": left_pad(query, Q, pad),  # [N+ 1.A.6]
            "query": tokenizer.decode(query, skip_special_tokens=True),
            "reference_response_token": right_pad(reference, R, pad),
        }

    return dataset.map(process, load_from_cache_file=False, desc="tokenizing")


def prompt_indices(num_rows: int, seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start+count) of an endless stream of shuffled passes over `num_rows` prompts [N+ 1.D.5].

    Pass p is `randperm(num_rows)` drawn from `seed + p`, the same on every rank (the reference also seeds its
    DataLoader shuffle with the global seed). A batch may straddle two passes, so every batch is full, and the data
    position of a run is the single integer `start`."""
    out: list[int] = []
    while count > 0:
        p, offset = divmod(start, num_rows)
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + p))
        take = perm[offset : offset + count].tolist()
        out += take
        start += len(take)
        count -= len(take)
    return out


# ---------------------------------------------------------------------------------------------------------
# Helper math [N+ 2]. Masks are True on valid (real) positions. Shapes: B batch, R response length.
# ---------------------------------------------------------------------------------------------------------


def first_true_indices(bools: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    """Per row, the index of the first True; the row length where there is none [N+ 2]."""
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def truncate_response(responses: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Keep everything up to and including the first EOS; replace every later token with padding [N+ 1.B.12]."""
    eos_idx = first_true_indices(responses == eos_token_id).unsqueeze(-1)
    idxs = torch.arange(responses.size(1), device=responses.device).view(1, -1)
    return torch.masked_fill(responses, idxs > eos_idx, pad_token_id)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them [N+ 1.D.23]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def trim_padding_columns(ids: torch.Tensor, pad_token_id: int, side: Literal["left", "right"]) -> torch.Tensor:
    """Drop the leading (left) or trailing (right) columns that are padding in every row of the batch."""
    real = (ids != pad_token_id).any(0)
    if not real.any():
        return ids[:, :1]
    nz = real.nonzero().flatten()
    return ids[:, nz[0] :] if side == "left" else ids[:, : nz[-1] + 1]


def kept_response_length(sequence_lengths: torch.Tensor, response_length: int) -> int:
    """Response columns a forward must compute so that every position a loss reads is computed: up to EOS+1 (the
    value model's last position, `response_masks`) of the longest response; all R when one has no EOS."""
    return min(response_length, int(sequence_lengths.max().item()) + 2)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the True positions of the whole tensor: a token mean, not a mean of per-sequence means [N+ 2].

    An empty mask gives 0 (the reference divides by zero): a micro-batch whose responses are all padding then adds
    nothing to the loss instead of turning the update into NaN."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the True positions; with `unbiased`, times Bessel's n/(n-1) [N+ 2].

    Raises on an empty mask, and on an unbiased variance of a single value (n/(n-1) would divide by zero)."""
    n = mask.bool().sum()
    if n == 0:
        raise ValueError("masked_var: the mask is empty (no real token to take a variance over)")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        if n == 1:
            raise ValueError("masked_var: the unbiased variance of one value is undefined; use unbiased=False or a "
                             "larger batch")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) with masked statistics and the *biased* variance, as the reference (and
    TF's tf.nn.moments in OpenAI's code) [N+ 2]. `shift_mean=False` adds the mean back (used for rewards)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask, unbiased=False)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def learning_rates(learning_rate: float, update: int, num_updates: int, anneal: bool,
                   critic_warmup_updates: int = 0, value_learning_rate: Optional[float] = None) -> tuple[float, float]:
    """(policy LR, value-model LR) of a 1-based update. [N+ 1.D.2] linear annealing, lr * (1 - (update-1)/updates),
    set by hand at the start of every update; with --critic_warmup_updates W the first W updates give the policy LR 0
    and the value model its full LR, and the annealing runs over the remaining updates (W = 0: the paper). The value
    model's LR is `value_learning_rate` when given (None: the paper's shared LR)."""
    value_lr = learning_rate if value_learning_rate is None else value_learning_rate
    if update <= critic_warmup_updates:
        return 0.0, value_lr
    done, total = update - 1 - critic_warmup_updates, num_updates - critic_warmup_updates
    scale = 1.0 - done / total if anneal else 1.0
    return learning_rate * scale, value_lr * scale


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the True positions (biased variances): 1 when the value model
    predicts the GAE returns exactly, 0 when it does no better than their mean, negative when worse. 0 when the
    returns do not vary (nothing to explain)."""
    target = masked_var(returns, mask, unbiased=False)
    if target.item() == 0:
        return 0.0
    return (1.0 - masked_var(returns - values, mask, unbiased=False) / target).item()


def response_masks(postprocessed_responses: torch.Tensor, pad_token_id: int):
    """Index of each response's last real token and the two padding masks (True on padding) [N+ 1.D.10, 1.D.14].

    `sequence_lengths` (B,) is the EOS index when the truncated response has one, else R-1 (the last token); as in
    the reference it is found from the first pad id, so a pad id sampled by the policy also ends the response.
    `padding_mask` (B, R) marks the positions after it: the policy trains on every token up to and including EOS.
    `padding_mask_p1` ("plus one") marks the positions after EOS+1: the value model also learns the position just
    after EOS, where the reference places the score (`compute_rewards`), so that V(EOS+1) learns the score and GAE
    carries it back to the EOS token. The reference's drawing:
    https://excalidraw.com/#json=LWnzG4w2k5DjF_EOL_xPt,e2w3a-hFJ_gX5vOfeyXGTw"""
    sequence_lengths = first_true_indices(postprocessed_responses == pad_token_id) - 1
    response_idxs = torch.arange(postprocessed_responses.shape[1], device=postprocessed_responses.device).view(1, -1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    padding_mask_p1 = response_idxs > (sequence_lengths + 1).unsqueeze(1)
    return sequence_lengths, padding_mask, padding_mask_p1


def apply_missing_eos_penalty(scores: torch.Tensor, contain_eos: torch.Tensor, penalty_reward_value: Optional[float],
                              missing_eos_penalty: Optional[float]) -> torch.Tensor:
    """Scores of responses without EOS [N+ 1.D.13]: replaced by `penalty_reward_value` (the reference, -1), or
    lowered by `missing_eos_penalty` (TRL); both None leaves them alone."""
    if penalty_reward_value is not None:
        scores = torch.where(contain_eos, scores, torch.full_like(scores, penalty_reward_value))
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~contain_eos).to(scores.dtype)
    return scores


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs [N+ 1.D.15].

    k1 = log pi - log pi_ref: unbiased, negative on some tokens (the reference). k3 = (r - 1) - log r with
    r = pi_ref / pi: unbiased and >= 0 (Schulman's blog "Approximating KL divergence"; TRL's option). Both are
    exactly 0 where both inputs hold INVALID_LOGPROB (padding)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def compute_rewards(kl: torch.Tensor, scores: torch.Tensor, sequence_lengths: torch.Tensor, kl_coef: float,
                    score_at: str = "eos_p1"):
    """Per-token rewards (B, R) = -kl_coef * kl everywhere, plus each sequence's score at one position [N+ 1.D.15].

    `eos_p1` (the reference): the score sits at sequence_length + 1, the first slot after EOS, or at the last
    position when EOS is the last token or missing. `eos`: at the EOS token (sequence_length). Returns
    (rewards, non_score_reward)."""
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    if score_at == "eos_p1":
        end = torch.where(sequence_lengths + 1 < rewards.size(1), sequence_lengths + 1, sequence_lengths)
    elif score_at == "eos":
        end = sequence_lengths
    else:
        raise ValueError(f"unknown score position {score_at!r}")
    end = end.clamp(min=0)  # a response whose first token is the pad id has sequence_length -1
    rewards[torch.arange(rewards.size(0), device=rewards.device), end] += scores
    return rewards, non_score_reward


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over (B, R) tensors [N+ 1.D.17, 2]; returns (advantages, returns).

    delta_t = r_t + gamma V_{t+1} - V_t with V_R = 0; A_t = delta_t + gamma lam A_{t+1}; returns = A + V, taken
    before any whitening. The loop runs over every position: padding adds nothing because rewards and values are
    0 there."""
    lastgaelam = 0.0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float):
    """PPO's clipped surrogate, a token mean over `mask` [N+ 2]; returns (loss, ratio, clipped).

    loss = mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps))); `clipped` (bool, B x R) marks where the clipped
    term is the larger one (the clip fraction's numerator)."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    return loss, ratio, pg_losses2 > pg_losses


def value_loss(vpred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: Optional[float]):
    """Clipped value loss 0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2)) over `mask` [N+ 2];
    returns (loss, clipped). `cliprange_value=None` leaves V unclipped: the plain squared error (a critic warm-up)."""
    vpredclipped = (vpred if cliprange_value is None
                    else torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value))
    vf_losses1 = torch.square(vpred - returns)
    vf_losses2 = torch.square(vpredclipped - returns)
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    return loss, vf_losses2 > vf_losses1


# The per-micro-batch statistics of the PPO epochs [N+ 3], stacked in this order: masked means over real tokens, and
# the reference's means over padding too (`_with_padding`)
STAT_NAMES = ("approxkl", "approxkl_with_padding", "pg_clipfrac", "pg_clipfrac_with_padding", "pg_loss", "vf_loss",
              "vf_clipfrac", "entropy", "entropy_with_padding", "ratio", "ratio_with_padding")


def minibatch_stats(logits: torch.Tensor, new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, valid: torch.Tensor,
                    value_valid: torch.Tensor, pg_loss: torch.Tensor, vf_loss: torch.Tensor, pg_clipped: torch.Tensor,
                    vf_clipped: torch.Tensor, ratio: torch.Tensor, temperature: float):
    """(the STAT_NAMES statistics of one micro-batch (len(STAT_NAMES),), the largest |new - old log-prob| over its
    real tokens). approxkl = 0.5 (log pi_new - log pi_old)^2; entropy of the temperature-scaled next-token
    distribution, logsumexp(z) - sum softmax(z) z. logits (b, L, V); the others (b, L) or scalars."""
    logprobs_diff = new_logprobs - old_logprobs
    approxkl = 0.5 * logprobs_diff**2
    scaled = logits / (temperature + 1e-7)
    entropy = torch.logsumexp(scaled, dim=-1) - torch.sum(F.softmax(scaled, dim=-1) * scaled, dim=-1)  # (b, L)
    stats = torch.stack([
        masked_mean(approxkl, valid), approxkl.mean(),
        masked_mean(pg_clipped.float(), valid), pg_clipped.float().mean(),
        pg_loss.detach(), vf_loss.detach(),
        masked_mean(vf_clipped.float(), value_valid),
        masked_mean(entropy, valid), entropy.mean(),
        masked_mean(ratio, valid), ratio.mean(),
    ])
    return stats, torch.where(valid, logprobs_diff.abs(), 0.0).max()

# ---------------------------------------------------------------------------------------------------------
# Models: the value/reward wrapper, policy+value in one module, forward passes and generation
# ---------------------------------------------------------------------------------------------------------


class NormalizedScalarModel(nn.Module):
    """Per-position scalar outputs of a reward-model checkpoint, minus its normalisation bias [N+ 1.C.1, 1.C.11].

    Wraps a standard `AutoModelForSequenceClassification` (num_labels=1): the backbone's last hidden state goes
    through the `score` head at every position, and `config.reward_bias` is subtracted, as the reference's
    ScalarModel does (reward_tldr.py's ScalarModel returns the raw scores it trains). Both the frozen reward model
    and the value model use it [N+ 1.D.1]; a module (not a function) so that DDP's and DeepSpeed's forward hooks
    run.

    `value_head_bias` (the value model): a bias on the head, 0 at the start, which the value loss trains, as the
    bias of the reference's `scalar_head` [N+ 1.C.2, 1.D.1]. The RM's head has none: its pairwise loss gives a bias no
    gradient, so the reference's stayed 0 (reward_tldr.py), but the value loss does move it."""

    def __init__(self, model, value_head_bias: bool = False):
        super().__init__()
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"reward model has num_labels={model.config.num_labels}; expected 1")
        self.model = model
        self.reward_bias = float(getattr(model.config, "reward_bias", 0.0))
        self.value_bias = nn.Parameter(torch.zeros(1)) if value_head_bias else None  # (1,)

    def forward(self, input_ids, attention_mask, position_ids):
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state  # (B, T, H)
        scores = self.model.score(hidden).squeeze(-1) - self.reward_bias  # (B, T)
        return scores if self.value_bias is None else scores + self.value_bias


class PolicyAndValueWrapper(nn.Module):
    """Policy and value model as one module, so accelerate/DeepSpeed see one model and one optimizer [N+ 1.D.1].

    They remain separate networks (no shared trunk); one call runs both on the same ids."""

    def __init__(self, policy, critic: NormalizedScalarModel):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.policy(**kwargs, use_cache=False, logits_to_keep=logits_to_keep), self.critic(**kwargs)


def fp32_head(linear: nn.Linear) -> None:
    """Run one output projection in fp32 under bf16/fp16 autocast (a no-op in fp32 runs).

    The PPO ratio compares log-probs from two different computations (the sampler's incremental forward and the
    training forward); with bf16 logits each carries its own rounding, up to 0.3 nats per token for SmolLM2 on CPU,
    so the first minibatch is no longer on-policy. Upcasting the last hidden state and the head's weight for this one
    matmul leaves only the (much smaller) bf16 noise of the trunk. Set on the instance, so the module, its tied weight
    and the saved checkpoint are unchanged."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            bias = None if linear.bias is None else linear.bias.float()
            return F.linear(hidden.float(), linear.weight.float(), bias)

    linear.forward = forward


def disable_dropout(model: torch.nn.Module) -> None:
    """Set p=0 in every dropout layer [N+ 1.B.2]: stochastic forwards would make PPO's ratio differ from 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


def forward(model, ids: torch.Tensor, pad_token_id: int, **kwargs):
    """A forward pass with the mask and positions derived from padding [N+ 1.B.5, 1.D.23].

    The reference also replaces pad ids by 0 in `input_ids`; the pad id always has an embedding row here
    (`fit_embeddings`), and keeping it lets HF's sequence-classification pooling find the padding. `kwargs` go to
    the model (`logits_to_keep` for causal LMs)."""
    mask = ids != pad_token_id
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), **kwargs)


def sampling_config(response_length: int, temperature: float):
    """Generation settings for exactly `response_length` sampled tokens [N+ 1.B.10].

    The reference sets min_new_tokens = max_new_tokens and clears eos/pad ids on the model. With transformers 5,
    `generate` refills unset fields from `model.generation_config`, and an EOS id restored there plus a min
    length makes EOS unsampleable; so the caller clears those ids on the model (`prepare_for_sampling`) and no
    min length is set: with no EOS id, generation cannot stop early anyway."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=response_length,
        temperature=temperature + 1e-7,  # [N+ 1.B.10] as the reference; avoids a zero temperature
        top_k=0,
        top_p=1.0,
        do_sample=True,
    )


@torch.no_grad()
def generate(model, queries: torch.Tensor, pad_token_id: int, generation_config) -> torch.Tensor:
    """Sample responses for left-padded queries; returns (B, R) response ids [N+ 1.B.11].

    HF generate derives positions from the attention mask, like our forward passes."""
    out = model.generate(input_ids=queries, attention_mask=queries != pad_token_id, generation_config=generation_config)
    return out[:, queries.shape[1] :]


def rollout_generation_config(args: Args, tokenizer, temperature: float):
    """`sampling_config` [N+ 1.D.6], plus EOS and pad ids when --stop_generation_at_eos lets generation stop."""
    config = sampling_config(args.response_length, temperature)
    if args.stop_generation_at_eos:
        config.eos_token_id = tokenizer.eos_token_id  # finished rows are filled with the pad id
        config.pad_token_id = tokenizer.pad_token_id
    return config


@torch.no_grad()
def generate_with_logprobs(model, queries: torch.Tensor, pad_token_id: int, generation_config, response_length: int):
    """Sample responses for left-padded queries and the log-probs of the sampled tokens [N+ 1.D.6, 1.D.7].

    The log-probs come from the generation scores, i.e. the logits after HF's temperature warper (logits / T; with
    top_k=0 and top_p=1 no other processor runs), not from a second forward pass. Returns (B, R) responses,
    right-padded with the pad id if generation stopped early, and (B, R) log-probs, INVALID_LOGPROB where no token
    was generated."""
    config = copy.deepcopy(generation_config)
    config.output_scores, config.return_dict_in_generate = True, True
    out = model.generate(input_ids=queries, attention_mask=queries != pad_token_id, generation_config=config)
    responses = out.sequences[:, queries.shape[1] :]  # (B, L), L <= R
    logits = torch.stack(out.scores, 1)  # (B, L, V): logits / T of the distribution each token was drawn from
    logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, responses.unsqueeze(-1)).squeeze(-1)  # (B, L)
    missing = response_length - responses.shape[1]
    responses = F.pad(responses, (0, missing), value=pad_token_id)
    logprobs = F.pad(logprobs, (0, missing), value=INVALID_LOGPROB)
    return responses, logprobs


def response_logits(logits: torch.Tensor, response_length: int) -> torch.Tensor:
    """(B, R, V) logits that predict the R response tokens: position Q-1+t predicts response token t and the last
    position predicts nothing [N+ 1.D.8]. Works on full (B, Q+R, V) logits and on the (B, R+1, V) ones that
    `logits_to_keep=R+1` returns (--response_logits_only)."""
    return logits[:, -response_length - 1 : -1]


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, R) log-probs of the response tokens under logits / (T + 1e-7) [N+ 1.D.8, 1.D.19]."""
    logits = logits.float() / (temperature + 1e-7)
    return torch.gather(F.log_softmax(logits, dim=-1), 2, responses.unsqueeze(-1)).squeeze(-1)


def get_score(reward_model, query_responses: torch.Tensor, pad_token_id: int, context_length: int) -> torch.Tensor:
    """(B,) reward-model output at each response's last real token: its EOS when it has one [N+ 1.C.5, 1.D.12]."""
    rewards = forward(reward_model, query_responses, pad_token_id)  # (B, T)
    sequence_lengths = first_true_indices(query_responses[:, context_length:] == pad_token_id) - 1 + context_length
    return rewards[torch.arange(rewards.size(0), device=rewards.device), sequence_lengths]


@torch.no_grad()
def sample_and_score(policy, reward_model, queries: torch.Tensor, tokenizer, generation_config):
    """Evaluation samples (truncated after EOS) and their RM scores, without any EOS penalty [N+ 1.D.24-25].

    Returns (left-trimmed queries, responses, scores)."""
    pad = tokenizer.pad_token_id
    queries = trim_padding_columns(queries, pad, "left")
    responses = truncate_response(generate(policy, queries, pad, generation_config), tokenizer.eos_token_id, pad)
    scores = get_score(reward_model, torch.cat((queries, responses), 1), pad, queries.shape[1])
    return queries, responses, scores


@torch.no_grad()
def evaluate(policy, reward_model, tokenizer, dataset, args: Args, accelerator, generation_config):
    """Sample every query of a split at eval_temperature; score response and reference summary [N+ 1.D.25]."""
    import pandas as pd

    pad = tokenizer.pad_token_id
    loader = torch.utils.data.DataLoader(
        dataset.with_format("torch", columns=["id", "query_token", "reference_response_token"]),
        batch_size=args.local_eval_batch_size,
    )
    loader = accelerator.prepare_data_loader(loader)
    table = {k: [] for k in ("id", "query", "response", "reference", "score", "reference_score")}
    lengths = []
    decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    from tqdm.auto import tqdm

    # sampling a few hundred prompts takes minutes on a CPU: show it
    for batch in tqdm(loader, desc="evaluation", disable=not accelerator.is_local_main_process):
        queries, responses, scores = sample_and_score(policy, reward_model, batch["query_token"], tokenizer,
                                                      generation_config)
        reference = batch["reference_response_token"]
        reference_scores = get_score(reward_model, torch.cat((queries, reference), 1), pad, queries.shape[1])
        table["id"] += accelerator.gather_for_metrics(batch["id"], use_gather_object=True)
        table["query"] += accelerator.gather_for_metrics(decode(queries), use_gather_object=True)
        table["response"] += accelerator.gather_for_metrics(decode(responses), use_gather_object=True)
        table["reference"] += accelerator.gather_for_metrics(decode(reference), use_gather_object=True)
        table["score"] += accelerator.gather_for_metrics(scores.float()).tolist()
        table["reference_score"] += accelerator.gather_for_metrics(reference_scores.float()).tolist()
        lengths += accelerator.gather_for_metrics((responses != pad).sum(1)).tolist()
    df = pd.DataFrame(table)
    metrics = {"score": float(df["score"].mean()), "reference_score": float(df["reference_score"].mean()),
               "response_length": float(np.mean(lengths))}
    return df, metrics


# ---------------------------------------------------------------------------------------------------------
# Health monitor: judge-free signals of the running policy, checked every update; a check that fails
# --health_patience updates in a row trips, writes an incident and rolls back (README "Watching a run").
# Not in the paper; it changes no math until a check trips.
# ---------------------------------------------------------------------------------------------------------

# Every check but the KL compares an update with the first one, whose rollouts come from the starting (SFT) policy:
# a drift is measured against what this model does before PPO, so the same thresholds fit any model size.
# check name -> (signal, Args field holding its upper limit)
HEALTH_CHECKS = {
    "eos_drop": ("health/eos_drop", "health_max_eos_drop"),
    "kl": ("health/kl", "health_max_kl"),
    "length_drift": ("health/length_drift", "health_max_length_drift"),
    "entropy_rise": ("health/entropy_rise", "health_max_entropy_rise"),
    "repetition_rise": ("health/repetition_rise", "health_max_repetition_rise"),
    "duplicate_rise": ("health/duplicate_rise", "health_max_duplicate_rise"),
    "probe_gap_rise": ("health/probe_gap_rise", "health_max_probe_gap_rise"),
    "update_kl": ("health/update_kl", "health_max_update_kl"),
}
# Checks of the finished update itself rather than of its rollouts (which come from the previous update's policy):
# they indict the policy the update just made, so they trip at once and the last healthy policy is the update before.
UPDATE_CHECKS = ("update_kl",)


def repeated_trigram_fraction(text: str) -> float:
    """1 - distinct/total over the lower-cased word trigrams of `text` (0 below three words): 0 for ordinary prose,
    towards 1 for a response that loops."""
    words = text.lower().split()
    trigrams = list(zip(words, words[1:], words[2:]))
    return 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def duplicate_share(texts: list[str]) -> float:
    """Share of responses whose whitespace-normalised text is also the response to another prompt of the batch: 0
    when every prompt gets its own answer, 1 when the policy says the same thing to everyone."""
    keys = [" ".join(t.lower().split()) for t in texts]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return sum(counts[k] > 1 for k in keys) / len(keys) if keys else 0.0


def health_raw(eos_rate: float, length: float, entropy_per_token: float, texts: list[str],
               probe_gap: Optional[float] = None) -> dict:
    """The quantities the checks follow, for one update's rollouts (probe_gap: the validation probe's mean RM score
    minus that of its reference summaries)."""
    raw = {"eos_rate": eos_rate, "length": length, "entropy": entropy_per_token,
           "repetition": float(np.mean([repeated_trigram_fraction(t) for t in texts])) if texts else 0.0,
           "duplicates": duplicate_share(texts)}
    if probe_gap is not None:
        raw["probe_gap"] = probe_gap
    return raw


def health_signals(raw: dict, baseline: dict, kl: float, update_kl: Optional[float] = None) -> dict:
    """The checked signals: each raw quantity's change from the first update's (`baseline`), the KL, and the
    update's own mean approximate KL.

    eos_drop        1 - EOS rate / the first update's (0 while the policy ends its responses as SFT did)
    length_drift    |mean response length / the first update's - 1|
    entropy_rise    per-token entropy of the rollouts / the first update's - 1
    repetition_rise mean repeated word-trigram fraction - the first update's
    duplicate_rise  share of responses identical to another prompt's - the first update's
    probe_gap_rise  (probe RM score - its references' RM score) - the first update's
    update_kl       mean approximate KL per token between the policy during the update's training and its rollouts'"""
    def ratio(key):
        return raw[key] / baseline[key] if baseline[key] > 0 else 1.0

    signals = {"health/eos_rate": raw["eos_rate"], "health/repeated_trigrams": raw["repetition"],
               "health/duplicate_share": raw["duplicates"], "health/kl": kl,
               "health/eos_drop": 1.0 - ratio("eos_rate"), "health/length_drift": abs(ratio("length") - 1.0),
               "health/entropy_rise": ratio("entropy") - 1.0,
               "health/repetition_rise": raw["repetition"] - baseline["repetition"],
               "health/duplicate_rise": raw["duplicates"] - baseline["duplicates"]}
    if update_kl is not None:
        signals["health/update_kl"] = update_kl
    if "probe_gap" in raw and "probe_gap" in baseline:
        signals["health/probe_gap"] = raw["probe_gap"]
        signals["health/probe_gap_rise"] = raw["probe_gap"] - baseline["probe_gap"]
    return signals


def failing_checks(signals: dict, thresholds: dict) -> dict:
    """{check: (value, limit)} for every enabled check (limit not None) whose signal is above its limit."""
    failing = {}
    for name, (key, _) in HEALTH_CHECKS.items():
        limit = thresholds.get(name)
        if limit is not None and key in signals and signals[key] > limit:
            failing[name] = (signals[key], limit)
    return failing


# ---------------------------------------------------------------------------------------------------------
# Training: the stage itself, read top to bottom
# ---------------------------------------------------------------------------------------------------------
def train_ppo(args: Args, stop: "StopOnSignal"):
    """The stage itself; `stop.received` is read once per update."""
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    accelerator = make_accelerator()
    derived = check_launch(args, accelerator)  # flags, processes, DeepSpeed: before the first file is written
    device = accelerator.device

    # ---- resume: read the saved state first, so the run keeps its name, folder and position
    checkpoint, resumed = resume_state(args, derived.world_size, RESUMABLE_CHANGES, accelerator.print)
    run_name = [resumed["run_name"] if resumed else f"{args.exp_name}__{args.seed}__{int(time.time())}"]
    broadcast_object_list(run_name)  # one name on every rank, also when their clocks tick apart
    run_name = run_name[0]
    args.output_dir = args.output_dir or os.path.join("runs", run_name)

    # ---- data [N+ 1.A, 1.D.5]
    check_model_source(args.sft_model_path, "--sft_model_path", ("causal_lm",))
    check_model_source(args.reward_model_path, "--reward_model_path", ("reward_model",))
    tokenizer = load_chain_tokenizer(args.sft_model_path, args.reward_model_path)
    pad, eos, R = tokenizer.pad_token_id, tokenizer.eos_token_id, args.response_length
    logits_kept = R + 1 if args.response_logits_only else 0  # HF `logits_to_keep`: the last R+1 positions, or all
    dataset, data_metrics, probe = load_prompts(args, tokenizer, accelerator, derived)  # probe: None when size 0
    train_queries = dataset["train"].with_format("torch", columns=["query_token"])[:]["query_token"]  # (N, Q)
    with_probe = probe is not None

    # ---- seeds [N+ 1.B.9]: each rank samples with its own seed; the prompt order comes from the global seed
    local_seed = args.seed + accelerator.process_index * 100003
    seed_everything(local_seed)
    torch.backends.cudnn.deterministic = True

    # ---- four models [N+ 1.D.1], dropout off in all [N+ 1.B.2]
    attn = attention_kernel(args.attn_implementation, device.type, accelerator.mixed_precision)
    load = dict(dtype=torch.float32, attn_implementation=attn)
    # every weight must come from the checkpoints: a random LM head or value head would train silently
    policy, _ = load_checked(AutoModelForCausalLM, args.sft_model_path, "--sft_model_path", **load)
    ref_policy, _ = load_checked(AutoModelForCausalLM, args.sft_model_path, "--sft_model_path", **load)
    rm_path = args.reward_model_path
    # the value model = the RM, plus a trained head bias starting at 0
    critic = NormalizedScalarModel(load_checked(AutoModelForSequenceClassification, rm_path, "--reward_model_path",
                                                **load)[0], value_head_bias=True)
    reward_model = NormalizedScalarModel(load_checked(AutoModelForSequenceClassification, rm_path,
                                                      "--reward_model_path", **load)[0])
    check_output_dir(args.output_dir)
    if accelerator.is_main_process:
        if resumed is None:  # a fresh run never appends to an older run's records
            set_aside_previous_run(args.output_dir, accelerator.print)
        write_run_info(args.output_dir, args, derived, accelerator.mixed_precision)
    for m in (policy, ref_policy, critic.model, reward_model.model):
        disable_dropout(m)
    ref_policy.config.use_cache = False  # full forwards only: do not keep a KV cache of every query
    if args.fp32_heads:  # LM heads (log-probs, KL) and value/reward heads in fp32 under mixed precision
        for m in (policy, ref_policy):
            fp32_head(m.get_output_embeddings())
        for m in (critic.model, reward_model.model):
            fp32_head(m.score)
    # A fresh generation config: the checkpoint's own may carry EOS ids or processors (repetition penalty, ...) that
    # generate() would merge into ours and that the training forward would not reproduce [N+ 1.D.6].
    policy.generation_config = sampling_config(args.response_length, args.temperature)
    if args.gradient_checkpointing:
        for m in (policy, critic.model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PolicyAndValueWrapper(policy, critic)
    # [N+ 1.D.2] one AdamW for both networks, so one LR; torch's default betas and weight decay. Two parameter
    # groups with the same settings (the same update rule) so that --critic_warmup_updates can hold the policy still
    optimizer = torch.optim.AdamW([{"params": list(model.policy.parameters())},
                                   {"params": list(model.critic.parameters())}],
                                  lr=args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay,
                                  **{args.adam_impl: True})

    # [N+ 1.D.22] policy + value in the DeepSpeed engine (ZeRO-2 in the paper); no clipping unless --max_grad_norm
    ds_config = configure_deepspeed(accelerator, args.local_micro_batch_size, args.max_grad_norm)
    if args.offload:
        ds_config["checkpoint"] = {"use_node_local_storage": True}
    model, optimizer = accelerator.prepare(model, optimizer)
    write_deepspeed_config(accelerator, args.output_dir)
    reward_model, ref_policy = prepare_frozen_models(accelerator, args, reward_model, ref_policy)
    reward_model.eval()
    ref_policy.eval()
    unwrapped = accelerator.unwrap_model(model)  # .policy samples, .critic gives rollout values
    rollout_config = rollout_generation_config(args, tokenizer, args.temperature)  # [N+ 1.D.6] T=0.7
    eval_config = rollout_generation_config(args, tokenizer, args.eval_temperature)  # [N+ 1.D.24] T=0.01

    # The probe's reference summaries are scored once: the RM is frozen and the probe fixed.
    if with_probe:
        with torch.no_grad(), accelerator.autocast():
            probe_queries = trim_padding_columns(probe["query_token"].to(device), pad, "left")
            probe_reference = probe["reference_response_token"].to(device)
            probe_reference_scores = get_score(reward_model, torch.cat((probe_queries, probe_reference), 1), pad,
                                               probe_queries.shape[1])
            # their mean over every rank: the health monitor's probe gap subtracts it each update
            probe_reference_mean = accelerator.gather(probe_reference_scores.float()).mean().item()

    # the health monitor, and the recipe changes its `continue` action made (kept in every state, so --resume
    # continues with them)
    monitor = HealthMonitor({"eos_drop": args.health_max_eos_drop, "kl": args.health_max_kl,
                             "length_drift": args.health_max_length_drift,
                             "entropy_rise": args.health_max_entropy_rise,
                             "repetition_rise": args.health_max_repetition_rise,
                             "duplicate_rise": args.health_max_duplicate_rise,
                             "probe_gap_rise": args.health_max_probe_gap_rise,
                             "update_kl": args.health_max_update_kl}, args.health_patience)
    health = {"lr_scale": 1.0, "kl_coef": args.kl_coef, "incidents": []}
    start_update, episode, data_position = 1, 0, 0
    if resumed is not None:
        accelerator.load_state(checkpoint)  # weights, optimizer and this rank's RNG states
        start_update, episode, data_position = resumed["update"] + 1, resumed["episode"], resumed["data_position"]
        if "health" in resumed:
            monitor.load_state_dict(resumed["health"]["monitor"])
            health = {k: v for k, v in resumed["health"].items() if k != "monitor"}
        if accelerator.is_main_process:  # drop what the interrupted run logged after its last state
            cut_metrics(args.output_dir, resumed["metrics_lines"])
        accelerator.print(f"resumed from {checkpoint} at update {start_update}, episode {episode}")
    logger = Logger(args.output_dir, accelerator.is_main_process, args, run_name)
    if resumed is None:  # a resumed run kept this record in metrics.jsonl
        logger.log({"episodes": 0, **data_metrics}, 0)
    # rolling back after `patience` failing updates needs a state of every update and the newest patience + 1 of them
    rollback_possible = (args.health_action != "log" and args.save_every == 1
                         and args.keep_states >= args.health_patience + 1)
    if args.health_action != "log" and not rollback_possible:
        accelerator.print(f"health monitor: a tripped check will {args.health_action} without rolling back (that "
                          f"needs --save_every 1 and --keep_states >= {args.health_patience + 1})")
    accelerator.print(
        f"{derived.num_updates} updates x {args.batch_size} rollouts; per process {derived.local_batch_size} = "
        f"{args.local_micro_batch_size} micro x {derived.gradient_accumulation_steps} accumulation x "
        f"{args.nminibatches} minibatches; {derived.world_size} processes"
    )
    local_batch_size, local_mini_batch_size = derived.local_batch_size, derived.local_mini_batch_size

    progress = tqdm(range(start_update, derived.num_updates + 1), initial=start_update - 1, total=derived.num_updates,
                    disable=not accelerator.is_local_main_process, desc="ppo")
    # part 2: resumable states (a state holds the position, and the monitor's state and recipe changes), and the
    # end of every update (metrics, the probe's table, the health monitor and its rollback, a safe point)
    states = RunStates(accelerator, args, run_name, derived.world_size, stop, progress, checkpoint, start_update - 1,
                       episode=episode, data_position=data_position, health={"monitor": monitor.state_dict(), **health})
    if rollback_possible and resumed is None:  # the starting policy, the state to go back to if update 1 goes wrong
        states.save()
    book = UpdateBookkeeping(args, accelerator, logger, tokenizer, monitor, health, states, derived, episode,
                             rollback_possible, probe, (probe_queries, probe_reference, probe_reference_scores,
                                                        probe_reference_mean) if with_probe else None)

    for update in progress:
        episode += args.batch_size
        # [N+ 1.D.2] linear annealing by hand, at the start of every update (policy LR 0 in a critic warm-up)
        lrs = learning_rates(args.learning_rate, update, derived.num_updates, args.anneal_lr,
                             args.critic_warmup_updates, args.value_learning_rate)
        lrnow, lr_value = (lr * health["lr_scale"] for lr in lrs)  # scale 1 unless the monitor's `continue` lowered it
        warming_up = update <= args.critic_warmup_updates
        for group, lr in zip(optimizer.param_groups, (lrnow, lr_value)):
            group["lr"] = lr
        rows = prompt_indices(len(train_queries), args.seed, data_position, args.batch_size)
        data_position += args.batch_size
        local_rows = rows[accelerator.process_index * local_batch_size :][:local_batch_size]
        model.eval()  # no dropout anyway; eval keeps the KV cache on under gradient checkpointing

        # ---- 0. validation probe at T=0.01, scored by the RM [N+ 1.D.24]
        probe_sample = None
        if with_probe:
            with torch.no_grad(), accelerator.autocast():
                _, *probe_sample = sample_and_score(unwrapped.policy, reward_model, probe_queries, tokenizer,
                                                    eval_config)  # [responses, RM scores]
        book.clock.lap("validation_probe")

        # ---- rollouts, in chunks of local_rollout_forward_batch_size [N+ 1.D.6-12]
        # Shapes: B = local batch, b = chunk, Q = query columns left after trimming, R = response length, V = vocab.
        with torch.no_grad(), accelerator.autocast():
            queries = trim_padding_columns(train_queries[local_rows].to(device), pad, "left")  # (B, Q)
            responses, postprocessed_responses, logprobs, ref_logprobs, values, scores = [], [], [], [], [], []
            for i in range(0, local_batch_size, args.local_rollout_forward_batch_size):
                query = trim_padding_columns(queries[i : i + args.local_rollout_forward_batch_size], pad, "left")
                context_length = query.shape[1]
                # 1. sample exactly R tokens at T=0.7; the old log-probs are the generation's own [N+ 1.D.6-7]
                response, logprob = generate_with_logprobs(unwrapped.policy, query, pad, rollout_config, R)  # (b, R)
                book.clock.lap("generation")
                # 3. response processing 1: keep the first EOS, pad everything after it [N+ 1.D.9]
                postprocessed_response = truncate_response(response, eos, pad)  # (b, R)
                # --skip_after_eos: the forwards below compute the first L <= R response columns only
                L = kept_response_length(response_masks(postprocessed_response, pad)[0], R) if args.skip_after_eos else R
                query_response = torch.cat((query, response[:, :L]), 1)  # (b, Q+L)
                # 2. reference log-probs from temperature-scaled logits [N+ 1.D.8]
                ref_output = forward(ref_policy, query_response, pad, logits_to_keep=L + 1 if logits_kept else 0)
                ref_logits = response_logits(ref_output.logits, L)  # (b, L, V)
                ref_logprob = response_logprobs(ref_logits, response[:, :L], args.temperature)  # (b, L)
                del ref_output, ref_logits
                # 4. values of the raw (untruncated) rollout: causal attention keeps positions <= EOS+1 unchanged;
                #    values[t] is the value of the state before response token t [N+ 1.D.11]
                value = forward(unwrapped.critic, query_response, pad)[:, context_length - 1 : -1]  # (b, L)
                # columns past L are padding for every loss; filled here, masked in step 7
                ref_logprob, value = F.pad(ref_logprob, (0, R - L)), F.pad(value, (0, R - L))  # (b, R)
                # 5. response processing 2: the RM scores the truncated response at its EOS token [N+ 1.D.12]
                score = get_score(reward_model, torch.cat((query, postprocessed_response[:, :L]), 1), pad,
                                  context_length)  # (b,)
                book.clock.lap("scoring")
                responses.append(response)
                postprocessed_responses.append(postprocessed_response)
                logprobs.append(logprob)
                ref_logprobs.append(ref_logprob)
                values.append(value)
                scores.append(score)
            responses, postprocessed_responses = torch.cat(responses, 0), torch.cat(postprocessed_responses, 0)  # (B, R)
            query_responses = torch.cat((queries, responses), 1)  # (B, Q+R)
            logprobs, ref_logprobs = torch.cat(logprobs, 0).float(), torch.cat(ref_logprobs, 0).float()  # (B, R)
            values, scores = torch.cat(values, 0).float(), torch.cat(scores, 0).float()  # (B, R), (B,)

            # 6. response processing 3: a response without EOS gets the penalty score (-1) [N+ 1.D.13]
            contain_eos = torch.any(postprocessed_responses == eos, dim=-1)  # (B,)
            scores = apply_missing_eos_penalty(scores, contain_eos, args.penalty_reward_value, args.missing_eos_penalty)

            # 7. masks (True on padding) [N+ 1.D.10, 1.D.14]: the policy trains up to and including EOS
            #    (padding_mask); the value model up to EOS+1 (padding_mask_p1, "plus one"), the slot that holds the
            #    score; with --score_at eos the score sits at EOS and the value model stops there too
            sequence_lengths, padding_mask, padding_mask_p1 = response_masks(postprocessed_responses, pad)
            value_padding_mask = padding_mask_p1 if args.score_at == "eos_p1" else padding_mask
            logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
            ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
            values = torch.masked_fill(values, value_padding_mask, 0)

            # 8. per-token rewards: -0.05 * KL on every token, the score after EOS [N+ 1.D.15]
            kl = kl_penalty(logprobs, ref_logprobs, args.kl_estimator)  # (B, R), 0 on padding
            rewards, non_score_reward = compute_rewards(kl, scores, sequence_lengths, health["kl_coef"],
                                                        args.score_at)  # kl_coef, unless the monitor raised it

            # 9. optional reward whitening, mean kept; off in the released runs [N+ 1.D.16]
            if args.whiten_rewards:
                rewards = masked_whiten(rewards, ~value_padding_mask, shift_mean=False)
                rewards = torch.masked_fill(rewards, value_padding_mask, 0)

            # 10. GAE (gamma 1, lambda 0.95); returns before whitening; advantages whitened with this rank's
            #     statistics over real tokens (biased variance) and zeroed on padding [N+ 1.D.17-18]
            advantages, returns = compute_gae(rewards, values, args.gamma, args.lam)  # (B, R) each
            if args.whiten_advantages:
                advantages = masked_whiten(advantages, ~padding_mask)
            advantages = torch.masked_fill(advantages, padding_mask, 0)
            # divergence: stop before any optimizer step of this update, so no saved state holds a NaN
            states.stop_if_diverged({"objective/scores": scores, "values": values, "logprobs": logprobs,
                                     "ref_logprobs": ref_logprobs, "rewards": rewards, "advantages": advantages,
                                     "returns": returns}, f"update {update} (episode {episode}), rollouts")

        # ---- 11. PPO epochs, a fresh shuffle each; one optimizer step per minibatch [N+ 1.D.19]
        model.train()
        for epoch in range(args.noptepochs):
            b_inds = np.random.permutation(local_batch_size)
            for minibatch, mini_batch_start in enumerate(range(0, local_batch_size, local_mini_batch_size)):
                mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + local_mini_batch_size]
                for micro, micro_start in enumerate(range(0, local_mini_batch_size, args.local_micro_batch_size)):
                    with accelerator.accumulate(model):
                        mb = mini_batch_inds[micro_start : micro_start + args.local_micro_batch_size]
                        # L = R, or with --skip_after_eos the response columns up to the last one a loss reads
                        L = kept_response_length(sequence_lengths[mb], R) if args.skip_after_eos else R
                        mb_query_responses = trim_padding_columns(query_responses[mb], pad, "left")  # (b, Q'+R)
                        mb_query_responses = mb_query_responses[:, : mb_query_responses.shape[1] - R + L]  # (b, Q'+L)
                        mb_context_length = mb_query_responses.shape[1] - L
                        mb_padding_mask, mb_value_padding_mask = padding_mask[mb, :L], value_padding_mask[mb, :L]
                        mb_logprobs, mb_advantages = logprobs[mb, :L], advantages[mb, :L]
                        # one pass through both networks
                        output, vpred_temp = forward(model, mb_query_responses, pad,
                                                     logits_to_keep=L + 1 if logits_kept else 0)
                        logits = response_logits(output.logits, L).float()  # (b, L, V)
                        new_logprobs = response_logprobs(logits, responses[mb, :L], args.temperature)  # (b, L)
                        new_logprobs = torch.masked_fill(new_logprobs, mb_padding_mask, INVALID_LOGPROB)
                        vpred = vpred_temp[:, mb_context_length - 1 : -1].float()  # (b, L)
                        vpred = torch.masked_fill(vpred, mb_value_padding_mask, 0)
                        # (a critic warm-up fits the value model unclipped: a trust region of 0.2 per update
                        # around values it has not fitted yet would hold it near the RM's last-token head)
                        vf_loss, vf_clipped = value_loss(vpred, values[mb, :L], returns[mb, :L],
                                                         ~mb_value_padding_mask,
                                                         None if warming_up else args.cliprange_value)
                        pg_loss, ratio, pg_clipped = policy_loss(new_logprobs, mb_logprobs, mb_advantages,
                                                                 ~mb_padding_mask, args.cliprange)
                        # [N+ 1.D.20] no entropy bonus and no KL term: the KL acts only through the reward
                        # (in a critic warm-up the policy's gradient is 0, not absent: every parameter still gets
                        # one, as distributed training expects, and AdamW's moments of the policy stay 0)
                        loss = (0.0 if warming_up else 1.0) * pg_loss + args.vf_coef * vf_loss
                        # the micro-batch's statistics [N+ 3], and a NaN/Inf check before its backward pass
                        book.micro_batch_done((update, episode, epoch, minibatch, micro), logits, new_logprobs,
                                              mb_logprobs, ~mb_padding_mask, ~mb_value_padding_mask, pg_loss, vf_loss,
                                              pg_clipped, vf_clipped, ratio)
                        accelerator.backward(loss)
                        if args.max_grad_norm is not None and accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()

        # ---- the end of the update (part 2): metrics, each a mean over the update gathered across ranks [N+ 3],
        #      the probe's table, the health monitor (README "Watching a run"), a safe point; True: stop here
        if book.end_update(update, episode, data_position, probe_sample, (lrnow, lr_value), kl=kl,
                           logprobs=logprobs, padding_mask=padding_mask, non_score_reward=non_score_reward,
                           scores=scores, contain_eos=contain_eos, values=values, returns=returns, responses=responses,
                           value_padding_mask=value_padding_mask, sequence_lengths=sequence_lengths,
                           postprocessed_responses=postprocessed_responses):
            break
    progress.close()
    stop.restore()  # the final save and evaluation are not resumable: from here a signal acts as usual
    book.write_health_summary()  # health/summary.json: which update the saved policy is from

    # ---- save the policy as a standard Hugging Face folder [N+ 1.D.26]
    accelerator.wait_for_everyone()
    policy = unwrapped.policy
    # the saved generation config stops at EOS (what users of the checkpoint expect) with the eval sampling;
    # written over the one save_pretrained wrote, so the in-memory policy keeps sampling exactly R tokens
    saved_config = sampling_config(args.response_length, args.eval_temperature)
    saved_config.eos_token_id, saved_config.pad_token_id = eos, pad
    save_model_atomic(policy, tokenizer, args.output_dir, accelerator, extra=saved_config.save_pretrained)

    # ---- final evaluation: the tables that the win-rate judge reads [N+ 1.D.25]
    if args.run_eval:
        model.eval()
        for split in args.eval_splits:
            with accelerator.autocast():
                df, split_metrics = evaluate(policy, reward_model, tokenizer, dataset[split], args, accelerator,
                                             eval_config)
            logger.log({"episodes": episode, **{f"eval/{split}/{k}": v for k, v in split_metrics.items()}}, episode)
            accelerator.print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in split_metrics.items()))
            if accelerator.is_main_process:
                df.to_csv(os.path.join(args.output_dir, f"{split}_table.csv"), index=False)
                logger.table(f"eval/{split}_query_responses", df)
    accelerator.print(f"saved {args.output_dir} (peak memory {peak_memory_gib():.2f} GiB)")
    accelerator.end_training()
    return policy


# =========================================================================================================
# PART 2: PLUMBING. Nothing below changes the math above: logging, launch, datasets, input checks, atomic saves,
# resumable states, stop signals and divergence, then this stage's own switches and main(). The block up to
# "end of the shared plumbing" is the same, byte for byte, in sft_tldr.py, reward_tldr.py and ppo_tldr.py
# (tests/test_consistency.py checks it): read it once.
# =========================================================================================================
# Logging and provenance: metrics.jsonl (and W&B with --track), run_info.json
# ---------------------------------------------------------------------------------------------------------


class Logger:
    """One logging path: metrics.jsonl always, Weights & Biases with --track; silent off the main process."""

    def __init__(self, output_dir: str, is_main: bool, args: Args, run_name: str):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.is_main = is_main
        self.wandb = None
        if is_main and args.track:
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, config=asdict(args)
            )

    def log(self, metrics: dict, samples: int) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"samples": samples, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log({"samples": samples, **metrics})

    def table(self, name: str, df) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Table(dataframe=df)})


def write_run_info(output_dir: str, args: Args, derived: Derived, mixed_precision: str) -> None:
    """Resolved args, derived sizes, the precision (accelerate's mixed_precision: no, bf16, fp16), argv, git SHA and
    package versions, for provenance."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        sha = ""
    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "datasets", "tyro", "rouge_score", "deepspeed"):
        try:
            versions[pkg] = getattr(__import__(pkg), "__version__", "installed")
        except ImportError:
            pass
    # cwd: relative paths in args (checkpoints, data) resolve against the folder the run was started in
    info = {"args": asdict(args), "derived": asdict(derived), "mixed_precision": mixed_precision, "argv": sys.argv,
            "cwd": os.getcwd(), "git_sha": sha, "python": platform.python_version(), "versions": versions}
    with open(os.path.join(output_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)


# ---------------------------------------------------------------------------------------------------------
# Launch: the accelerator, DeepSpeed, seeds and memory
# ---------------------------------------------------------------------------------------------------------


def make_accelerator():
    """The stage's Accelerator, on GPUs and on CPU, with or without DeepSpeed.

    Without DeepSpeed, accelerate forms a multi-process CPU group (gloo) only when told it runs on CPU. But `cpu=True`
    also drops a DeepSpeed launch without a word (the run becomes plain data parallel), so under DeepSpeed it is not
    set; on CPU the gloo backend is then named, since accelerate leaves it unset there, counts one process while
    DeepSpeed counts all of them, and DeepSpeed's batch-size check fails. Harmless with one process."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and deepspeed else []
    return Accelerator(cpu=on_cpu and not deepspeed, kwargs_handlers=handlers)


def configure_deepspeed(accelerator, local_micro_batch_size: int, max_grad_norm: Optional[float]) -> Optional[dict]:
    """Set what `accelerator.prepare` must not fill in itself in the DeepSpeed config it hands to
    `deepspeed.initialize`; returns that config (None without DeepSpeed).

    With accelerate >= 1.0, `gradient_clipping: auto` (or no key, as in the accelerate configs here) becomes 1.0 at
    `prepare`, while the reference clipped no gradient in any stage [N+ 1.D.21]: the value is `max_grad_norm`, 0 (no
    clipping) when None, as without DeepSpeed. The micro-batch is set explicitly because PPO prepares no DataLoader
    to read it from; gradient accumulation comes from `accelerator.gradient_accumulation_steps`."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    ds_config = plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = local_micro_batch_size
    ds_config["gradient_clipping"] = max_grad_norm or 0.0  # [N+ 1.D.21]
    return ds_config


def write_deepspeed_config(accelerator, output_dir: str) -> None:
    """After `prepare`: the DeepSpeed config as resolved by accelerate ("auto" values filled in), for provenance."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and accelerator.is_main_process:
        with open(os.path.join(output_dir, "deepspeed_config.json"), "w") as f:
            json.dump(plugin.deepspeed_config, f, indent=2, default=str)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------
# Datasets: the hub (the default) or local JSON Lines files in the same schema
# ---------------------------------------------------------------------------------------------------------


def load_splits(dataset: str, subset: Optional[str] = None, revision: Optional[str] = None, flag: str = "--dataset"):
    """A DatasetDict from a local folder holding one .jsonl/.json/.parquet file per split (the file's stem is the
    split name), or from a dataset repository of plain data files: a hub name, or a local folder laid out like one
    (split files in subfolders, e.g. `data/train-00000-of-00001.parquet`), both read by the same
    `datasets.load_dataset(dataset, data_dir=subset, revision=revision)`. `subset` is the folder of one configuration
    (the hub's parquet conversion has `comparisons/train/0000.parquet`), `revision` a branch, tag or commit.

    `datasets` >= 4 refuses repositories that hold a loading script instead of data; the error names the fix.
    Local split files load one at a time: a joint load would impose the first file's column types on every split
    (a column that is null in train but text in validation fails). A path that is a file or neither a folder nor a
    hub dataset, a folder without data files, an empty file and a JSON Lines line that does not parse (a truncated
    file) are errors naming `flag`, the file and the line."""
    import datasets

    exts = (".jsonl", ".json", ".parquet")
    if not os.path.isdir(dataset):
        problem = ("is a file; pass the folder that holds one file per split" if os.path.exists(dataset)
                   else hub_problem(dataset, "dataset"))
        if problem:
            raise ValueError(f"{flag} {dataset}: {problem}")
    files = sorted(f for f in os.listdir(dataset) if os.path.splitext(f)[1] in exts) if os.path.isdir(dataset) else []
    if not files:
        if os.path.isdir(dataset) and not any(os.path.splitext(f)[1] in exts + (".py",)
                                              for _, _, names in os.walk(dataset) for f in names):
            raise ValueError(f"{dataset}: no .jsonl, .json or .parquet files (one per split expected)")
        try:
            return datasets.load_dataset(dataset, data_dir=subset, revision=revision)
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e):
                raise
            raise ValueError(f"{dataset} at revision {revision or 'main'} is a dataset loading script, which datasets "
                             f"{datasets.__version__} refuses ({e}); load its parquet conversion instead: "
                             f"--dataset_revision refs/convert/parquet (README, 'Datasets')") from e
    splits = {}
    for fname in files:
        stem, ext = os.path.splitext(fname)
        if stem in splits:
            raise ValueError(f"{dataset}: two files for split {stem!r}")
        builder, path = "parquet" if ext == ".parquet" else "json", os.path.join(dataset, fname)
        if builder == "json":  # the JSON reader accepts bytes that are not UTF-8 and fails later, at a read
            rows = 0
            with open(path, "rb") as f:
                for line_number, line in enumerate(f, 1):
                    try:
                        text = line.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{path}: line {line_number} is not valid UTF-8 ({e.reason} at byte "
                                         f"{e.start} of the line)") from None
                    rows += bool(text.strip())
                    if ext == ".jsonl" and text.strip():  # the reader names no line: find it here
                        try:
                            json.loads(text)
                        except ValueError as e:
                            raise ValueError(f"{path}: line {line_number} is not valid JSON ({e}; a truncated "
                                             f"file?)") from None
            if not rows:
                raise ValueError(f"{path}: the file is empty (split {stem!r} has no rows)")
        try:
            splits[stem] = datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as e:  # bytes that are not UTF-8, a line that is not JSON, ...: name the file
            raise ValueError(f"{path}: cannot be read as a {ext} split ({type(e).__name__}: {e})") from e
    return datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------------------
# Checks before any output is written: flags, paths, model folders and the output folder; the final model saved
# atomically; an older run in the output folder moved aside.
# ---------------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")
# what a stage writes into its output folder; a fresh start moves these aside when the folder already holds a run
RUN_OUTPUTS = ("run_info.json", "metrics.jsonl", "checkpoints", "health", "samples", "dataset", "final_model.tmp",
               "config.json", "generation_config.json", "model.safetensors*", "model-*.safetensors", "pytorch_model*",
               "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.json",
               "merges.txt", "*_table.csv", "*_rewards.csv", "*_calibration.csv", "*_calibration.png")
PREVIOUS_RUNS = "previous_runs"


def check_flags(args, positive: tuple = (), non_negative: tuple = ()) -> None:
    """A one-line error naming the flag for a size that must be positive (batches, lengths) or a value that must not
    be negative (learning rate, counts), before the libraries fail on it in a less readable way."""
    for name, minimum in [(n, 1) for n in positive] + [(n, 0) for n in non_negative]:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name} {value}: must be {'positive' if minimum else '0 or more'}")


def check_episodes(total_episodes: int, batch_size: int) -> None:
    """--total_episodes must be whole batches: the remainder would otherwise be dropped without a word."""
    if total_episodes % batch_size:
        low = total_episodes // batch_size * batch_size
        choices = f"{low} or {low + batch_size}" if low else f"{batch_size}"
        raise ValueError(f"--total_episodes {total_episodes} is not a multiple of --batch_size {batch_size} (the "
                         f"remainder would be dropped); pass {choices}")


def hub_problem(name: str, repo_type: str) -> Optional[str]:
    """Why `name`, which is no local path, cannot be read from the Hugging Face hub (None when it can): not of the
    form owner/name, absent from the cache when offline, or unreachable. Checked with one request (no retries), so
    a mistyped relative folder fails at once instead of after the hub client's retries."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    parts = name.split("/")
    if name.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts) or "\\" in name:
        return "no such folder (and not a hub name of the form owner/name)"
    cached = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=name, repo_type=repo_type))
    if os.path.isdir(cached):
        return None
    if constants.HF_HUB_OFFLINE:
        return "neither a local folder nor in the hub cache (HF_HUB_OFFLINE is set)"
    try:
        (HfApi().model_info if repo_type == "model" else HfApi().dataset_info)(name, timeout=10)
    except Exception as e:  # not found, gated, no network: all mean the run cannot start
        return f"neither a local folder nor reachable on the hub ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


def safetensors_problem(path: str) -> Optional[str]:
    """Why a .safetensors file is not complete (None when it is): empty, or shorter than its header says. Reads only
    the header, so a 0-byte or truncated file from a failed save is caught before the load."""
    size = os.path.getsize(path)
    if size < 8:
        return f"{os.path.basename(path)} has {size} bytes (the save did not finish)"
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len)) if 8 + header_len <= size else None
        except ValueError:
            header = None
    if header is None:
        return f"{os.path.basename(path)} has an unreadable header (the save did not finish)"
    end = max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"], default=0)
    if size < 8 + header_len + end:
        return f"{os.path.basename(path)} has {size} bytes, its header needs {8 + header_len + end} (truncated)"
    return None


def weights_problem(folder: str) -> Optional[str]:
    """Why a model folder holds no complete weights (None when it does): no weights file, a shard missing, or a
    safetensors file cut short."""
    index = [n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
             if os.path.isfile(os.path.join(folder, n))]
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    elif index:
        with open(os.path.join(folder, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        files = ["pytorch_model.bin"]
    else:
        return "no model weights (model.safetensors); a run that did not finish saves none"
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"the weights file {name} is missing"
        problem = safetensors_problem(path) if name.endswith(".safetensors") else None
        if problem or not os.path.getsize(path):
            return problem or f"{name} is empty"
    return None


def model_role(config: dict) -> str:
    """'causal_lm', 'reward_model' (a one-label sequence classifier with the reward_bias that reward_tldr.py writes)
    or a description of what else a config.json describes."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    def names(mapping):
        return {n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v)}

    archs = config.get("architectures") or []
    if archs and set(archs) <= names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return "causal_lm"
    if archs and set(archs) <= names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        if labels == 1 and "reward_bias" in config:
            return "reward_model"
        return f"sequence classifier with {labels} labels{'' if 'reward_bias' in config else ' and no reward_bias'}"
    return f"model of architecture {archs or 'unknown'}"


ROLE_NAMES = {"causal_lm": "a causal LM (an SFT or base model folder)",
              "reward_model": "a reward model (a one-label sequence classifier with reward_bias, from reward_tldr.py)"}


def check_model_source(path: str, flag: str, roles: tuple) -> None:
    """Refuse, before any output, a model path that cannot serve in `roles`: a path that is neither a folder nor a
    hub model, a folder without config.json, tokenizer files or complete weights (a run whose final save failed),
    or a folder holding the wrong kind of model (a reward model given as the policy would load with a random LM
    head). A hub model is checked at load (`load_checked`)."""
    if not os.path.isdir(path):
        problem = "is a file, not a model folder" if os.path.exists(path) else hub_problem(path, "model")
        if problem:
            raise ValueError(f"{flag} {path}: {problem}")
        return
    files = set(os.listdir(path))
    if "config.json" not in files:
        raise ValueError(f"{flag} {path}: no config.json; not a Hugging Face model folder")
    if not files & set(TOKENIZER_FILES):
        raise ValueError(f"{flag} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); the stages save "
                         f"the tokenizer next to the model (tokenizer.save_pretrained)")
    problem = weights_problem(path)
    if problem:
        raise ValueError(f"{flag} {path}: {problem}")
    with open(os.path.join(path, "config.json")) as f:
        role = model_role(json.load(f))
    if role not in roles:
        raise ValueError(f"{flag} {path}: holds {ROLE_NAMES.get(role, 'a ' + role)}; expected "
                         f"{' or '.join(ROLE_NAMES[r] for r in roles)}")


def load_checked(auto_class, path: str, flag: str, new_ok: tuple = (), **kwargs):
    """`auto_class.from_pretrained` that refuses weights missing from, or shaped differently in, the checkpoint
    (transformers would initialise them at random and only mention it in its load report); `new_ok`: name prefixes
    that are new by design (the reward head on an SFT model). Returns (model, loading info)."""
    model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(new_ok))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise ValueError(f"{flag} {path}: {len(missing)} weights missing ({', '.join(missing[:3])}) and "
                         f"{len(mismatched)} of another shape ({', '.join(mismatched[:3])}) for a "
                         f"{type(model).__name__}; they would start random")
    return model, info


def check_output_dir(output_dir: str) -> None:
    """Create the output folder and write a probe file into it: a run that could not save its model must fail
    before it trains, not after."""
    probe = os.path.join(output_dir, f".write_test_{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output_dir {output_dir}: not writable ({type(e).__name__}: {e.strerror or e})") from None


def set_aside_previous_run(output_dir: str, print_fn) -> Optional[str]:
    """A fresh start into a folder that holds a run moves that run's files (`RUN_OUTPUTS`) into
    <output_dir>/previous_runs/<n>/ and says so: appending to its metrics.jsonl would make one record of two runs,
    and refusing would stop a requeued job whose first attempt died before it saved a state. Nothing is deleted.
    Returns the folder they went to (None: nothing to move)."""
    import fnmatch

    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if not {"run_info.json", "metrics.jsonl", "checkpoints"} & set(names):
        return None  # no run here (a new folder, or one that holds other things: left alone)
    moved = [n for n in names if any(fnmatch.fnmatch(n, p) for p in RUN_OUTPUTS)]
    root = os.path.join(output_dir, PREVIOUS_RUNS)
    os.makedirs(root, exist_ok=True)
    number = 1 + max([int(n) for n in os.listdir(root) if n.isdigit()], default=0)
    dest = os.path.join(root, str(number))
    os.makedirs(dest)
    for name in moved:
        os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    print_fn(f"warning: {output_dir} holds an earlier run; this fresh start moved its {len(moved)} files "
             f"({', '.join(moved[:4])}{', ...' if len(moved) > 4 else ''}) to {dest}")
    return dest


def save_model_atomic(model, tokenizer, output_dir: str, accelerator, state_dict=None, extra=None) -> None:
    """Save the final Hugging Face folder as the resumable states are: everything into <output_dir>/final_model.tmp,
    then moved into place with the weights last, so an interrupted or failed save never leaves a config.json next to
    a partial model.safetensors (which the next stage refuses; see `weights_problem`). `extra(folder)` writes more
    files (a generation config) into the temporary folder on the main process."""
    tmp = os.path.join(output_dir, "final_model.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    model.save_pretrained(tmp, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                          state_dict=state_dict)
    # every rank's save_pretrained touches the folder (it creates and lists it), so none may still be inside it
    # when the main process empties and removes it: a late rank would re-create it or fail to list it
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: (n.startswith(("model", "pytorch_model")), n))  # weights last
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------
# Resumable training state, stop signals and divergence
# ---------------------------------------------------------------------------------------------------------

# Resumable states: every state is a folder <output_dir>/checkpoints/<name>, written into <name>.tmp and renamed
# when complete; the last file written into it is a manifest of every file's size and checksum, so a state cut
# short by a crash, a full disk or a copy, or with a flipped byte, is recognised and skipped on resume.
STATE_MANIFEST = "state_manifest.json"
# files up to 64 MiB (metadata, RNG states) get a SHA-256; larger ones (weights, optimizer) a CRC-32, which also
# catches any flipped byte at half the cost (README "Faults and bad input": ~1 s/GiB against ~2 s/GiB here)
MANIFEST_HASH_LIMIT = 64 * 2**20


def file_sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_crc32(path: str) -> int:
    import zlib

    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            crc = zlib.crc32(block, crc)
    return crc


def state_problem(folder: str) -> Optional[str]:
    """Why the state in `folder` cannot be resumed from (missing manifest, missing, truncated or altered file, an
    unreadable trainer_state.json), or None when it is complete."""
    try:
        with open(os.path.join(folder, STATE_MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        return f"no readable {STATE_MANIFEST} (the save did not finish: {type(e).__name__})"
    for name, entry in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != entry["size"]:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {entry['size']}"
        if "sha256" in entry and file_sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
        if "crc32" in entry and file_crc32(path) != entry["crc32"]:
            return f"{name} does not match its CRC-32 in the manifest"
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__})"
    return None


def latest_valid_state(root: str) -> tuple[Optional[str], list[str]]:
    """The newest complete state folder under `root` and one message per newer state skipped as incomplete or
    corrupt; leftover `.tmp` folders (a save killed midway) are never candidates."""
    names = sorted(n for n in os.listdir(root) if not n.endswith(".tmp")) if os.path.isdir(root) else []
    skipped = []
    for name in reversed(names):
        folder = os.path.join(root, name)
        problem = state_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"skipping the state {folder}: {problem}; trying the previous one")
    return None, skipped


def save_state_atomic(accelerator, folder: str, state: dict, keep: int) -> None:
    """Save a resumable state into `folder`: model(s), optimizer, every process's RNG states (accelerate's
    `save_state`, which also handles DeepSpeed's partitioned optimizer), `state` as trainer_state.json, then the
    manifest. Everything goes into `folder.tmp`, renamed only when complete, so a process killed mid-save leaves
    the previous states intact. Afterwards only the newest `keep` states in the parent folder are kept."""
    root, tmp = os.path.dirname(folder), folder + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        files = {}
        for dirpath, _, names in os.walk(tmp):
            for name in names:
                path = os.path.join(dirpath, name)
                entry = files[os.path.relpath(path, tmp)] = {"size": os.path.getsize(path)}
                if entry["size"] <= MANIFEST_HASH_LIMIT:
                    entry["sha256"] = file_sha256(path)
                else:
                    entry["crc32"] = file_crc32(path)
        with open(os.path.join(tmp, STATE_MANIFEST), "w") as f:
            json.dump({"files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        states = sorted(n for n in os.listdir(root) if not n.endswith(".tmp"))
        for name in states[: max(len(states) - keep, 0)] + [n for n in os.listdir(root) if n.endswith(".tmp")]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()


class StopOnSignal:
    """SIGTERM (Slurm preemption, `scancel`, torchrun) and SIGINT (Ctrl-C) set a flag instead of killing the run;
    the training loop reads `received` once per step at a safe point, saves a state and exits. A second signal gets
    the previous behaviour back (a second Ctrl-C interrupts at once). The handlers are restored on exit; outside
    the main thread (where Python cannot install handlers) nothing is installed."""

    def __init__(self):
        self.received: Optional[str] = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self.restore()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self.restore()
        return False


def stop_signal_received(accelerator, stop: StopOnSignal) -> Optional[str]:
    """The signal name if any process received one (processes must agree: they all take part in the save)."""
    flag = torch.tensor([0.0 if stop.received is None else 1.0], device=accelerator.device)
    if accelerator.gather(flag).max().item() == 0:
        return None
    return stop.received or "a stop signal (on another process)"


def safe_point(accelerator, stop: "StopOnSignal", save_every: int, step: int, num_steps: int, save, last_state,
               progress, what: str):
    """The end of a training step, where stopping is safe: a resumable state every --save_every steps (`save()`
    writes it and returns its folder), and on SIGTERM/SIGINT a state, then exit 143/130 (`--resume` continues from
    it). Returns the newest state's folder. `what` names the step in the message."""
    signal_name = stop_signal_received(accelerator, stop)
    periodic = save_every > 0 and step % save_every == 0
    if step < num_steps and (periodic or signal_name):
        last_state = save()
    if signal_name and step < num_steps:
        progress.close()
        accelerator.print(f"received {signal_name}: saved the state of {what} in {last_state}; run the same command "
                          "with --resume to continue")
        accelerator.end_training()
        raise SystemExit(143 if signal_name == "SIGTERM" else 130)
    return last_state


def find_divergence(quantities: dict, where: str, reduce=None) -> Optional[str]:
    """None when every value is finite, else "<name> diverged at <where>: N NaN and M infinite values" for the first
    quantity that is not. `reduce` (accelerator.reduce) sums the counts over processes, so all ranks see the same
    answer and stop together, instead of one rank raising while the others wait forever in the next collective."""
    names = list(quantities)
    values = [torch.as_tensor(quantities[n]).detach() for n in names]
    counts = torch.stack([torch.stack([torch.isnan(v).sum(), torch.isinf(v).sum()]) for v in values])  # (n, 2)
    if reduce is not None:
        counts = reduce(counts, "sum")
    for name, (n_nan, n_inf) in zip(names, counts.tolist()):  # one device sync
        if n_nan or n_inf:
            return f"{name} diverged at {where}: {n_nan} NaN and {n_inf} infinite values"
    return None


def resume_state(args, world_size: int, resumable_changes: set, print_fn) -> tuple[Optional[str], Optional[dict]]:
    """With --resume: the newest complete state under <output_dir>/checkpoints and its trainer_state.json, or
    (None, None) when there is none (a fresh start). Refused when a flag outside `resumable_changes` or the number
    of processes differs from the interrupted run's: the continuation would silently be another run."""
    if not args.resume:
        return None, None
    if not args.output_dir:
        raise ValueError("--resume needs --output_dir (the folder whose checkpoints/ to continue from)")
    folder, skipped = latest_valid_state(os.path.join(args.output_dir, "checkpoints"))
    for message in skipped:  # a state cut short by a crash or corrupted on disk: fall back to the one before
        print_fn(message)
    if folder is None:  # a requeued job that died before its first save, or only corrupt states: said loudly
        print_fn(f"WARNING: --resume found no usable state in {os.path.join(args.output_dir, 'checkpoints')} "
                 f"({len(skipped)} skipped); starting a FRESH run (an earlier run's files there are moved aside)")
        return None, None
    with open(os.path.join(folder, "trainer_state.json")) as f:
        state = json.load(f)
    changed = sorted(k for k, v in asdict(args).items()
                     if k not in resumable_changes and json.loads(json.dumps(v)) != state["args"].get(k))
    if changed or state["world_size"] != world_size:
        raise ValueError(f"cannot resume {folder}: flags {changed} or the number of processes "
                         f"({state['world_size']} -> {world_size}) differ from the interrupted run")
    return folder, state


def cut_metrics(output_dir: str, lines: int) -> None:
    """Keep the first `lines` records of metrics.jsonl: what the interrupted run logged after its last state is
    logged again by the resumed run."""
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as f:
        kept = f.readlines()[:lines]
    with open(path, "w") as f:
        f.writelines(kept)


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for _ in f)


class RunStates:
    """The run's resumable states, the one object a training loop calls for them. After every finished step the
    stage says where the run stands (`finished`: the step, and what a resumed run needs to continue from it); then
    `stop_if_diverged` can keep that step's state before stopping, and `safe_point` saves on schedule or on a stop
    signal. `last` is the newest good state on disk (None before the first)."""

    def __init__(self, accelerator, args, run_name: str, world_size: int, stop: "StopOnSignal", progress,
                 last: Optional[str], step: int = 0, **position):
        self.accelerator, self.args, self.run_name, self.world_size = accelerator, args, run_name, world_size
        self.stop, self.progress, self.last = stop, progress, last
        self.finished(step, **position)

    def finished(self, step: int, **position) -> None:
        """Step `step` is done (its optimizer steps, logging and checks); `position` is what its state holds (a copy
        of it now: a state saved later, on divergence, must not see what changed since)."""
        self.step, self.position = step, json.loads(json.dumps(position))

    def folder(self, step: int) -> str:
        return os.path.join(self.args.output_dir, "checkpoints", f"update_{step:06d}")

    def save(self) -> str:
        """A resumable state of the end of the newest finished step (`save_state_atomic`); returns its folder."""
        metrics_path = os.path.join(self.args.output_dir, "metrics.jsonl")
        self.last = self.folder(self.step)
        save_state_atomic(self.accelerator, self.last, {
            "update": self.step, **self.position, "run_name": self.run_name, "world_size": self.world_size,
            "metrics_lines": count_lines(metrics_path) if self.accelerator.is_main_process else 0,
            "args": json.loads(json.dumps(asdict(self.args))),
        }, self.args.keep_states)
        return self.last

    def stop_if_diverged(self, quantities: dict, where: str, weights_untouched: bool = True) -> None:
        """Divergence: stop at the first NaN or Inf (a diverged run would train on garbage for hours). When no
        optimizer step has run since the newest finished step (`weights_untouched`), the weights are still that
        step's: they are saved as its state (unless it is on disk already), so the last good state is never lost."""
        problem = find_divergence(quantities, where, self.accelerator.reduce)
        if problem is None:
            return
        if weights_untouched and self.step > 0 and self.last != self.folder(self.step):
            self.save()
        self.progress.close()
        raise FloatingPointError(f"{problem}. Nothing after the last good state was saved. Last good state: "
                                 f"{self.last or 'none (no update had finished; --save_every keeps periodic states)'}")

    def safe_point(self, num_steps: int, what: str) -> None:
        """`safe_point` at the newest finished step: a state every --save_every steps, and on a stop signal."""
        self.last = safe_point(self.accelerator, self.stop, self.args.save_every, self.step, num_steps, self.save,
                               self.last, self.progress, what)


# ---- end of the shared plumbing; below, this stage's own


def check_launch(args: Args, accelerator) -> Derived:
    """Every check of the flags and the launch that can fail, run before the first file is written (run_info.json,
    metrics.jsonl); returns the batch arithmetic, and sets accelerate's gradient accumulation from it."""
    check_flags(args, positive=("batch_size", "local_micro_batch_size", "local_rollout_forward_batch_size",
                                "query_length", "response_length", "noptepochs", "nminibatches",
                                "local_eval_batch_size"),
                non_negative=("learning_rate", "adam_eps", "weight_decay", "total_episodes", "save_every",
                              "validation_probe_size", "sample_every", "max_eval_samples", "kl_coef", "temperature",
                              "eval_temperature"))
    check_flags(args, positive=("health_patience",))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # else each process would silently run alone, in the same output_dir
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}")
    derived = derive(args, accelerator.num_processes)
    accelerator.gradient_accumulation_steps = derived.gradient_accumulation_steps  # read by prepare (DeepSpeed too)
    if args.keep_freed_memory and accelerator.device.type == "cpu" and not keep_freed_host_memory():
        accelerator.print("note: --keep_freed_memory needs glibc; the allocator keeps its defaults")
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if args.offload and deepspeed_plugin is None:
        raise ValueError("--offload needs a DeepSpeed launch (accelerate launch --config_file ...deepspeed...yaml)")
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:  # sharded policy: slow, unsynced generate
        raise ValueError("policy and value model train under ZeRO-2 (the paper's setting for every size); to fit the "
                         "6.9B recipe use the ZeRO-2 config with --offload, which shards the frozen models in ZeRO-3")
    return derived


def load_prompts(args: Args, tokenizer, accelerator, derived: Derived):
    """The prompts [N+ 1.A, 1.D.5]: train (rollouts), the validation probe (its first --validation_probe_size rows)
    and the evaluation splits, checked as SFT rows (malformed rows are errors, empty ones skipped and counted) and
    tokenized. Returns (dataset, data metrics, this rank's share of the probe as tensors, or None)."""
    dataset = load_splits(args.dataset, revision=args.dataset_revision)
    if "train" not in dataset or "validation" not in dataset:
        raise ValueError(f"{args.dataset} needs 'train' and 'validation' splits (found {list(dataset)})")
    missing = [s for s in args.eval_splits if args.run_eval and s not in dataset]
    if missing:
        raise ValueError(f"{args.dataset} lacks evaluation splits {missing} (found {list(dataset)})")
    keep = {"train", "validation", *(args.eval_splits if args.run_eval else ())}
    dataset = type(dataset)({s: ds for s, ds in dataset.items() if s in keep})
    dataset, skipped = drop_bad_rows(dataset)
    data_metrics = {}
    for split, ds in dataset.items():
        data_metrics[f"data/{split}/rows"] = len(ds)
        for reason, n in sorted(skipped[split].items()):
            data_metrics[f"data/{split}/skipped/{reason}"] = n
            accelerator.print(f"warning: skipped {n} {split} rows: {reason} (see sft_row_problem)")
    probe_rows = dataset["validation"].select(range(min(args.validation_probe_size, len(dataset["validation"]))))
    if len(probe_rows) < args.validation_probe_size:
        raise ValueError(f"validation has {len(probe_rows)} rows, fewer than --validation_probe_size "
                         f"{args.validation_probe_size}")
    if args.max_eval_samples is not None:
        for split in args.eval_splits if args.run_eval else ():
            dataset[split] = dataset[split].select(range(min(args.max_eval_samples, len(dataset[split]))))
    if len(probe_rows):
        dataset["probe"] = probe_rows
    with accelerator.main_process_first():
        dataset = tokenize_queries(dataset, tokenizer, args)
    probe_share = args.validation_probe_size // derived.world_size  # [N+ 1.D.24] a fixed set; rank r takes share r
    probe = None
    if probe_share > 0:
        rank = accelerator.process_index
        probe = dataset["probe"].select(range(rank * probe_share, (rank + 1) * probe_share))
        probe = probe.with_format("torch", columns=["id", "query_token", "reference_response_token"])[:]
    return dataset, data_metrics, probe


def prepare_frozen_models(accelerator, args: Args, reward_model, ref_policy):
    """The frozen reward model and reference policy on the device; under DeepSpeed each goes through
    deepspeed.initialize with an inference-only config [N+ 1.D.22], and with --offload (the 6.9B recipe) ZeRO-3
    shards them and keeps their parameters on CPU."""
    if accelerator.state.deepspeed_plugin is None:
        return reward_model.to(accelerator.device), ref_policy.to(accelerator.device)
    import deepspeed  # only on this path; not needed for DDP or CPU runs

    eval_ds_config = {
        "train_micro_batch_size_per_gpu": args.local_micro_batch_size,
        "bf16": {"enabled": accelerator.mixed_precision == "bf16"},
        "fp16": {"enabled": accelerator.mixed_precision == "fp16"},
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }
    if args.offload:
        eval_ds_config["zero_optimization"] = {
            "stage": 3, "stage3_param_persistence_threshold": 1e4, "offload_param": {"device": "cpu"}}
    reward_model, *_ = deepspeed.initialize(model=reward_model, config=eval_ds_config)
    ref_policy, *_ = deepspeed.initialize(model=ref_policy, config=eval_ds_config)
    return reward_model, ref_policy


def sft_row_problem(row: dict, name: str) -> Optional[str]:
    """Why an SFT row is skipped (None: keep it); a ValueError naming the row when it is malformed.

    Malformed, an error (the data is not in the hub schema): subreddit, title, post or summary not a string (a
    number, a list, null), an id that is neither a string nor an integer. Skipped, counted and logged (well-formed
    but nothing to learn from): an empty post ("empty_post") and an empty summary ("empty_summary"), whose reference
    response would be a bare EOS."""
    bad = {k: row[k] for k in ("subreddit", "title", "post", "summary") if not isinstance(row[k], str)}
    if bad or isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
        raise ValueError(f"{name}: id must be a string or an integer and subreddit, title, post, summary strings; "
                         f"got {({'id': row['id'], **bad})!r:.300}")
    if not row["post"].strip():
        return "empty_post"
    if not row["summary"].strip():
        return "empty_summary"
    return None


def drop_bad_rows(dataset):
    """Check every split's rows before use: a missing column, a malformed row or a repeated id is an error naming the
    split and row; rows with an empty post or summary are dropped and counted by reason in
    skipped[split] (`sft_row_problem`). Returns (dataset, skipped)."""
    from collections import Counter

    required = ("id", "subreddit", "title", "post", "summary")
    skipped = {}
    for split, ds in dataset.items():
        missing = [c for c in required if c not in ds.column_names]
        if missing:
            raise ValueError(f"split {split!r} lacks columns {missing}; expected {list(required)}")
        repeated = [i for i, n in Counter(ds["id"]).items() if n > 1]
        if repeated:  # the same post twice is a data-preparation error: trained, sampled or evaluated twice
            rows = [r for r, i in enumerate(ds["id"]) if i == repeated[0]]
            raise ValueError(f"split {split!r}: {len(repeated)} ids repeat, e.g. id={repeated[0]!r} in rows {rows}")
        reasons = [sft_row_problem(row, f"split {split!r} row {i} (id={row['id']!r})") for i, row in enumerate(ds)]
        skipped[split] = dict(Counter(r for r in reasons if r))
        if skipped[split]:
            dataset[split] = ds.select([i for i, r in enumerate(reasons) if not r])
    return dataset, skipped


class HealthMonitor:
    """Counts, per check, the consecutive updates it failed; `observe` returns the checks that reached `patience`.
    Its state (streaks, the baseline and the signal history) goes into every resumable state."""

    def __init__(self, thresholds: dict, patience: int):
        self.thresholds, self.patience = thresholds, patience
        self.streak = {name: 0 for name in HEALTH_CHECKS}
        self.history: list[dict] = []  # {"update": u, **signals}
        self.baseline: Optional[dict] = None

    def observe(self, update: int, signals: dict) -> dict:
        self.history.append({"update": update, **signals})
        failing = failing_checks(signals, self.thresholds)
        for name in self.streak:
            self.streak[name] = self.streak[name] + 1 if name in failing else 0
        return {name: failing[name] for name in failing
                if self.streak[name] >= (1 if name in UPDATE_CHECKS else self.patience)}

    def trouble_began(self, tripped: dict) -> int:
        """The first update of the longest failing streak among the tripped checks."""
        return self.history[-1]["update"] - max(self.streak[name] for name in tripped) + 1

    def last_healthy_update(self, tripped: dict) -> int:
        """The newest update whose policy no tripped check indicts: a rollout check whose streak began at update s
        indicts the policy of s - 1 (`healthy_update`); a check of the update itself indicts its own policy."""
        now = self.history[-1]["update"]
        return min(now - 1 if name in UPDATE_CHECKS else healthy_update(now - self.streak[name] + 1)
                   for name in tripped)

    def reset(self) -> None:
        self.streak = {name: 0 for name in HEALTH_CHECKS}

    def state_dict(self) -> dict:
        return {"streak": self.streak, "history": self.history, "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.history, self.baseline = dict(state["streak"]), list(state["history"]), state["baseline"]


class Stopwatch:
    """Seconds of each phase of an update by the device clock (`device_time`): `lap(phase)` adds the time since the
    previous lap (or since `reset`) to the phase; `times()` adds the whole update's."""

    PHASES = ("generation", "scoring", "training", "validation_probe")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = self.mark = device_time()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def lap(self, phase: str) -> None:
        now = device_time()
        self.seconds[phase] += now - self.mark
        self.mark = now

    def times(self) -> dict:
        return {**self.seconds, "update": device_time() - self.start}


class MinibatchStats:
    """One update's micro-batch statistics [N+ 3]: the (len(STAT_NAMES), epochs, minibatches, micro-batches) table
    of `minibatch_stats`, and the largest |new - old log-prob| of the first minibatch (on-policy, nothing updated
    yet: about 0 unless the training forward differs from the rollout's)."""

    def __init__(self, shape: tuple, device, temperature: float):
        self.table = torch.zeros(shape, device=device)
        self.first_minibatch_max_diff = torch.zeros((), device=device)
        self.temperature = temperature

    @torch.no_grad()
    def record(self, where: tuple[int, int, int], *tensors) -> None:
        """`where` = (epoch, minibatch, micro-batch); `tensors`: `minibatch_stats`'s arguments but the temperature."""
        self.table[(slice(None), *where)], diff = minibatch_stats(*tensors, self.temperature)
        if where[0] == where[1] == 0:
            self.first_minibatch_max_diff = torch.maximum(self.first_minibatch_max_diff, diff)

    def reset(self) -> None:
        self.table.zero_()
        self.first_minibatch_max_diff.zero_()


class UpdateBookkeeping:
    """The PPO update loop's bookkeeping, none of it PPO: the update's clock (`clock.lap`), each micro-batch's
    statistics and divergence check (`micro_batch_done`), and at the end of the update (`end_update`) the metrics
    (`update_metrics`), the validation probe's table (`write_probe_table`), the health monitor and, when a check
    trips, the rollback and the incident record, the progress bar and the safe point. `end_update` returns True when
    the run must stop (the monitor's `stop`); `kept_update` then names the update whose policy is kept."""

    def __init__(self, args: Args, accelerator, logger: "Logger", tokenizer, monitor: "HealthMonitor", health: dict,
                 states: "RunStates", derived: Derived, episode: int, rollback_possible: bool, probe, probe_fixed):
        self.args, self.accelerator, self.logger, self.tokenizer = args, accelerator, logger, tokenizer
        self.monitor, self.health, self.states, self.derived = monitor, health, states, derived
        self.rollback_possible, self.probe = rollback_possible, probe
        # the probe's queries, reference tokens, their RM scores and the scores' mean over ranks, fixed for the run
        # (all None without a probe)
        self.probe_queries, self.probe_references, self.probe_reference_scores, self.probe_reference_mean = (
            probe_fixed or (None,) * 4)
        self.start_time, self.start_episode = time.time(), episode
        self.kept_update: Optional[int] = None
        self.clock = Stopwatch()
        # the reference's statistics of every (epoch, minibatch, micro-batch), gathered over ranks at the end of the
        # update, so every logged number covers the whole update [N+ 3]
        self.stats = MinibatchStats((len(STAT_NAMES), args.noptepochs, args.nminibatches,
                                     derived.gradient_accumulation_steps), accelerator.device, args.temperature)

    def micro_batch_done(self, where: tuple[int, int, int, int, int], *tensors) -> None:
        """After a micro-batch's losses, before its backward pass: record its statistics (`tensors`:
        `minibatch_stats`'s arguments but the temperature) and stop on a NaN or Inf loss. `where` = (update, episode,
        PPO epoch, minibatch, micro-batch); in epoch 0, minibatch 0 no optimizer step of the update has run yet."""
        update, episode, epoch, minibatch, micro = where
        self.stats.record((epoch, minibatch, micro), *tensors)
        self.states.stop_if_diverged({"ppo/loss/policy": tensors[5], "ppo/loss/value": tensors[6]},
                                     f"update {update} (episode {episode}), PPO epoch {epoch}, minibatch {minibatch}, "
                                     f"micro-batch {micro}", epoch == minibatch == 0)

    def end_update(self, update: int, episode: int, data_position: int, probe_sample, lrs: tuple[float, float],
                   postprocessed_responses: torch.Tensor, **rollout) -> bool:
        """`probe_sample`: (responses, RM scores) of the validation probe, or None; `lrs`: (policy, value) LR;
        `rollout`: the update's tensors that `update_metrics` reads."""
        args, accelerator = self.args, self.accelerator
        self.clock.lap("training")
        if probe_sample is not None and args.sample_every > 0 and (update - 1) % args.sample_every == 0:  # samples/
            write_probe_table(args, accelerator, self.logger, self.tokenizer, update, self.probe["id"],  # update_N.csv
                              self.probe_queries, probe_sample[0], self.probe_references, probe_sample[1],
                              self.probe_reference_scores)
        eos = self.tokenizer.eos_token_id
        metrics = update_metrics(accelerator, rollout, eos, self.stats.table, self.stats.first_minibatch_max_diff,
                                 probe_sample[1] if probe_sample is not None else None, self.clock.times())
        episodes_per_second = (episode - self.start_episode) / (time.time() - self.start_time)
        metrics.update({"episodes": episode, "ppo/lr": lrs[0], "ppo/lr_value": lrs[1], "ppo/episode": episode,
                        "ppo/eps": int(episodes_per_second), "time/episodes_per_second": episodes_per_second,
                        "time/peak_memory_gib": peak_memory_gib()})
        # the health monitor: judge-free signals of this update's rollouts (README "Watching a run")
        texts = accelerator.gather_for_metrics(
            self.tokenizer.batch_decode(postprocessed_responses, skip_special_tokens=True), use_gather_object=True)
        signals = health_update(self.monitor, metrics, texts,
                                self.probe_reference_mean if probe_sample is not None else None)
        metrics.update(signals)
        tripped = self.monitor.observe(update, signals)
        self.logger.log(metrics, episode)
        if tripped:  # roll back to the last healthy state, record the incident; then stop, or continue, or log on
            began, target = self.monitor.trouble_began(tripped), self.monitor.last_healthy_update(tripped)
            folder = self.roll_back(target) if args.health_action != "log" else None
            record_incident(args, accelerator, self.logger, self.monitor, self.health, update, episode, tripped, began,
                            target, folder, texts)
            if args.health_action == "stop":
                self.kept_update = target if folder else update
                return True
        self.states.progress.set_postfix(score=f"{metrics['objective/scores']:.3f}",
                                         kl=f"{metrics['objective/kl']:.3f}",
                                         ratio=f"{metrics['check/ratio_first_minibatch']:.4f}")
        # a safe point: a resumable state every --save_every updates, and on SIGTERM/SIGINT before exiting
        self.states.finished(update, episode=episode, data_position=data_position,
                             health={"monitor": self.monitor.state_dict(), **self.health})
        self.states.safe_point(self.derived.num_updates, f"update {update} (episode {episode})")
        self.stats.reset()
        self.clock.reset()
        return False

    def write_health_summary(self) -> int:
        """health/summary.json (and `health` in run_info.json): which update the saved policy is from, whether the
        monitor stopped the run, and every incident; returns that update."""
        args, accelerator = self.args, self.accelerator
        stopped = self.kept_update is not None
        summary = {"kept_policy_update": self.kept_update if stopped else self.derived.num_updates,
                   "stopped_by_health_monitor": stopped, **self.health}
        if accelerator.is_main_process:
            os.makedirs(os.path.join(args.output_dir, "health"), exist_ok=True)
            with open(os.path.join(args.output_dir, "health", "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            info_path = os.path.join(args.output_dir, "run_info.json")
            if os.path.exists(info_path):
                with open(info_path) as f:
                    info = json.load(f)
                with open(info_path, "w") as f:
                    json.dump({**info, "health": summary}, f, indent=2)
        accelerator.print(f"the saved policy is that of update {summary['kept_policy_update']}"
                          + (" (the last healthy one; the health monitor stopped the run)" if stopped else ""))
        return summary["kept_policy_update"]

    def roll_back(self, target: int) -> Optional[str]:
        """Load the state of the end of update `target` (weights, optimizer, RNG) and delete the newer states, so
        that --resume can never pick an unhealthy one; None (nothing loaded) when that state is not on disk."""
        accelerator, root = self.accelerator, os.path.join(self.args.output_dir, "checkpoints")
        folder = self.states.folder(target)
        if not self.rollback_possible or not os.path.isdir(folder) or state_problem(folder) is not None:
            return None
        accelerator.load_state(folder)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in os.listdir(root):
                if name.startswith("update_") and not name.endswith(".tmp") and int(name[7:13]) > target:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        accelerator.wait_for_everyone()
        self.states.last = folder
        return folder


def update_metrics(accelerator, rollout: dict, eos_token_id: int, stats: torch.Tensor,
                   first_minibatch_max_diff: torch.Tensor, validation_score, times: dict) -> dict:
    """The update's metrics under the reference's names [N+ 3]: every number a mean over the whole update, gathered
    across ranks. rollout holds the update's (B, R) tensors (kl, logprobs, masks, values, returns, responses) and
    (B,) scores; stats is (len(STAT_NAMES), epochs, minibatches, micro-batches); validation_score the probe's or None;
    times the phases' seconds."""
    with torch.no_grad():
        r = rollout
        s = dict(zip(STAT_NAMES, accelerator.gather(stats.unsqueeze(0)).transpose(0, 1).flatten(1)))
        valid = ~r["padding_mask"]
        local = {
            "objective/kl": r["kl"].sum(1).mean(),
            "objective/entropy": torch.where(valid, -r["logprobs"], 0.0).sum(1).mean(),
            "objective/entropy_with_padding": (-r["logprobs"]).sum(1).mean(),  # the reference: each pad adds -1
            "objective/non_score_reward": r["non_score_reward"].sum(1).mean(),
            "objective/score_total": r["non_score_reward"].sum(1).mean() + r["scores"].mean(),
            "objective/scores": r["scores"].mean(),
            "objective/eos_fraction": r["contain_eos"].float().mean(),
            "ppo/val/explained_variance": torch.tensor(explained_variance(r["values"], r["returns"],
                                                                          ~r["value_padding_mask"])),
            "objective/response_length": (r["sequence_lengths"] + 1).float().mean(),
            "ppo/val/num_eos_tokens": (r["responses"] == eos_token_id).sum().float(),
            "check/ratio_first_minibatch": stats[STAT_NAMES.index("ratio"), 0, 0].mean(),
            "check/approxkl_first_minibatch": stats[STAT_NAMES.index("approxkl"), 0, 0].mean(),
            **{f"time/{name}": torch.tensor(seconds) for name, seconds in times.items()},
        }
        if validation_score is not None:
            local["objective/validation_score"] = validation_score.float().mean()
        device = stats.device
        gathered = accelerator.gather(torch.stack([v.to(device).float() for v in local.values()]).unsqueeze(0))
        metrics = dict(zip(local, gathered.mean(0).tolist()))
        metrics["check/max_abs_logprob_diff_first_minibatch"] = accelerator.gather(
            first_minibatch_max_diff.reshape(1)).max().item()
        metrics.update({
            "ppo/policy/approxkl_avg": s["approxkl"].mean().item(),
            "ppo/policy/approxkl_avg_with_padding": s["approxkl_with_padding"].mean().item(),
            "ppo/policy/clipfrac_avg": s["pg_clipfrac"].mean().item(),
            "ppo/policy/clipfrac_avg_with_padding": s["pg_clipfrac_with_padding"].mean().item(),
            "ppo/policy/entropy_avg": s["entropy"].mean().item(),
            "ppo/policy/entropy_avg_with_padding": s["entropy_with_padding"].mean().item(),
            "ppo/loss/policy_avg": s["pg_loss"].mean().item(),
            "ppo/loss/value_avg": s["vf_loss"].mean().item(),
            "ppo/val/clipfrac_avg": s["vf_clipfrac"].mean().item(),
            "ppo/val/ratio": s["ratio"].mean().item(),
            "ppo/val/ratio_with_padding": s["ratio_with_padding"].mean().item(),
            "ppo/val/ratio_var": s["ratio"].var().item() if s["ratio"].numel() > 1 else 0.0,
        })
    return metrics


def write_probe_table(args: Args, accelerator, logger: "Logger", tokenizer, update: int, ids, queries: torch.Tensor,
                      responses: torch.Tensor, references: torch.Tensor, scores: torch.Tensor,
                      reference_scores: torch.Tensor) -> None:
    """The validation probe of one update, gathered from every rank, as <output_dir>/samples/update_N.csv (id, query,
    response, reference, score, reference_score) and a W&B table with --track."""
    import pandas as pd

    decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
    table = {
        "id": accelerator.gather_for_metrics(ids, use_gather_object=True),
        "query": accelerator.gather_for_metrics(decode(queries), use_gather_object=True),
        "response": accelerator.gather_for_metrics(decode(responses), use_gather_object=True),
        "reference": accelerator.gather_for_metrics(decode(references), use_gather_object=True),
        "score": accelerator.gather(scores.float()).tolist(),
        "reference_score": accelerator.gather(reference_scores.float()).tolist(),
    }
    if accelerator.is_main_process:
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
        df = pd.DataFrame(table)
        df.to_csv(os.path.join(args.output_dir, "samples", f"update_{update:06d}.csv"), index=False)
        logger.table("samples/validation_query_responses", df)


def health_update(monitor: "HealthMonitor", metrics: dict, texts: list[str], probe_reference_mean) -> dict:
    """This update's health signals (`health_signals`) from its metrics and decoded rollouts; the first update's raw
    values become the monitor's baseline (its rollouts come from the starting policy)."""
    entropy_per_token = metrics["objective/entropy"] / max(metrics["objective/response_length"], 1.0)
    probe_gap = (metrics["objective/validation_score"] - probe_reference_mean
                 if probe_reference_mean is not None else None)
    raw = health_raw(metrics["objective/eos_fraction"], metrics["objective/response_length"], entropy_per_token,
                     texts, probe_gap)
    if monitor.baseline is None:
        monitor.baseline = raw
    return health_signals(raw, monitor.baseline, metrics["objective/kl"], metrics["ppo/policy/approxkl_avg"])


def record_incident(args: Args, accelerator, logger: "Logger", monitor: "HealthMonitor", health: dict, update: int,
                    episode: int, tripped: dict, began: int, target: int, folder: Optional[str],
                    texts: list[str]) -> None:
    """A tripped check: health/incident_update_N.json (signal, values over time, sample responses), the health/*
    record, the message; with --health_action continue, the documented recipe change (half the LR, twice the KL
    coefficient), kept in `health` and so in every later state. Resets the monitor's patience."""
    incident = {
        "update": update, "episode": episode, "action": args.health_action,
        "tripped": {name: {"value": v, "threshold": t, "signal": HEALTH_CHECKS[name][0]}
                    for name, (v, t) in tripped.items()},
        "trouble_began_at_update": began, "last_healthy_update": target,
        "rolled_back_to": folder, "history": monitor.history[-(args.health_patience + 3):],
        "sample_responses": texts[:4],
    }
    if args.health_action == "continue":
        health["lr_scale"] *= 0.5
        health["kl_coef"] *= 2.0
        incident["recipe_after"] = {"learning_rate_scale": health["lr_scale"], "kl_coef": health["kl_coef"]}
    health["incidents"].append({k: incident[k] for k in ("update", "tripped", "last_healthy_update",
                                                         "rolled_back_to")})
    monitor.reset()
    if accelerator.is_main_process:
        os.makedirs(os.path.join(args.output_dir, "health"), exist_ok=True)
        with open(os.path.join(args.output_dir, "health", f"incident_update_{update:06d}.json"), "w") as f:
            json.dump(incident, f, indent=2)
    logger.log({"health/incident": 1.0, "health/rolled_back_to_update": target if folder else -1,
                "health/lr_scale": health["lr_scale"], "health/kl_coef": health["kl_coef"]}, episode)
    accelerator.print(
        f"health: {tripped_text(tripped, args.health_patience)}; trouble began at update {began}; "
        + (f"rolled back to the state of update {target}" if folder else "no state to roll back to")
        + f"; {args.health_action} (incident in {args.output_dir}/health)")


def tripped_text(tripped: dict, patience: int) -> str:
    """The tripped checks in words, each with its own window: a check of the finished update (UPDATE_CHECKS) failed
    "in this update", a rollout check "for <patience> updates" in a row (an update can trip both kinds at once)."""
    return ", ".join(f"{n} {v:.3g} (limit {t:g}) "
                     + ("in this update" if n in UPDATE_CHECKS else f"for {patience} updates")
                     for n, (v, t) in tripped.items())


def healthy_update(trouble_began: int) -> int:
    """The newest update whose policy is known healthy. Update u's rollouts come from the policy of the end of update
    u - 1, so the first failing rollouts (update s) indict the policy of update s - 1, and the last policy whose
    rollouts passed is that of update s - 2 (0: the starting policy)."""
    return max(trouble_began - 2, 0)


def attention_kernel(requested: Optional[str], device_type: str, mixed_precision: str) -> str:
    """SDPA (flash / memory-efficient kernels on GPU, flash on CPU in fp32), except under bf16/fp16 autocast on CPU:
    there, for SmolLM2's training shape (8 x 253 tokens, 9 heads of 64, left padding), forward + backward of one
    layer takes 31 ms with torch's SDPA kernel and a mask, 20 ms with eager matmuls and a softmax; in fp32 SDPA is
    the faster (27 ms against 41 ms). `python benchmark/perf/bf16_cpu_checks.py attention`"""
    if requested is not None:
        return requested
    return "eager" if device_type == "cpu" and mixed_precision in ("bf16", "fp16") else "sdpa"


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from its heap and never give freed memory back to the OS.

    By default glibc maps large blocks (above a threshold that adapts from 128 KiB up to 32 MiB), such as an embedding
    gradient or a (B, R, V) logits tensor, fresh from the OS and unmaps them when freed, so every training step pays
    the kernel for zeroing and faulting those pages in again:
    30 ms for a fresh 113 MiB tensor here against 3 ms for a reused one; without this setting the bf16 training step
    of SmolLM2 PPO on CPU takes 13% longer. With mmap and trimming off, freed blocks are reused; the process keeps its
    high-water mark. Returns False where there is no glibc (macOS, musl), which then keeps its default."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


def device_time() -> float:
    """time.time() once the GPU has finished the work queued so far. CUDA kernels run asynchronously, so a phase
    timed with time.time() alone ends when its kernels are launched, and its remaining work is counted in the next
    phase that waits for a result (time/scoring, for one, would hold little more than the launches). On CPU the
    same as time.time()."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


# The names benchmark/ imports from this file, or patches in it: keep them stable (tests/test_consistency.py checks
# that this list is exactly what benchmark/ uses). Runners: main, Args. Patched: get_score (gold_reward_ppo.py, the
# gold judge as the reward), generate_with_logprobs (ppo_replay.py, saved rollouts), forward and Logger.log
# (ppo_work_counters.py, the throughput counters), write_probe_table, health_update, HealthMonitor and HEALTH_CHECKS
# (judge_probe.py, an LLM judge as one more health check). Read: HEALTH_CHECKS (health_curves.py); data and model
# helpers (bench_ppo.py, gpu_check.py, bf16_cpu_checks.py).
BENCHMARK_API = ("main", "Args", "get_score", "generate_with_logprobs", "forward", "Logger", "HEALTH_CHECKS",
                 "format_query", "truncated_query_tokens", "left_pad", "sampling_config", "NormalizedScalarModel",
                 "PolicyAndValueWrapper", "fp32_head", "response_logits", "response_logprobs", "policy_loss",
                 "value_loss", "keep_freed_host_memory", "write_probe_table", "health_update", "HealthMonitor")


# Flags that may change between an interrupted run and its resumption; any other change would alter the run.
RESUMABLE_CHANGES = {"resume", "track", "wandb_project_name", "wandb_entity", "output_dir", "save_every",
                     "keep_states", "sample_every", "run_eval", "eval_splits", "local_eval_batch_size",
                     "max_eval_samples", "keep_freed_memory"}


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(args: Args):
    """Run the stage with SIGTERM/SIGINT turned into "save a state and exit"; returns the trained policy."""
    with StopOnSignal() as stop:
        return train_ppo(args, stop)


if __name__ == "__main__":
    main(tyro.cli(Args))
