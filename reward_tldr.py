"""Stage 2 of 3: reward model (RM) on TL;DR human preference comparisons.

Reproduces the reward-model stage of "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization" (Huang et al., 2024, arXiv 2403.17031). Every implementation detail carries a tag such as
`[N+ 1.C.2]` that points into the project's checklist of the reference code (sections 1.A data, 1.C RM, 2 helper
math, 3 metric names); `grep -n "N+ 1.C" reward_tldr.py` maps the checklist to the code.

What it does, top to bottom:
  1. builds each comparison's query exactly as the SFT stage does (smart truncation to 512 tokens) and appends the
     chosen and the rejected summary + EOS, at most 169 tokens [N+ 1.A.10-11]. Validation rows of the CNN/DM batches
     become the split `validation_cnndm`, with the CNN/DM query format (1919 tokens) and 155 response tokens [N+ 1.A.12];
  2. loads the SFT checkpoint as a one-label `AutoModelForSequenceClassification`, re-initialises the scalar head
     N(0, 1/sqrt(hidden+1)) and turns dropout off [N+ 1.C.1-3];
  3. trains on -logsigmoid(r_chosen - r_rejected) with the reward read at the EOS token, chosen and rejected in one
     forward pass; AdamW 3e-6 / eps 1e-5, cosine schedule, batch 64, one epoch [N+ 1.C.4-8];
  4. scores the SFT train split's reference summaries and stores their mean raw reward as `config.reward_bias`, so a
     reference summary's normalised reward averages 0; checks that left padding changes no reward [N+ 1.C.11];
  5. evaluates on validation and validation_cnndm, gathered over all processes: accuracy with a 95% Wilson interval,
     broken down by split, batch, confidence and policy pair, a calibration table and plot, a CSV of rewards [N+ 1.C.10];
  6. saves a standard Hugging Face folder: safetensors, config with `reward_bias`, tokenizer with its pad token
     [N+ 1.C.13].

Launch:
  python reward_tldr.py --sft_model_path runs/sft                 # paper defaults, one GPU (grad-accum keeps batch 64)
  accelerate launch --config_file benchmark/accelerate/deepspeed_zero2.yaml reward_tldr.py --sft_model_path runs/sft \
      --seed 44413                                              # 8 GPUs: micro 1 x accumulation 8 x 8 = 64
  python reward_tldr.py --sft_model_path runs/sft_smoke --dataset data/tldr_synth/comparisons \
      --sft_dataset data/tldr_synth/sft --total_episodes 64 --batch_size 16 --max_eval_samples 32 \
      --normalization_samples 64 --output_dir runs/rm_smoke                      # tiny CPU run
  python reward_tldr.py --sft_model_path runs/rm --total_episodes 0      # re-evaluate a reward checkpoint (reward_eval)

Deviations from the reference code (bias-free head, token concatenation, mask-derived positions, gathered
evaluation, ...), fault handling, every metric and how to use the checkpoint elsewhere: README "Stage notes",
`reward_tldr.py`. The main metrics (<output_dir>/metrics.jsonl, x-axis `samples` = training pairs seen):
train/rm/{loss,accuracy}, eval/rm/<split>/accuracy with its 95% interval, eval/rm/reward_bias.
"""

import functools
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro

# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Args:
    # --- run and tracking
    exp_name: str = "reward_tldr"
    """name of this experiment; the run name is `{exp_name}__{seed}__{unix time}`"""
    seed: int = 44413
    """global seed: head initialisation and data order; the paper's four seeds are 44413, 55513, 66613, 77713"""
    track: bool = False
    """log metrics and tables to Weights & Biases as well as to metrics.jsonl"""
    wandb_project_name: str = "tldr_summarize"
    """Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """Weights & Biases entity (team); None means your default entity"""
    output_dir: Optional[str] = None
    """where the checkpoint, metrics.jsonl and tables go; default `runs/{run_name}`"""
    save_every: int = 0
    """write a resumable training state to <output_dir>/checkpoints every N optimizer steps; 0 = never.
    SIGTERM/SIGINT always save one before exiting"""
    keep_states: int = 2
    """keep the newest N states; 2 leaves a fallback when the newest is found corrupt on resume"""
    resume: bool = False
    """continue from the newest complete state in <output_dir>/checkpoints if there is one (else start fresh,
    with a warning, moving the files of the run that left no usable state aside); needs --output_dir"""

    # --- model and data
    sft_model_path: str = tyro.MISSING
    """the SFT checkpoint folder written by sft_tldr.py (backbone and tokenizer) [N+ 1.C.1]; a reward checkpoint of
    this script also works and keeps its trained head (e.g. with --total_episodes 0 to re-evaluate it)"""
    dataset: str = "openai/summarize_from_feedback"
    """preference data: a hub dataset of parquet files or a local folder with one .jsonl/.json/.parquet file per
    split, columns info, summaries, choice, batch, split, extra [N+ 1.A.2]"""
    dataset_revision: Optional[str] = "refs/convert/parquet"
    """hub revision of --dataset (branch, tag or commit hash). The main branch of openai/summarize_from_feedback
    holds a loading script, which `datasets` >= 4 refuses; the default is the hub's parquet conversion of it, the
    same rows and columns (README "Datasets"). None = the main branch"""
    dataset_subset: Optional[str] = "comparisons"
    """folder of one configuration inside a --dataset repository (`data_dir`): the reference's config "comparisons"
    [N+ 1.A.2]; None = the whole repository. Local folders with one file per split ignore it"""
    sft_dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """data whose train split's reference summaries set the reward bias: hub dataset or local folder as in
    sft_tldr.py [N+ 1.C.11]"""
    query_length: int = 512
    """TL;DR query tokens after smart truncation, as the SFT stage [N+ 1.A.4]"""
    response_length: int = 169
    """chosen/rejected summary tokens including EOS; longer ones are cut and lose their EOS (counted) [N+ 1.A.11]"""
    cnndm_query_length: int = 1919
    """CNN/DM query tokens after smart truncation of the article (validation_cnndm) [N+ 1.A.12]"""
    cnndm_response_length: int = 155
    """CNN/DM summary tokens including EOS [N+ 1.A.12]"""
    normalization_response_length: int = 53
    """reference-summary tokens including EOS when setting the bias: the SFT and PPO response length
    [N+ 1.A.7, 1.C.11]"""
    normalization_samples: Optional[int] = None
    """score this many SFT train rows (a seeded random subset) for the bias; None = all (116,722 on the hub);
    0 = skip normalisation and keep the loaded checkpoint's reward_bias (0 for a new head) [N+ 1.C.11]"""

    # --- optimisation
    learning_rate: float = 3e-6
    """AdamW learning rate [N+ 1.C.7]"""
    adam_eps: float = 1e-5
    """AdamW epsilon (torch's default is 1e-8) [N+ 1.C.7]"""
    weight_decay: float = 0.01
    """AdamW weight decay; the reference uses torch's default 0.01 [N+ 1.C.7]"""
    max_grad_norm: Optional[float] = None
    """clip the global gradient norm; None = no clipping, as the reference (also under DeepSpeed, whose
    `gradient_clipping: auto` accelerate would set to 1.0) [N+ 1.D.21]"""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """LR schedule over the optimizer steps, no warm-up [N+ 1.C.7]"""
    batch_size: int = 64
    """global batch (pairs per optimizer step) = local_micro_batch_size x gradient accumulation x processes;
    gradient accumulation is derived from it [N+ 1.C.8]"""
    local_micro_batch_size: int = 1
    """pairs per forward pass on each process (the forward sees twice as many sequences) [N+ 1.C.8]"""
    total_episodes: Optional[int] = None
    """training pairs to use, at most one epoch (default: the whole train split, 92,858 on the hub); 0 skips
    training: evaluate the loaded model, as the reference's reward_eval [N+ 1.C.8, 1.C.14]"""
    per_rank_shuffle: bool = False
    """reproduce the reference's data order [N+ 1.C.9]: each process shuffles the train split with its own seed
    (seed + rank*100003) and takes every world_size-th batch of it, so processes see overlapping random subsets
    (about 66% unique pairs on 8 GPUs). Off: one global shuffle partitioned across processes"""

    # --- evaluation
    run_eval: bool = True
    """evaluate on validation and validation_cnndm (when present) after normalisation [N+ 1.C.10]"""
    local_eval_batch_size: int = 4
    """pairs per forward pass on each process in evaluation and normalisation"""
    max_eval_samples: Optional[int] = None
    """evaluate only the first N rows of each evaluation split (quick runs); None = all"""


