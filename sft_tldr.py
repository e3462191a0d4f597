"""Stage 1 of 3: supervised fine-tuning (SFT) on TL;DR reference summaries.

Reproduces the SFT stage of "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization" (Huang et al., 2024, arXiv 2403.17031). Every implementation detail carries a tag such as
`[N+ 1.B.4]` that points into the project's checklist of the reference code (sections 1.A data, 1.B SFT,
2 helper math, 3 metric names); `grep -n "N+ 1.B" sft_tldr.py` maps the checklist to the code.

What it does, top to bottom:
  1. builds the TL;DR queries (`SUBREDDIT/TITLE/POST/TL;DR:`), smart-truncates the post at a newline until the
     query fits 512 tokens and left-pads it; appends " summary<EOS>" as the reference response [N+ 1.A];
  2. trains the causal LM with the token-mean cross-entropy over every non-pad token, AdamW 3e-6 / eps 1e-5,
     cosine schedule, global batch 128, one epoch [N+ 1.B];
  3. evaluates on validation and test: teacher-forced loss, then samples 53 tokens at temperature 0.01,
     truncates after the first EOS and scores ROUGE-1/2/L against the reference [N+ 1.B.10-13];
  4. saves a standard Hugging Face folder (safetensors, tokenizer with its pad token, generation config) that
     `reward_tldr.py` and `ppo_tldr.py` load with `from_pretrained`.

Launch:
  python sft_tldr.py                                          # paper defaults, one GPU (grad-accum keeps batch 128)
  accelerate launch --config_file benchmark/accelerate/deepspeed_zero2.yaml sft_tldr.py --seed 44413
  python sft_tldr.py --base_model models/smollm2-135m --dataset data/tldr_synth/sft \
      --batch_size 8 --total_episodes 64 --max_eval_samples 16 --output_dir runs/sft_smoke   # tiny CPU run

Deviations from the reference code (token concatenation instead of re-encoding, EOS-safe generation, ROUGE via
`rouge-score`, ...), fault handling and every metric: README "Stage notes", `sft_tldr.py`. The main metrics
(<output_dir>/metrics.jsonl, x-axis `samples` = training sequences seen): train/sft/loss,
{validation,test}/sft/loss and {validation,test}/sft/rouge/{rouge1,rouge2,rougeL}.
"""

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
import torch.nn.functional as F
import tyro

# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Args:
    # --- run and tracking
    exp_name: str = "sft_tldr"
    """name of this experiment; the run name is `{exp_name}__{seed}__{unix time}`"""
    seed: int = 44413
    """global seed: data order and initialisation; the paper's four seeds are 44413, 55513, 66613, 77713 [N+ 1.B.9]"""
    track: bool = False
    """log metrics and sample tables to Weights & Biases as well as to metrics.jsonl"""
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

    # --- data
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """model to fine-tune: a hub name or a local folder [N+ 1.B.1]"""
    dataset: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    """SFT data: a hub dataset of parquet files (the default is the reference's, README "Datasets") or a local folder
    with one .jsonl/.json/.parquet file per split, columns id, subreddit, title, post, summary [N+ 1.A.2]"""
    dataset_revision: Optional[str] = None
    """hub revision of --dataset (branch, tag or commit hash, to pin the data); None = the main branch"""
    query_length: int = 512
    """query tokens after smart truncation and left padding [N+ 1.A.4]"""
    response_length: int = 53
    """reference response tokens (right-padded) and sampled tokens at evaluation [N+ 1.A.7, 1.B.10]"""
    preprocess_only: bool = False
    """tokenize, save the DatasetDict (save_to_disk) and the tokenizer into output_dir, and exit"""

    # --- optimisation
    learning_rate: float = 3e-6
    """AdamW learning rate [N+ 1.B.6]"""
    adam_eps: float = 1e-5
    """AdamW epsilon (torch's default is 1e-8) [N+ 1.B.6]"""
    weight_decay: float = 0.01
    """AdamW weight decay; the reference uses torch's default 0.01 [N+ 1.B.6]"""
    max_grad_norm: Optional[float] = None
    """clip the global gradient norm; None = no clipping, as the reference (also under DeepSpeed, whose
    `gradient_clipping: auto` accelerate would set to 1.0) [N+ 1.D.21]"""
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    """LR schedule over the optimizer steps, no warm-up [N+ 1.B.7]"""
    batch_size: int = 128
    """global batch (sequences per optimizer step) = local_micro_batch_size x gradient accumulation x
    processes; gradient accumulation is derived from it [N+ 1.B.8]"""
    local_micro_batch_size: int = 1
    """sequences per forward pass on each process (HF's per_device_train_batch_size) [N+ 1.B.8]"""
    num_train_epochs: int = 1
    """passes over the training split [N+ 1.B.8]"""
    total_episodes: Optional[int] = None
    """training sequences to use (default: the whole split x epochs); 0 skips training (evaluate the base model)"""

    # --- evaluation
    run_eval: bool = True
    """evaluate on validation and test after training [N+ 1.B.13]"""
    eval_splits: tuple[str, ...] = ("validation", "test")
    """splits to evaluate [N+ 1.B.13]"""
    local_eval_batch_size: int = 4
    """queries per generation batch on each process [N+ 1.B.13]"""
    max_eval_samples: Optional[int] = None
    """evaluate only the first N rows of each split (quick runs); None = all"""
    eval_temperature: float = 0.01
    """sampling temperature at evaluation, as OpenAI's sample.py [N+ 1.B.10, 1.F.6]"""
    stop_generation_at_eos: bool = False
    """stop sampling a batch once every response has an EOS (faster; the reference samples response_length tokens
    and truncates after the first EOS, which gives the same evaluated texts; only the random stream of later
    batches changes)"""


