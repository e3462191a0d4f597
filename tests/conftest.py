"""Shared fixtures: a tiny tokenizer and tiny random models built offline, and small TL;DR-schema data.

Nothing here touches the network. The tokenizer is a small BPE trained on the fixture text; like Pythia's
and SmolLM2's it has an EOS token, and it has no pad token, so every stage must add `[PAD]`.
"""

import json
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for group in ("paper", "offline", "perf"):  # the benchmark scripts, imported by module name
    sys.path.insert(0, os.path.join(ROOT, "benchmark", group))

SUBREDDITS = ["relationships", "tifu", "personalfinance", "AskReddit"]
WORDS = ("my girlfriend boyfriend friend boss landlord roommate sister brother mom dad cat dog car rent money job "
         "work school party dinner phone message cheated lied forgot borrowed broke moved quit asked told help "
         "what should i do am i wrong the a and to of in for with on at it is was we they he she me you").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def sft_rows(n: int, seed: int, long_every: int = 0) -> list[dict]:
    """Rows in the schema of vwxyzjn/summarize_from_feedback_tldr_3_filtered."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        paragraphs = [sentence(rng, rng.randint(5, 15)) for _ in range(rng.randint(1, 4))]
        if long_every and i % long_every == 0:
            paragraphs += [sentence(rng, 30) for _ in range(12)]
        rows.append({
            "id": f"t{seed}_{i}",
            "subreddit": rng.choice(SUBREDDITS),
            "title": sentence(rng, rng.randint(3, 8)),
            "post": "\n".join(paragraphs),
            "summary": sentence(rng, rng.randint(3, 10)),
        })
    return rows


def comparison_rows(n: int, seed: int, split: str = "train") -> list[dict]:
    """Rows in the schema of openai/summarize_from_feedback (comparisons)."""
    rng = random.Random(seed)
    rows = []
    for i, r in enumerate(sft_rows(n, seed + 1)):
        rows.append({
            "info": {"id": r["id"], "post": r["post"], "title": r["title"], "subreddit": r["subreddit"],
                     "site": None, "article": None},
            "summaries": [{"text": " " + sentence(rng, rng.randint(3, 9)), "policy": p, "note": None}
                          for p in ("ref", "sup2")],
            "choice": rng.randint(0, 1),
            "worker": f"w{rng.randint(0, 3)}",
            "batch": f"batch{rng.randint(3, 5)}",
            "split": split if split == "train" else rng.choice(["valid1", "valid2"]),
            "extra": {"confidence": rng.randint(1, 9)},
        })
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tokenizer(out_dir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [sentence(random.Random(s), 40) for s in range(200)] + [
        "SUBREDDIT: r/relationships TITLE: POST: TL;DR: " + " ".join(SUBREDDITS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: str, arch: str = "llama", vocab_rows: int = 512, seed: int = 0):
    """A tiny random causal LM with spare embedding rows (so adding [PAD] needs no resize)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             tie_word_embeddings=True, eos_token_id=0, bos_token_id=0)
    else:  # absolute positions: exposes any position_ids mistake under left padding
        config = GPT2Config(vocab_size=vocab_rows, n_embd=32, n_layer=2, n_head=4, n_positions=1024,
                            eos_token_id=0, bos_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = 0
    model.save_pretrained(out_dir)
    return model


def tiny_folder(tmp_path_factory, arch: str) -> str:
    d = str(tmp_path_factory.mktemp(f"tiny_{arch}"))
    build_tokenizer(d)
    build_model(d, arch)
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder with a tiny Llama-shaped model and the tiny tokenizer."""
    return tiny_folder(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """Folder with a tiny GPT-2 (absolute position embeddings) and the tiny tokenizer."""
    return tiny_folder(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory):
    """Local SFT dataset folder: train/validation/test JSONL files in the hub schema."""
    d = str(tmp_path_factory.mktemp("sft_data"))
    for split, n, seed in (("train", 64, 1), ("validation", 8, 2), ("test", 8, 3)):
        write_jsonl(os.path.join(d, f"{split}.jsonl"), sft_rows(n, seed, long_every=16))
    return d


@pytest.fixture(scope="session")
def comparison_data(tmp_path_factory):
    """Local preference dataset folder: train/validation JSONL files in the hub schema."""
    d = str(tmp_path_factory.mktemp("cmp_data"))
    write_jsonl(os.path.join(d, "train.jsonl"), comparison_rows(64, 10))
    write_jsonl(os.path.join(d, "validation.jsonl"), comparison_rows(16, 20, "validation"))
    return d


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models on shared cores only spin with a second one (runs were 10x slower under load),
    and in-process and subprocess runs compared bit for bit must use the same number of threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