@dataclass
class Derived:
    """Values computed from Args, the data and the number of processes; never flags."""

    world_size: int
    gradient_accumulation_steps: int
    total_episodes: int  # pairs actually trained on: num_updates x batch_size
    num_updates: int


def derive(args: Args, world_size: int, num_train_pairs: int) -> Derived:
    """`num_train_pairs`: pairs available after the --total_episodes cap and the skipped rows."""
    micro_per_step = args.local_micro_batch_size * world_size
    if args.batch_size % micro_per_step:
        raise ValueError(
            f"--batch_size {args.batch_size} is not a multiple of local_micro_batch_size x processes = {micro_per_step}"
        )
    num_updates = num_train_pairs // args.batch_size
    if num_train_pairs and not num_updates:
        raise ValueError(f"{num_train_pairs} training pairs make no optimizer step at --batch_size {args.batch_size}")
    return Derived(world_size, args.batch_size // micro_per_step, num_updates * args.batch_size, num_updates)


# ---------------------------------------------------------------------------------------------------------
# Data: query formatting, smart truncation and padding [N+ 1.A]. Copied verbatim into reward_tldr.py and
# ppo_tldr.py so the three stages build identical queries; a test checks the copies stay identical.
# ---------------------------------------------------------------------------------------------------------

QUERY_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"  # [N+ 1.A.3], no trailing space


def load_tokenizer(path: str):
    """The tokenizer with a pad token distinct from EOS [N+ 1.A.1].

    If pad == EOS, masking padding would also mask the real EOS and the policy would never learn to stop.
    When the tokenizer has no pad token or reuses EOS, a new `[PAD]` token is added; the model's embedding is
    resized only if the vocabulary has no spare row for it (see `fit_embeddings`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="right")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token; TL;DR responses must end with one")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def fit_embeddings(model, tokenizer) -> None:
    """Resize the input embedding only when the tokenizer's ids do not fit; record the pad id in the config.

    Rows are counted by `num_embeddings`: under DeepSpeed ZeRO-3 the weight is a partitioned, empty tensor."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


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


# The RM's own data: comparisons [N+ 1.A.10-12] and the SFT references for the bias [N+ 1.C.11]

CNNDM_BATCHES = ("batch0_cnndm", "cnndm0", "cnndm2")  # [N+ 1.A.12] their validation rows form validation_cnndm
CNNDM_FORMAT = "Article:\n{article}\n\nTL;DR:\n"  # [N+ 1.A.12]
COMPARISON_COLUMNS = ("info", "summaries", "choice", "batch", "split")
PAIR_COLUMNS = ["query_token", "chosen_token", "rejected_token", "index"]
# [N+ 1.C.10] the reference's columns, after `id` (info.id) for joining with the data
CSV_COLUMNS = ["id", "query", "chosen", "rejected", "batch", "split", "confidence", "choice", "policies",
               "chosen_policy", "rejected_policy", "accuracy", "chosen_rewards", "rejected_rewards"]


def truncated_article_tokens(tokenizer, article: str, query_length: int, row_name: str) -> list[int]:
    """CNN/DM query ids, shortening the article the way `truncated_query_tokens` shortens a post [N+ 1.A.5, 1.A.12].

    The article is cut until the formatted query, which ends in "TL;DR:\n", fits `query_length` (the reference's
    query tokens). The ids returned are those of that query without the newline: the reference's RM inputs
    re-encoded `query.strip() + summary`, which drops it, and the summary (" ...") follows "TL;DR:" directly."""
    while True:
        text = CNNDM_FORMAT.format(article=article)
        if len(tokenizer.encode(text, add_special_tokens=False)) <= query_length:
            return tokenizer.encode(text.strip(), add_special_tokens=False)
        if not article:
            raise ValueError(f"{row_name}: the CNN/DM query does not fit {query_length} tokens even with an empty "
                             f"article")
        cut = article.rfind("\n")
        article = article[:cut] if cut >= 0 else article[:-1]


def split_cnndm(dataset):
    """Move the validation rows of the CNN/DM batches into their own split `validation_cnndm` [N+ 1.A.12]."""
    import datasets

    if "validation" not in dataset:
        return dataset
    val = dataset["validation"]
    is_cnndm = [b in CNNDM_BATCHES for b in val["batch"]]
    if any(is_cnndm):
        cnndm = val.select([i for i, c in enumerate(is_cnndm) if c])
        if "validation_cnndm" in dataset:
            cnndm = datasets.concatenate_datasets([dataset["validation_cnndm"], cnndm])
        dataset["validation_cnndm"] = cnndm
        dataset["validation"] = val.select([i for i, c in enumerate(is_cnndm) if not c])
    return dataset


def comparison_fields(row: dict, i: int, split: str) -> tuple:
    """(info, summaries as a list of dicts, the row's name for errors, whether it is a CNN/DM row)."""
    info, summaries = row["info"], row["summaries"]
    if isinstance(summaries, dict):  # a `Sequence` of structs arrives as a dict of lists
        summaries = [dict(zip(summaries, values)) for values in zip(*summaries.values())]
    name = f"split {split!r} row {i} (info.id={info.get('id') if isinstance(info, dict) else None!r})"
    return info, summaries, name, row["batch"] in CNNDM_BATCHES


def tokenize_comparisons(dataset, tokenizer, args: Args):
    """Token columns and CSV metadata for every split, skipped rows dropped [N+ 1.A.10-12].

    Returns (dataset, skipped): skipped[split] counts the dropped rows by reason. Token columns are unpadded lists:
    `query_token` (the smart-truncated query), `chosen_token` and `rejected_token` (summary + EOS)."""
    import datasets

    check_comparison_columns(dataset)
    ids, text = datasets.List(datasets.Value("int32")), datasets.Value("string")
    features = datasets.Features({
        "skip": text, "id": text, "query_token": ids, "chosen_token": ids, "rejected_token": ids,
        "response_truncated": datasets.Value("bool"), "query": text, "chosen": text, "rejected": text, "batch": text,
        "split": text, "confidence": datasets.Value("int64"), "choice": datasets.Value("int64"), "policies": text,
        "chosen_policy": text, "rejected_policy": text,
    })
    skipped_row = {"id": "", "query_token": [], "chosen_token": [], "rejected_token": [], "response_truncated": False,
                   "query": "", "chosen": "", "rejected": "", "batch": "", "split": "", "confidence": None, "choice": 0,
                   "policies": "", "chosen_policy": "", "rejected_policy": ""}

    def process(row, i, split_name):
        info, summaries, name, cnndm = comparison_fields(row, i, split_name)
        skip = comparison_problem(info, summaries, row["choice"], cnndm, name)
        if skip:
            return {**skipped_row, "skip": skip}
        if cnndm:
            query = truncated_article_tokens(tokenizer, info["article"], args.cnndm_query_length, name)
            length = args.cnndm_response_length
        else:
            query = truncated_query_tokens(tokenizer, info, args.query_length)  # [N+ 1.A.3-5] as the SFT stage
            length = args.response_length
        chosen, rejected = summaries[row["choice"]], summaries[1 - row["choice"]]
        # [N+ 1.A.10] the texts already start with a space; EOS is appended as an id
        chosen_token, chosen_cut = response_tokens(tokenizer, chosen["text"], length)
        rejected_token, rejected_cut = response_tokens(tokenizer, rejected["text"], length)
        return {
            "skip": "", "id": str(info.get("id")), "query_token": query, "chosen_token": chosen_token,
            "rejected_token": rejected_token,
            "response_truncated": chosen_cut or rejected_cut, "query": tokenizer.decode(query, skip_special_tokens=True),
            "chosen": chosen["text"], "rejected": rejected["text"], "batch": row["batch"], "split": row["split"],
            "confidence": (row.get("extra") or {}).get("confidence"), "choice": row["choice"],
            "policies": "--".join(sorted([chosen["policy"], rejected["policy"]])),  # [N+ 1.A.10]
            "chosen_policy": chosen["policy"], "rejected_policy": rejected["policy"],
        }

    out, skipped = {}, {}
    for split, ds in dataset.items():
        if len(ds):
            ds = ds.map(process, with_indices=True, fn_kwargs={"split_name": split}, remove_columns=ds.column_names,
                        features=features, keep_in_memory=True, load_from_cache_file=False, desc=f"tokenizing {split}")
        else:  # `map` skips an empty split (no training with --total_episodes 0), which would keep the old columns
            ds = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
        skipped[split] = Counter(reason for reason in ds["skip"] if reason)
        ds = ds.filter(lambda reason: not reason, input_columns="skip", keep_in_memory=True).remove_columns("skip")
        out[split] = ds.add_column("index", list(range(len(ds))))
    return datasets.DatasetDict(out), skipped


def tokenize_references(dataset, tokenizer, args: Args):
    """SFT rows -> the query and the reference response " summary<EOS>" exactly as sft_tldr.py builds them
    [N+ 1.A.4-7]; these set the reward bias [N+ 1.C.11]."""
    required = ("id", "subreddit", "title", "post", "summary")
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{args.sft_dataset} train split lacks columns {missing}; expected {list(required)}")

    def process(row):
        query = truncated_query_tokens(tokenizer, row, args.query_length)
        reference, cut = response_tokens(tokenizer, " " + row["summary"], args.normalization_response_length)
        return {"query_token": query, "reference_token": reference, "reference_truncated": cut}

    ds = dataset.map(process, remove_columns=[c for c in dataset.column_names if c != "id"], keep_in_memory=True,
                     load_from_cache_file=False, desc="tokenizing SFT references")
    return ds.add_column("index", list(range(len(ds))))


def collate_pairs(rows: list[dict], pad_token_id: int) -> dict:
    """A micro-batch of B pairs as 2B right-padded sequences cat(query, chosen) then cat(query, rejected), so
    chosen and rejected go through one forward pass [N+ 1.C.4]. The mask comes from the token lengths, never from
    `ids == pad` (which would also hide an EOS equal to the pad id)."""
    seqs = [r["query_token"] + r["chosen_token"] for r in rows] + [r["query_token"] + r["rejected_token"] for r in rows]
    T = max(len(s) for s in seqs)
    lengths = torch.tensor([len(s) for s in seqs])  # (2B,)
    return {
        "input_ids": torch.tensor([right_pad(s, T, pad_token_id) for s in seqs]),  # (2B, T)
        "attention_mask": torch.arange(T)[None, :] < lengths[:, None],  # (2B, T)
        "index": torch.tensor([r["index"] for r in rows]),  # (B,) row of the dataset, for gathering
    }


def collate_references(rows: list[dict], pad_token_id: int, query_length: int) -> dict:
    """Each SFT reference in two layouts [N+ 1.C.11]: right-padded cat(query, reference), whose reward sets the bias,
    and cat(left-padded query, right-padded reference), the layout PPO scores. Their rewards must agree."""
    q_len = torch.tensor([len(r["query_token"]) for r in rows])  # (B,)
    r_len = torch.tensor([len(r["reference_token"]) for r in rows])  # (B,)
    seqs = [r["query_token"] + r["reference_token"] for r in rows]
    T, R = max(len(s) for s in seqs), int(r_len.max())
    # (B, Q'): queries left-padded to query_length, then the all-pad leading columns dropped (queries start with
    # "SUBREDDIT", never with the pad id, so Q' is the longest query)
    queries = trim_padding_columns(torch.tensor([left_pad(r["query_token"], query_length, pad_token_id) for r in rows]),
                                   pad_token_id, "left")
    references = torch.tensor([right_pad(r["reference_token"], R, pad_token_id) for r in rows])  # (B, R)
    Q = queries.shape[1]
    return {
        "input_ids": torch.tensor([right_pad(s, T, pad_token_id) for s in seqs]),  # (B, T)
        "attention_mask": torch.arange(T)[None, :] < (q_len + r_len)[:, None],  # (B, T)
        "padded_input_ids": torch.cat([queries, references], 1),  # (B, Q' + R)
        "padded_attention_mask": torch.cat([torch.arange(Q)[None, :] >= (Q - q_len)[:, None],
                                            torch.arange(R)[None, :] < r_len[:, None]], 1),  # (B, Q' + R)
        "index": torch.tensor([r["index"] for r in rows]),  # (B,)
    }


def training_rows(train, args: Args, process_index: int, num_pairs: int):
    """The raw train rows this process may iterate over, and whether its DataLoader shuffles them [N+ 1.C.9]."""
    if args.per_rank_shuffle:
        # the reference: every process shuffles with its own seed and keeps the first num_pairs rows; the DataLoader
        # does not shuffle, and accelerate hands process r every world_size-th batch of its own permutation
        return train.shuffle(seed=args.seed + process_index * 100003).select(range(num_pairs)), False
    # one permutation from the global seed (the DataLoader's), partitioned across processes by accelerate
    return (train.shuffle(seed=args.seed).select(range(num_pairs)) if num_pairs < len(train) else train), True


# ---------------------------------------------------------------------------------------------------------
# Helper math [N+ 2]
# ---------------------------------------------------------------------------------------------------------


def first_true_indices(bools: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    """Per row, the index of the first True; the row length where there is none [N+ 2]."""
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


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


def last_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last True; -1 where there is none."""
    return bools.size(-1) - 1 - first_true_indices(bools.flip(-1))


def reward_at_eos(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-position scores -> (B,) the score at each row's last real token, the appended EOS [N+ 1.C.5].

    The index comes from the attention mask, which the callers build from the known token lengths, so it is right
    under left padding, right padding and a tokenizer whose pad id is EOS. The reference's
    `first_true_indices(ids == pad) - 1` assumes right padding and pad != EOS. Every row needs a real token."""
    return scores[torch.arange(scores.size(0), device=scores.device), last_true_indices(attention_mask.bool())]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion; (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def calibration_table(margins: np.ndarray, correct: np.ndarray, bin_width: float = 0.5):
    """Accuracy per |r_chosen - r_rejected| bin against sigmoid(bin mid), the accuracy of a calibrated Bradley-Terry
    model; a pair is correct when the RM prefers the human's choice, so accuracy and sigmoid(|margin|) compare."""
    import pandas as pd

    df = pd.DataFrame({"bin": np.floor(np.abs(margins) / bin_width).astype(int), "correct": correct.astype(float)})
    g = df.groupby("bin")["correct"].agg(["mean", "size"]).reset_index()
    mid = (g["bin"] + 0.5) * bin_width
    return pd.DataFrame({"margin_low": g["bin"] * bin_width, "margin_high": (g["bin"] + 1) * bin_width,
                         "margin_mid": mid, "pairs": g["size"], "accuracy": g["mean"],
                         "predicted": 1 / (1 + np.exp(-mid))})


# ---------------------------------------------------------------------------------------------------------
# Model helpers
# ---------------------------------------------------------------------------------------------------------


def disable_dropout(model: torch.nn.Module) -> None:
    """Set p=0 in every dropout layer [N+ 1.B.2]: stochastic forwards would make PPO's ratio differ from 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)


class ScalarModel(torch.nn.Module):
    """Per-position raw rewards (B, T) of a one-label `AutoModelForSequenceClassification` [N+ 1.C.1].

    It holds the HF model as `.model` so that `accelerator.prepare` (DDP, DeepSpeed) wraps a module whose forward is
    the one we call. Pad ids stay in `input_ids` (the embedding has a row for the pad token) and positions come from
    the mask, so left padding does not shift them [N+ 1.D.23]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone = getattr(self.model, self.model.base_model_prefix)
        position_ids = position_ids_from_mask(attention_mask)  # (B, T)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state  # (B, T, H) after the final norm
        return self.model.score(hidden).squeeze(-1)  # (B, T)


def zero3_gathered(param: torch.nn.Parameter):
    """A context in which `param` is whole and writable when the model was loaded under DeepSpeed ZeRO-3 (rank 0's
    values are kept); a no-op otherwise."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def load_reward_model(path: str, tokenizer):
    """A one-label sequence-classification model from the SFT checkpoint, or a reward checkpoint of this script.

    Seed the RNG first: a new head is drawn from it."""
    from transformers import AutoModelForSequenceClassification

    new_head = True  # from an SFT model (or a hub model): a new head; a reward checkpoint keeps its own
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            new_head = model_role(json.load(f)) == "causal_lm"
    model, info = load_checked(AutoModelForSequenceClassification, path, "--sft_model_path",
                               new_ok=("score.",) if new_head else (), num_labels=1, dtype=torch.float32)
    # [N+ 1.C.1] backbone from the SFT model; its LM head is dropped
    rows = model.get_input_embeddings().num_embeddings  # not weight.shape: empty under ZeRO-3
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer at {path} has {len(tokenizer)} tokens (with its pad token) but the model's embedding has "
            f"{rows} rows; expected the SFT checkpoint written by sft_tldr.py, whose embedding fits its tokenizer"
        )
    fit_embeddings(model, tokenizer)  # no resize (checked above); config.pad_token_id for HF's own pooling
    # [N+ 1.C.2] weight ~ N(0, 1/sqrt(hidden+1)) as lm-human-preferences; the reference also has a zero bias. HF's
    # `score` is nn.Linear(hidden, 1, bias=False) for Llama, GPT-NeoX and GPT-2: a bias cancels in
    # -logsigmoid(r_chosen - r_rejected) (its gradient is exactly 0), so the reference's bias stays 0 through
    # training and the bias-free head is numerically the same model.
    if any(k.startswith("score.") for k in info["missing_keys"]):  # a new head; a reward checkpoint keeps its own
        with zero3_gathered(model.score.weight):  # under ZeRO-3 the weight is partitioned: gather, draw, re-shard
            torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.score.in_features + 1))
        if model.score.bias is not None:
            torch.nn.init.zeros_(model.score.bias)
    disable_dropout(model)  # [N+ 1.C.3]
    return model


# ---------------------------------------------------------------------------------------------------------
# Scoring and evaluation
# ---------------------------------------------------------------------------------------------------------


def gathered_in_order(parts: list[tuple], size: int, what: str) -> list[np.ndarray]:
    """Concatenate gathered (index, value, ...) batches and sort them by index; every row exactly once."""
    index, *values = (torch.cat(c).cpu() for c in zip(*parts))
    order = np.argsort(index.numpy(), kind="stable")
    if not np.array_equal(index.numpy()[order], np.arange(size)):
        raise RuntimeError(f"{what}: gathered {len(order)} rows, expected each of {size} exactly once")
    return [v.float().numpy()[order] for v in values]  # float: bf16 (DeepSpeed) has no numpy type


@torch.no_grad()
def score_pairs(model, dataset, args: Args, accelerator, pad_token_id: int, desc: str):
    """Raw rewards at EOS of every pair, gathered over all processes: (chosen, rejected), each (N,) in row order."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        dataset.select_columns(PAIR_COLUMNS), batch_size=args.local_eval_batch_size,
        collate_fn=functools.partial(collate_pairs, pad_token_id=pad_token_id),
    )
    parts = []
    loader = accelerator.prepare_data_loader(loader)
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process):
        mask = batch["attention_mask"]
        chosen, rejected = reward_at_eos(model(batch["input_ids"], mask), mask).chunk(2)  # (B,), (B,)
        parts.append(accelerator.gather_for_metrics((batch["index"], chosen, rejected)))
    return gathered_in_order(parts, len(dataset), desc)


@torch.no_grad()
def score_references(model, dataset, args: Args, accelerator, pad_token_id: int):
    """Raw rewards of the SFT references, unpadded and in PPO's padded layout, gathered: two (N,) arrays [N+ 1.C.11]."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        dataset.select_columns(["query_token", "reference_token", "index"]), batch_size=args.local_eval_batch_size,
        collate_fn=functools.partial(collate_references, pad_token_id=pad_token_id, query_length=args.query_length),
    )
    parts = []
    loader = accelerator.prepare_data_loader(loader)
    for batch in tqdm(loader, desc="normalization", disable=not accelerator.is_local_main_process):
        mask, padded_mask = batch["attention_mask"], batch["padded_attention_mask"]
        raw = reward_at_eos(model(batch["input_ids"], mask), mask)  # (B,)
        padded = reward_at_eos(model(batch["padded_input_ids"], padded_mask), padded_mask)  # (B,)
        parts.append(accelerator.gather_for_metrics((batch["index"], raw, padded)))
    return gathered_in_order(parts, len(dataset), "normalization")


def accuracy_metrics(df, split: str) -> dict:
    """Accuracy, its 95% interval and the breakdowns of [N+ 1.C.10, 3] from a table of scored pairs."""
    correct = int(df["accuracy"].sum())
    low, high = wilson_interval(correct, len(df))
    metrics = {f"eval/rm/{split}/accuracy": correct / max(len(df), 1), f"eval/rm/{split}/accuracy_ci95_low": low,
               f"eval/rm/{split}/accuracy_ci95_high": high, f"eval/rm/{split}/num_pairs": len(df)}
    for column in ("split", "batch", "confidence", "policies"):
        for value, accuracy in df.groupby(column)["accuracy"].mean().items():
            metrics[f"eval/rm/{split}/accuracy/{column}/{value}"] = float(accuracy)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Training: the stage itself, read top to bottom
# ---------------------------------------------------------------------------------------------------------
def train_reward(args: Args, stop: "StopOnSignal"):
    """The stage itself; `stop.received` is read once per optimizer step."""
    import datasets
    import pandas as pd
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    accelerator = make_accelerator()
    # every check that can fail runs before the first file is written (run_info.json, metrics.jsonl)
    check_flags(args, positive=("batch_size", "local_micro_batch_size", "query_length", "response_length",
                                "cnndm_query_length", "cnndm_response_length", "normalization_response_length",
                                "local_eval_batch_size"),
                non_negative=("learning_rate", "adam_eps", "weight_decay", "total_episodes", "save_every",
                              "normalization_samples", "max_eval_samples"))
    if args.total_episodes:
        check_episodes(args.total_episodes, args.batch_size)
    check_model_source(args.sft_model_path, "--sft_model_path", ("causal_lm", "reward_model"))
    tokenizer = load_tokenizer(args.sft_model_path)  # the SFT checkpoint's tokenizer with its [PAD] [N+ 1.A.1]
    pad = tokenizer.pad_token_id
    with accelerator.main_process_first():  # the first process builds the datasets cache, the others reuse it
        dataset = load_splits(args.dataset, args.dataset_subset, args.dataset_revision)  # [N+ 1.A.2]
        check_comparison_rows(dataset)  # all rows, named as in the files, before any cut
        dataset = split_cnndm(dataset)  # [N+ 1.A.12] the CNN/DM validation rows as their own split
        # the SFT references that set the reward bias, read now so a wrong --sft_dataset fails before training
        references = load_splits(args.sft_dataset, flag="--sft_dataset") if args.normalization_samples != 0 else None
    if references is not None and "train" not in references:
        raise ValueError(f"{args.sft_dataset} has no 'train' split (found {list(references)})")
    if "train" not in dataset:
        raise ValueError(f"{args.dataset} has no 'train' split (found {list(dataset)})")
    if args.run_eval and "validation" not in dataset:
        raise ValueError(f"{args.dataset} has no 'validation' split to evaluate on (found {list(dataset)})")
    eval_splits = [s for s in ("validation", "validation_cnndm") if args.run_eval and s in dataset]
    for split in eval_splits:
        if args.max_eval_samples is not None:
            dataset[split] = dataset[split].select(range(min(args.max_eval_samples, len(dataset[split]))))
    if args.total_episodes is not None and args.total_episodes > len(dataset["train"]):
        raise ValueError(f"--total_episodes {args.total_episodes} exceeds the {len(dataset['train'])} training pairs "
                         f"(the RM trains one epoch [N+ 1.C.8])")
    num_pairs = len(dataset["train"]) if args.total_episodes is None else args.total_episodes
    train, shuffle = training_rows(dataset["train"], args, accelerator.process_index, num_pairs)
    dataset, skipped = tokenize_comparisons(
        datasets.DatasetDict({"train": train, **{s: dataset[s] for s in eval_splits}}), tokenizer, args)  # what is used
    eval_splits = [s for s in eval_splits if len(dataset[s])]

    # skipped rows are not replaced: every process trains on as many pairs as the one with the fewest
    num_train = int(accelerator.gather(torch.tensor([len(dataset["train"])], device=accelerator.device)).min())
    derived = derive(args, accelerator.num_processes, num_train)
    accelerator.gradient_accumulation_steps = derived.gradient_accumulation_steps  # read by prepare (DeepSpeed too)
    checkpoint, resumed = resume_state(args, derived.world_size, RESUMABLE_CHANGES, accelerator.print)
    run_name = resumed["run_name"] if resumed else f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = broadcast_object_list([run_name])[0]  # one name for all ranks
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    seed_everything(args.seed)  # the head and the data order come from the global seed; nothing here samples
    model = ScalarModel(load_reward_model(args.sft_model_path, tokenizer))  # before any output: checked weights
    check_output_dir(args.output_dir)
    if accelerator.is_main_process:
        if resumed is None:  # a fresh run never appends to an older run's records
            set_aside_previous_run(args.output_dir, accelerator.print)
        write_run_info(args.output_dir, args, derived, accelerator.mixed_precision)
        if resumed is not None:  # drop what the interrupted run logged after its last state
            cut_metrics(args.output_dir, resumed["metrics_lines"])
    logger = Logger(args.output_dir, accelerator.is_main_process, args, run_name)
    data_metrics = {}
    for split, ds in dataset.items():
        data_metrics[f"data/{split}/pairs"] = len(ds)
        for reason, n in sorted(skipped[split].items()):
            data_metrics[f"data/{split}/skipped/{reason}"] = n
            accelerator.print(f"warning: skipped {n} {split} rows: {reason} (see comparison_problem)")
        cut = sum(ds["response_truncated"])
        if cut:
            accelerator.print(f"warning: {cut}/{len(ds)} {split} pairs have a summary cut to the response length "
                              f"(EOS lost)")
    if resumed is None:  # a resumed run kept these in metrics.jsonl
        logger.log(data_metrics, 0)

    accelerator.print(
        f"{derived.total_episodes} training pairs, batch {args.batch_size} = {args.local_micro_batch_size} micro x "
        f"{derived.gradient_accumulation_steps} accumulation x {derived.world_size} processes -> {derived.num_updates} "
        f"updates; evaluating {', '.join(f'{s} ({len(dataset[s])})' for s in eval_splits) or 'nothing'}"
    )

    # ---- training [N+ 1.C.4-8]
    samples, train_time, update = 0, 0.0, 0  # update: optimizer steps done
    if derived.num_updates:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay
        )  # [N+ 1.C.7]
        # not passed to `prepare`: accelerate would step it once per process per optimizer step
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0,
                                  num_training_steps=derived.num_updates)
        loader = torch.utils.data.DataLoader(
            dataset["train"].select_columns(PAIR_COLUMNS), batch_size=args.local_micro_batch_size, shuffle=shuffle,
            drop_last=True, collate_fn=functools.partial(collate_pairs, pad_token_id=pad),
            generator=torch.Generator().manual_seed(args.seed),  # [N+ 1.C.9] the same permutation on every process
        )
        configure_deepspeed(accelerator, args.local_micro_batch_size, args.max_grad_norm)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        write_deepspeed_config(accelerator, args.output_dir)
        accelerator.register_for_checkpointing(scheduler)  # saved and restored with the model and optimizer
        accuracies = []
        if resumed is not None:
            accelerator.load_state(checkpoint)  # weights, optimizer, scheduler and this rank's RNG states
            update, samples, accuracies = resumed["update"], resumed["samples"], resumed["accuracies"]
            accelerator.print(f"resumed from {checkpoint} at optimizer step {update + 1}")
        model.train()
        start, window = time.time(), []
        progress = tqdm(total=derived.num_updates, initial=update, disable=not accelerator.is_local_main_process,
                        desc="reward model")

        # resumable states, divergence and safe points (part 2)
        states = RunStates(accelerator, args, run_name, derived.world_size, stop, progress, checkpoint, update,
                           samples=samples, accuracies=accuracies)

        batches = iter(loader)
        for _ in range(update * derived.gradient_accumulation_steps):  # resume: replay the data order to its position
            next(batches)
        for micro_step in range(update * derived.gradient_accumulation_steps,
                                derived.num_updates * derived.gradient_accumulation_steps):
            batch = next(batches)
            mask = batch["attention_mask"]
            with accelerator.accumulate(model):
                # [N+ 1.C.4-5] chosen rows then rejected rows in one forward pass, read at the EOS token
                chosen, rejected = reward_at_eos(model(batch["input_ids"], mask), mask).chunk(2)  # (B,), (B,)
                loss = -F.logsigmoid(chosen - rejected).mean()  # [N+ 1.C.6]
                states.stop_if_diverged({"train/rm/chosen_rewards": chosen, "train/rm/rejected_rewards": rejected,
                                         "train/rm/loss": loss}, f"optimizer step {update + 1} (micro-batch {micro_step})")
                accelerator.backward(loss)
                if args.max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            accuracy = (chosen > rejected).float().mean()
            window.append(torch.stack([loss, accuracy, chosen.mean(), rejected.mean()]).detach())
            if accelerator.sync_gradients:
                lr = scheduler.get_last_lr()[0]  # the LR this update used
                scheduler.step()  # [N+ 1.C.7] once per optimizer step
                update += 1
                samples += args.batch_size
                # (4,): the window's mean on every process, then over processes [N+ 1.C.12]
                stats = accelerator.gather(torch.stack(window).mean(0, keepdim=True)).mean(0).tolist()
                window = []
                accuracies.append(stats[1])
                logger.log({"train/rm/loss": stats[0], "train/rm/accuracy": stats[1],
                            "train/rm/chosen_rewards": stats[2], "train/rm/rejected_rewards": stats[3],
                            "train/rm/lr": lr}, samples)
                progress.update(1)
                progress.set_postfix(loss=f"{stats[0]:.3f}", acc=f"{stats[1]:.3f}", acc_avg=f"{np.mean(accuracies):.3f}")
                # safe point: a resumable state every --save_every steps, and on SIGTERM/SIGINT before exiting
                states.finished(update, samples=samples, accuracies=accuracies)
                states.safe_point(derived.num_updates, f"optimizer step {update}")
        progress.close()
        train_time = time.time() - start
        accelerator.print(f"trained {samples} pairs in {train_time:.0f}s, mean train accuracy {np.mean(accuracies):.4f}")
    else:  # evaluation only: forward passes need no DDP/DeepSpeed wrapper
        model = model.to(accelerator.device)
    stop.restore()  # normalisation, evaluation and the final save are not resumable: a signal acts as usual
    model.eval()
    unwrapped = accelerator.unwrap_model(model).model  # the Hugging Face model

    # ---- normalisation: reference summaries of the SFT train split average 0 [N+ 1.C.11]
    start, bias = time.time(), float(getattr(unwrapped.config, "reward_bias", 0.0))
    if args.normalization_samples != 0:
        references = references["train"]
        if args.normalization_samples is not None and args.normalization_samples < len(references):
            references = references.shuffle(seed=args.seed).select(range(args.normalization_samples))
        if not len(references):
            raise ValueError(f"{args.sft_dataset}: no train rows to set the reward bias "
                             f"(--normalization_samples 0 skips normalisation)")
        references = tokenize_references(references, tokenizer, args)
        cut = sum(references["reference_truncated"])
        if cut:
            accelerator.print(f"warning: {cut}/{len(references)} references exceed {args.normalization_response_length} "
                              f"tokens and were cut (EOS lost), as in the SFT and PPO stages")
        raw, padded = score_references(model, references, args, accelerator, pad)
        bias = float(raw.mean())
        normalized, diff = raw - bias, raw - padded  # diff: unpadded minus PPO's left-padded layout
        metrics = {
            "eval/rm/reward_bias": bias, "eval/rm/normalized_mean": float(normalized.mean()),
            "eval/rm/normalized_std": float(normalized.std(ddof=1)) if len(raw) > 1 else 0.0,
            "eval/rm/normalized_max": float(normalized.max()), "eval/rm/normalized_min": float(normalized.min()),
            "eval/rm/normalized_unexpected_reward_diff_mean": float(diff.mean()),
            "eval/rm/normalized_unexpected_reward_diff_abs_max": float(np.abs(diff).max()),
            # the reference's threshold, named rtol but applied to |diff|
            "eval/rm/normalized_unexpected_reward_diff_gt_rtol_mean": float((np.abs(diff) > 1e-2).mean()),
        }
        logger.log(metrics, samples)
        accelerator.print("normalization: " + ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()))
        if accelerator.is_main_process:
            df = pd.DataFrame({"id": references["id"], "reward": normalized, "raw_reward": raw,
                               "padded_raw_reward": padded})
            df.to_csv(os.path.join(args.output_dir, "normalization_rewards.csv"), index=False)
            logger.table("samples/normalized", df)
    unwrapped.config.reward_bias = bias  # normalised reward = raw - reward_bias, for every loader of the checkpoint
    normalization_time = time.time() - start

    # ---- evaluation, gathered over all processes [N+ 1.C.10]
    start = time.time()
    for split in eval_splits:
        chosen, rejected = score_pairs(model, dataset[split], args, accelerator, pad, desc=f"eval {split}")
        df = dataset[split].select_columns(CSV_COLUMNS[:11]).to_pandas()
        df["confidence"] = df["confidence"].astype("Int64")  # annotator confidence 1-9, missing for some rows
        df["accuracy"] = (chosen > rejected).astype(float)  # [N+ 1.C.6] strict: a tie counts as wrong
        df["chosen_rewards"], df["rejected_rewards"] = chosen - bias, rejected - bias
        metrics = accuracy_metrics(df, split)
        calibration = calibration_table(chosen - rejected, chosen > rejected)
        metrics[f"eval/rm/{split}/calibration_error"] = float(
            (calibration["pairs"] * (calibration["accuracy"] - calibration["predicted"]).abs()).sum() / max(len(df), 1))
        logger.log(metrics, samples)
        low, high = metrics[f"eval/rm/{split}/accuracy_ci95_low"], metrics[f"eval/rm/{split}/accuracy_ci95_high"]
        accelerator.print(f"eval/rm/{split}/accuracy: {metrics[f'eval/rm/{split}/accuracy']:.4f} "
                          f"(95% CI {low:.4f}-{high:.4f}, {len(df)} pairs)")
        if accelerator.is_main_process:
            df[CSV_COLUMNS].to_csv(os.path.join(args.output_dir, f"{split}_rewards.csv"), index=False)
            calibration.to_csv(os.path.join(args.output_dir, f"{split}_calibration.csv"), index=False)
            plot_calibration(calibration, os.path.join(args.output_dir, f"{split}_calibration.png"),
                             f"{split}: accuracy {metrics[f'eval/rm/{split}/accuracy']:.3f}, {len(df)} pairs")
            logger.table(f"samples/{split}/query_responses", df[CSV_COLUMNS])
    logger.log({"time/train_seconds": train_time, "time/normalization_seconds": normalization_time,
                "time/eval_seconds": time.time() - start, "time/peak_memory_gib": peak_memory_gib()}, samples)

    # ---- save a standard Hugging Face folder [N+ 1.C.13]; an evaluation-only run saves nothing
    if derived.num_updates:
        accelerator.wait_for_everyone()
        state_dict = accelerator.get_state_dict(model)  # every rank takes part; under ZeRO-3 only rank 0 gets one
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}  # HF names
        save_model_atomic(unwrapped, tokenizer, args.output_dir, accelerator, state_dict=state_dict)
        accelerator.print(f"saved {args.output_dir} (reward_bias {bias:.4f}, peak memory {peak_memory_gib():.2f} GiB)")
    accelerator.end_training()
    return unwrapped


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


def comparison_problem(info, summaries, choice, cnndm: bool, name: str) -> Optional[str]:
    """Why a comparison row is skipped (None: keep it); a ValueError naming the row when it is malformed.

    Malformed, an error (the data is not in the hub schema and guessing would train on wrong labels): no `info`;
    `summaries` not exactly two entries with a string `text` and `policy`; `choice` not 0 or 1; a TL;DR row whose
    subreddit, title or post is not a string (e.g. a CNN/DM article row outside the CNN/DM batches); a CNN/DM row
    without a string article. Skipped, counted and logged (well-formed but nothing to compare): an empty post or
    article ("empty_post", "empty_article") and a summary with no text ("empty_summary"), whose response would be a
    bare EOS."""
    if not isinstance(info, dict):
        raise ValueError(f"{name}: no `info` (expected id, subreddit, title, post, article, site)")
    if not (isinstance(summaries, list) and len(summaries) == 2 and all(
            isinstance(s, dict) and isinstance(s.get("text"), str) and isinstance(s.get("policy"), str)
            for s in summaries)):
        raise ValueError(f"{name}: `summaries` must be two entries with a string `text` and `policy`, "
                         f"got {summaries!r:.300}")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise ValueError(f"{name}: `choice` must be 0 or 1, got {choice!r}")
    if cnndm:
        if not isinstance(info.get("article"), str):
            raise ValueError(f"{name}: a CNN/DM row (batch in {CNNDM_BATCHES}) needs a string info.article")
        if not info["article"].strip():
            return "empty_article"
    else:
        bad = {k: info.get(k) for k in ("subreddit", "title", "post") if not isinstance(info.get(k), str)}
        if bad:
            raise ValueError(f"{name}: info fields {bad} must be strings (rows with an article instead of a post must "
                             f"come from a CNN/DM batch {CNNDM_BATCHES})")
        if not info["post"].strip():
            return "empty_post"
    if any(not s["text"].strip() for s in summaries):
        return "empty_summary"
    return None


def check_comparison_columns(dataset) -> None:
    for split, ds in dataset.items():
        missing = [c for c in COMPARISON_COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"split {split!r} lacks columns {missing}; expected {list(COMPARISON_COLUMNS)} (+ extra)")


def check_comparison_rows(dataset) -> None:
    """Check every row of every split before --total_episodes and --max_eval_samples cut and shuffle them: a missing
    column or a malformed row (`comparison_problem`) is an error naming the split and the row of its file, so a
    bad row fails a smoke run too. Text only, no tokenizing: cheap."""
    check_comparison_columns(dataset)
    for split, ds in dataset.items():
        for i, row in enumerate(ds.select_columns(["info", "summaries", "choice", "batch"])):
            info, summaries, name, cnndm = comparison_fields(row, i, split)
            comparison_problem(info, summaries, row["choice"], cnndm, name)


def plot_calibration(table, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    xs = np.linspace(0, max(float(table["margin_high"].max()), 1.0), 200)
    ax.plot(xs, 1 / (1 + np.exp(-xs)), "--", color="gray", label="calibrated: sigmoid(|margin|)")
    ax.plot(table["margin_mid"], table["accuracy"], "o-", label="reward model (labels: pairs per bin)")
    for x, y, n in zip(table["margin_mid"], table["accuracy"], table["pairs"]):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set(xlabel="|r_chosen - r_rejected| (bin mid, width 0.5)", ylabel="accuracy", ylim=(-0.05, 1.1), title=title)
    ax.grid(ls="--", alpha=0.5)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Flags that may change between an interrupted run and its resumption; any other change would alter the run.
RESUMABLE_CHANGES = {"resume", "track", "wandb_project_name", "wandb_entity", "output_dir", "save_every",
                     "keep_states", "run_eval", "max_eval_samples", "local_eval_batch_size"}


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(args: Args):
    """Run the stage with SIGTERM/SIGINT turned into "save a state and exit"; returns the Hugging Face reward model
    (with `config.reward_bias` set)."""
    with StopOnSignal() as stop:
        return train_reward(args, stop)


if __name__ == "__main__":
    main(tyro.cli(Args))