@dataclass
class Derived:
    """Values computed from Args and the number of processes; never flags."""

    world_size: int
    gradient_accumulation_steps: int
    total_episodes: int
    num_updates: int


def derive(args: Args, world_size: int, num_train_rows: int) -> Derived:
    micro_per_step = args.local_micro_batch_size * world_size
    if args.batch_size % micro_per_step:
        raise ValueError(
            f"--batch_size {args.batch_size} is not a multiple of local_micro_batch_size x processes = {micro_per_step}"
        )
    if args.keep_states < 1:
        raise ValueError(f"--keep_states {args.keep_states}: keep at least the newest state")
    total = num_train_rows * args.num_train_epochs if args.total_episodes is None else args.total_episodes
    return Derived(world_size, args.batch_size // micro_per_step, total, total // args.batch_size)


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


# ---------------------------------------------------------------------------------------------------------
# Helper math [N+ 2]
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


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Token-mean next-token cross-entropy over every non-pad token, query included [N+ 1.B.4, 2]."""
    labels = input_ids.masked_fill(input_ids == pad_token_id, -1)  # (B, T)
    # (B, T-1, V): position t predicts token t+1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-1)


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


def prepare_for_sampling(model) -> None:
    """Clear the ids that would stop or suppress generation (see `sampling_config`)."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None


@torch.no_grad()
def generate(model, queries: torch.Tensor, pad_token_id: int, generation_config) -> torch.Tensor:
    """Sample responses for left-padded queries; returns (B, R) response ids [N+ 1.B.11].

    HF generate derives positions from the attention mask, like our forward passes."""
    out = model.generate(input_ids=queries, attention_mask=queries != pad_token_id, generation_config=generation_config)
    return out[:, queries.shape[1] :]


# ---------------------------------------------------------------------------------------------------------
# Data pipeline and evaluation
# ---------------------------------------------------------------------------------------------------------


def tokenize_sft(dataset, tokenizer, args: Args):
    """Add query_token, reference_response_token and query_reference_response_token to every split [N+ 1.A].

    Returns (dataset, skipped): malformed rows and duplicate ids are errors naming the split and row, and rows
    with an empty post or summary are dropped and counted in skipped[split] by reason (`drop_bad_rows`)."""
    pad, Q, R = tokenizer.pad_token_id, args.query_length, args.response_length
    dataset, skipped = drop_bad_rows(dataset)

    def process(row):
        query = truncated_query_tokens(tokenizer, row, Q)
        response, cut = response_tokens(tokenizer, " " + row["summary"], R)  # [N+ 1.A.7] leading space + EOS
        return {
            "query_token": left_pad(query, Q, pad),
            "query": tokenizer.decode(query, skip_special_tokens=True),
            "reference_response": " " + row["summary"],
            "reference_response_token": right_pad(response, R, pad),
            "reference_response_token_len": len(response),
            "reference_response_truncated": cut,
            # [N+ 1.A.8] no left padding inside the training sequence
            "query_reference_response_token": right_pad(query + response, Q + R, pad),
            "query_reference_response_token_len": len(query) + len(response),
        }

    for split, ds in dataset.items():
        dataset[split] = ds.map(process, load_from_cache_file=False, desc=f"tokenizing {split}")
    return dataset, skipped


@torch.no_grad()
def evaluate(model, tokenizer, dataset, args: Args, accelerator, gen_config):
    """Teacher-forced loss, T=0.01 samples truncated after EOS, and ROUGE [N+ 1.B.13]."""
    from rouge_score import rouge_scorer

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    loader = torch.utils.data.DataLoader(
        dataset.with_format("torch", columns=["query_token", "reference_response_token"]),
        batch_size=args.local_eval_batch_size,
    )
    loader = accelerator.prepare_data_loader(loader)
    unwrapped = accelerator.unwrap_model(model)
    losses, responses, references, queries = [], [], [], []
    from tqdm.auto import tqdm

    # sampling a few hundred prompts takes minutes on a CPU: show it
    for batch in tqdm(loader, desc="evaluation", disable=not accelerator.is_local_main_process):
        query, reference = batch["query_token"], batch["reference_response_token"]
        # (a) teacher-forced loss on cat(left-padded query, right-padded reference), without the columns that are
        #     padding in every row (positions come from the mask, so the loss is the same, on far fewer tokens)
        seq = torch.cat([trim_padding_columns(query, pad, "left"), trim_padding_columns(reference, pad, "right")], 1)
        loss = sft_loss(forward(model, seq, pad).logits, seq, pad)
        losses.append(accelerator.gather_for_metrics(loss.reshape(1)))
        # (b) sample, then pad everything after the first EOS [N+ 1.B.12]. One autocast context around the whole
        #     generation: under bf16 the weights are cast once, not at every decoding step, for the same tokens
        #     (1.05x faster sampling on an AMD EPYC: `python benchmark/perf/bf16_cpu_checks.py generation`)
        with accelerator.autocast():
            response = generate(unwrapped, trim_padding_columns(query, pad, "left"), pad, gen_config)
        response = truncate_response(response, eos, pad)
        decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)  # noqa: E731
        responses += accelerator.gather_for_metrics(decode(response), use_gather_object=True)
        references += accelerator.gather_for_metrics(decode(reference), use_gather_object=True)
        queries += accelerator.gather_for_metrics(decode(query), use_gather_object=True)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, hyp) for ref, hyp in zip(references, responses)]
    rouge = {k: float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}
    # gather_for_metrics keeps dataset order (batches interleave by rank), so ids line up with the rows
    table = {"id": dataset["id"][: len(queries)], "query": queries, "response": responses, "reference": references}
    return float(torch.cat(losses).mean()), rouge, table


# ---------------------------------------------------------------------------------------------------------
# Training: the stage itself, read top to bottom
# ---------------------------------------------------------------------------------------------------------
def train_sft(args: Args, stop: "StopOnSignal"):
    """The stage itself; `stop.received` is read once per optimizer step."""
    import pandas as pd
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, get_scheduler

    # every check that can fail runs before the first file is written (run_info.json, metrics.jsonl)
    check_flags(args, positive=("batch_size", "local_micro_batch_size", "num_train_epochs", "query_length",
                                "response_length", "local_eval_batch_size"),
                non_negative=("learning_rate", "adam_eps", "weight_decay", "total_episodes", "save_every",
                              "max_eval_samples", "eval_temperature"))
    if args.total_episodes:
        check_episodes(args.total_episodes, args.batch_size)
    check_model_source(args.base_model, "--base_model", ("causal_lm",))
    tokenizer = load_tokenizer(args.base_model)
    dataset = load_splits(args.dataset, revision=args.dataset_revision)
    if "train" not in dataset:
        raise ValueError(f"{args.dataset} has no 'train' split (found {list(dataset)})")
    missing = [s for s in args.eval_splits if args.run_eval and s not in dataset]
    if missing:
        raise ValueError(f"{args.dataset} lacks evaluation splits {missing} (found {list(dataset)})")
    # the whole of every split is checked (text only, cheap) before --total_episodes and --max_eval_samples cut it:
    # a bad row or a repeated id fails a smoke run too, and the errors name rows of the files
    dataset, skipped = drop_bad_rows(dataset)
    eval_keys = {split: split for split in args.eval_splits}  # evaluated split -> its key in `dataset`
    if "train" in eval_keys:  # sampling the training posts (e.g. for comparisons): kept apart from the training cut
        eval_keys["train"] = "train_evaluated"
        dataset["train_evaluated"], skipped["train_evaluated"] = dataset["train"], skipped["train"]
    if args.max_eval_samples is not None:
        for key in eval_keys.values():
            dataset[key] = dataset[key].select(range(min(args.max_eval_samples, len(dataset[key]))))
    if args.total_episodes is not None:  # tokenize only what is used
        used = min(args.total_episodes, len(dataset["train"]))
        dataset["train"] = dataset["train"].shuffle(seed=args.seed).select(range(used)) if used < len(dataset["train"]) else dataset["train"]

    accelerator = make_accelerator()
    with accelerator.main_process_first():
        dataset, _ = tokenize_sft(dataset, tokenizer, args)  # the rows were checked above: nothing more is skipped
    data_metrics = {}
    for split, ds in dataset.items():
        data_metrics[f"data/{split}/rows"] = len(ds)
        for reason, n in sorted(skipped[split].items()):
            data_metrics[f"data/{split}/skipped/{reason}"] = n
            accelerator.print(f"warning: skipped {n} {split} rows: {reason} (see sft_row_problem)")
        cut = sum(ds["reference_response_truncated"]) if len(ds) else 0  # an empty split gets no new columns
        if cut:
            accelerator.print(f"warning: {cut}/{len(ds)} {split} summaries exceed {args.response_length} tokens and were truncated (EOS lost)")
    derived = derive(args, accelerator.num_processes, len(dataset["train"]))  # rows left after the skips
    accelerator.gradient_accumulation_steps = derived.gradient_accumulation_steps  # read by prepare (DeepSpeed too)
    checkpoint, resumed = resume_state(args, derived.world_size, RESUMABLE_CHANGES, accelerator.print)
    run_name = resumed["run_name"] if resumed else f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = broadcast_object_list([run_name])[0]  # one name for all ranks
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    # [N+ 1.B.9] each process gets its own seed for sampling; data order comes from the global seed below
    local_seed = args.seed + accelerator.process_index * 100003
    seed_everything(local_seed)
    if not args.preprocess_only:  # loaded before any output: a missing weight is refused first
        model, _ = load_checked(AutoModelForCausalLM, args.base_model, "--base_model", dtype=torch.float32)
    check_output_dir(args.output_dir)
    if accelerator.is_main_process:
        if resumed is None:  # a fresh run never appends to an older run's records
            set_aside_previous_run(args.output_dir, accelerator.print)
        write_run_info(args.output_dir, args, derived, accelerator.mixed_precision)

    if args.preprocess_only:
        if accelerator.is_main_process:
            dataset.save_to_disk(os.path.join(args.output_dir, "dataset"))
            tokenizer.save_pretrained(args.output_dir)
        accelerator.print(f"saved the tokenized dataset and tokenizer to {args.output_dir}")
        return

    fit_embeddings(model, tokenizer)  # [N+ 1.A.1] resize only when the pad id has no row
    disable_dropout(model)  # [N+ 1.B.2]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, eps=args.adam_eps, weight_decay=args.weight_decay
    )  # [N+ 1.B.6]
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=max(derived.num_updates, 1))
    # [N+ 1.B.9] one shuffled order for all processes, drawn from the global seed (no rows: evaluation only)
    train = dataset["train"].with_format("torch", columns=["query_reference_response_token"]) if derived.num_updates else []
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.local_micro_batch_size, shuffle=bool(derived.num_updates), drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    # the scheduler is not prepared: accelerate would step it once per process, and num_updates already
    # counts global batches; it is stepped once per optimizer step below [N+ 1.B.7]
    configure_deepspeed(accelerator, args.local_micro_batch_size, args.max_grad_norm)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    write_deepspeed_config(accelerator, args.output_dir)
    accelerator.register_for_checkpointing(scheduler)  # saved and restored with the model and optimizer
    update = 0  # optimizer steps done
    if resumed is not None:
        accelerator.load_state(checkpoint)  # weights, optimizer, scheduler and this rank's RNG states
        update = resumed["update"]
        if accelerator.is_main_process:  # drop what the interrupted run logged after its last state
            cut_metrics(args.output_dir, resumed["metrics_lines"])
        accelerator.print(f"resumed from {checkpoint} at optimizer step {update + 1}")
    logger = Logger(args.output_dir, accelerator.is_main_process, args, run_name)
    if resumed is None:  # a resumed run kept this record in metrics.jsonl
        logger.log(data_metrics, 0)
    accelerator.print(
        f"{derived.total_episodes} sequences, batch {args.batch_size} = {args.local_micro_batch_size} micro x "
        f"{derived.gradient_accumulation_steps} accumulation x {derived.world_size} processes -> {derived.num_updates} updates"
    )

    # ---- training [N+ 1.B.3-8]
    pad = tokenizer.pad_token_id
    model.train()
    start, samples, window = time.time(), update * args.batch_size, []
    micro_steps = derived.num_updates * derived.gradient_accumulation_steps
    progress = tqdm(total=derived.num_updates, initial=update, disable=not accelerator.is_local_main_process,
                    desc="sft")

    def micro_batches():  # endless: a new shuffled epoch when one is used up (total_episodes above one pass)
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    # resumable states, divergence and safe points (part 2)
    states = RunStates(accelerator, args, run_name, derived.world_size, stop, progress, checkpoint, update,
                       samples=samples)

    batches = micro_batches()
    for _ in range(update * derived.gradient_accumulation_steps):  # resume: replay the data order to its position
        next(batches)
    for micro_step in range(update * derived.gradient_accumulation_steps, micro_steps):
        batch = next(batches)
        ids = trim_padding_columns(batch["query_reference_response_token"], pad, "right")
        with accelerator.accumulate(model):
            loss = sft_loss(forward(model, ids, pad).logits, ids, pad)
            states.stop_if_diverged({"train/sft/loss": loss}, f"optimizer step {update + 1} (micro-batch {micro_step})")
            accelerator.backward(loss)
            if args.max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        window.append(loss.detach())
        if accelerator.sync_gradients:
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            update += 1
            samples += args.batch_size
            loss_mean = accelerator.gather(torch.stack(window).mean().reshape(1)).mean().item()
            window = []
            logger.log({"train/sft/loss": loss_mean, "train/sft/lr": lr}, samples)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_mean:.3f}")
            # safe point: a resumable state every --save_every steps, and on SIGTERM/SIGINT before exiting
            states.finished(update, samples=samples)
            states.safe_point(derived.num_updates, f"optimizer step {update}")
    progress.close()
    stop.restore()  # evaluation and the final save are not resumable: from here a signal acts as usual
    train_time = time.time() - start

    # ---- evaluation [N+ 1.B.13]
    unwrapped = accelerator.unwrap_model(model)
    model.eval()
    prepare_for_sampling(unwrapped)
    gen_config = sampling_config(args.response_length, args.eval_temperature)
    if args.stop_generation_at_eos:  # finished rows are filled with the pad id, truncate_response keeps the EOS
        gen_config.eos_token_id, gen_config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if args.run_eval:
        for split in args.eval_splits:
            loss, rouge, table = evaluate(model, tokenizer, dataset[eval_keys[split]], args, accelerator, gen_config)
            metrics = {f"{split}/sft/loss": loss, **{f"{split}/sft/rouge/{k}": v for k, v in rouge.items()}}
            logger.log(metrics, samples)
            accelerator.print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if accelerator.is_main_process:
                df = pd.DataFrame(table)
                df.to_csv(os.path.join(args.output_dir, f"{split}_table.csv"), index=False)
                logger.table(f"eval/{split}_query_responses", df)
    logger.log({"time/train_seconds": train_time, "time/peak_memory_gib": peak_memory_gib()}, samples)

    # ---- save a standard Hugging Face folder [N+ 1.B.14]
    accelerator.wait_for_everyone()
    # the saved generation config stops at EOS (what users of the checkpoint expect) with our eval sampling
    unwrapped.generation_config = sampling_config(args.response_length, args.eval_temperature)
    unwrapped.generation_config.eos_token_id = tokenizer.eos_token_id
    unwrapped.generation_config.pad_token_id = tokenizer.pad_token_id
    save_model_atomic(unwrapped, tokenizer, args.output_dir, accelerator, state_dict=accelerator.get_state_dict(model))
    accelerator.print(f"saved {args.output_dir} ({train_time:.0f}s training, peak memory {peak_memory_gib():.2f} GiB)")
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


# Flags that may change between an interrupted run and its resumption; any other change would alter the run.
RESUMABLE_CHANGES = {"resume", "track", "wandb_project_name", "wandb_entity", "output_dir", "save_every",
                     "keep_states", "run_eval", "eval_splits", "local_eval_batch_size", "max_eval_samples"}


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def main(args: Args):
    """Run the stage with SIGTERM/SIGINT turned into "save a state and exit"; returns the trained model (None with
    --preprocess_only)."""
    with StopOnSignal() as stop:
        return train_sft(args, stop)


if __name__ == "__main__":
    main(tyro.cli(Args))
