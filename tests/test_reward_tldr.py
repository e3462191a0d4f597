"""Tests for reward_tldr.py: the reward at EOS, head initialisation, normalisation, the checkpoint contract, data
checks, multi-process evaluation, and an end-to-end run. Tiny models only; about a minute on two CPU cores."""

import ast
import inspect
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT, build_model, build_tokenizer, comparison_rows, write_jsonl

import reward_tldr as rm
import sft_tldr

COPIED = ("QUERY_FORMAT", "load_tokenizer", "fit_embeddings", "format_query", "truncated_query_tokens", "left_pad",
          "right_pad", "response_tokens", "load_splits", "first_true_indices", "position_ids_from_mask",
          "trim_padding_columns", "disable_dropout", "Logger", "write_run_info", "seed_everything", "peak_memory_gib")


def sft_checkpoint(base: str, out: str) -> str:
    """What sft_tldr.py saves: the model with config.pad_token_id, the tokenizer with its [PAD]."""
    from transformers import AutoModelForCausalLM

    tokenizer = rm.load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rm.fit_embeddings(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sft_llama(tiny_model, tmp_path_factory):
    return sft_checkpoint(tiny_model, str(tmp_path_factory.mktemp("sft_llama")))


@pytest.fixture(scope="module")
def sft_gpt2(tiny_gpt2, tmp_path_factory):
    return sft_checkpoint(tiny_gpt2, str(tmp_path_factory.mktemp("sft_gpt2")))


def cnndm_row(i: int) -> dict:
    row = comparison_rows(1, 100 + i, "validation")[0]
    row["batch"] = "cnndm0"
    row["info"].update(post=None, title=None, subreddit=None,
                       article=f"Officials said on day {i}.\nThe storm moved north.\nMy friend told me to help.")
    return row


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory):
    """Comparisons with CNN/DM rows in validation (and a null article in every train row) and one validation row
    with an empty summary, which is skipped."""
    d = str(tmp_path_factory.mktemp("rm_data"))
    validation = comparison_rows(16, 20, "validation") + [cnndm_row(i) for i in range(3)]
    validation[5]["summaries"][1]["text"] = "  "
    write_jsonl(os.path.join(d, "train.jsonl"), comparison_rows(48, 10))
    write_jsonl(os.path.join(d, "validation.jsonl"), validation)
    return d


def small_args(**kw) -> rm.Args:
    defaults = dict(total_episodes=32, batch_size=8, local_micro_batch_size=2, local_eval_batch_size=4)
    return rm.Args(**{**defaults, **kw})


@pytest.fixture(scope="module")
def trained(sft_llama, rm_data, sft_data, tmp_path_factory):
    """One end-to-end main() run; several tests read its outputs."""
    out = str(tmp_path_factory.mktemp("rm_run"))
    args = small_args(sft_model_path=sft_llama, dataset=rm_data, sft_dataset=sft_data, output_dir=out)
    rm.main(args)
    return args


def read_metrics(path: str) -> dict:
    metrics = {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            metrics.update(json.loads(line))
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Code conventions
# ---------------------------------------------------------------------------------------------------------


def test_copied_helpers_are_verbatim():
    for name in COPIED:
        a, b = getattr(sft_tldr, name), getattr(rm, name)
        if isinstance(a, str):
            assert a == b, name
        else:
            assert inspect.getsource(a) == inspect.getsource(b), f"{name} differs from sft_tldr.py"


def test_every_arg_is_read_and_help_renders():
    source = open(os.path.join(ROOT, "reward_tldr.py")).read()
    tree = ast.parse(source)
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}
    fields = [f for f in rm.Args.__dataclass_fields__]
    assert [f for f in fields if f not in read] == []
    out = subprocess.run([sys.executable, "reward_tldr.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--sft-model-path" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# Reward at EOS, head, batching, padding
# ---------------------------------------------------------------------------------------------------------


def test_reward_index_left_right_padding_and_pad_equal_eos():
    T = 6
    scores = torch.arange(3 * T, dtype=torch.float).view(3, T)  # score = row * T + position
    lengths = torch.tensor([3, 6, 1])
    right = torch.arange(T)[None] < lengths[:, None]
    assert rm.reward_at_eos(scores, right).tolist() == [2.0, T + 5.0, 2 * T + 0.0]
    left = torch.arange(T)[None] >= (T - lengths)[:, None]
    assert rm.reward_at_eos(scores, left).tolist() == [5.0, T + 5.0, 2 * T + 5.0]
    # PPO's layout: left-padded query (2 columns) then right-padded response (4 columns)
    mixed = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]]).bool()
    assert rm.reward_at_eos(scores, mixed).tolist() == [3.0, T + 5.0, 2 * T + 2.0]
    # pad id == EOS id == 0: `ids == pad` finds the EOS itself; the mask from the lengths does not
    eos = pad = 0
    ids = torch.tensor([[7, 8, eos, pad, pad, pad], [7, 8, 9, 10, 11, eos]])
    mask = torch.arange(T)[None] < torch.tensor([3, 6])[:, None]
    assert rm.reward_at_eos(scores[:2], mask).tolist() == [2.0, T + 5.0]
    naive = rm.first_true_indices(ids == pad) - 1
    assert naive.tolist() != [2, 5]


def test_collate_pairs_puts_chosen_first_and_masks_by_length():
    rows = [{"query_token": [5, 6], "chosen_token": [7, 0], "rejected_token": [8, 9, 0], "index": 3},
            {"query_token": [5], "chosen_token": [0], "rejected_token": [9, 9, 9, 0], "index": 4}]
    batch = rm.collate_pairs(rows, pad_token_id=0)  # pad == EOS == 0 on purpose
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 0, 0, 0, 0], [5, 6, 8, 9, 0], [5, 9, 9, 9, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 2, 5, 5]
    assert batch["index"].tolist() == [3, 4]


def test_head_initialisation_statistics(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer(str(tmp_path))
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, eos_token_id=0, bos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    tokenizer = rm.load_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    model = rm.load_reward_model(str(tmp_path), tokenizer)
    w = model.score.weight.detach().flatten()
    assert w.numel() == 256 and model.score.bias is None
    expected = 1 / math.sqrt(256 + 1)  # 0.062; HF's own init would give initializer_range = 0.02
    assert abs(w.std().item() - expected) < 0.15 * expected
    assert abs(w.mean().item()) < 4 * expected / math.sqrt(256)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # a reward checkpoint keeps its trained head
    model.save_pretrained(str(tmp_path / "rm"))
    tokenizer.save_pretrained(str(tmp_path / "rm"))
    torch.manual_seed(1)
    assert torch.equal(rm.load_reward_model(str(tmp_path / "rm"), tokenizer).score.weight, model.score.weight)


def test_vocabulary_that_does_not_fit_is_refused(tmp_path):
    rows = len(build_tokenizer(str(tmp_path)))
    build_model(str(tmp_path), "llama", vocab_rows=rows)  # the BPE tokens fill it: no row for [PAD]
    with pytest.raises(ValueError, match=f"embedding has {rows} rows"):
        rm.load_reward_model(str(tmp_path), rm.load_tokenizer(str(tmp_path)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_pairs_and_padded_layout_equal_separate_forwards(arch, sft_llama, sft_gpt2):
    """Chosen and rejected in one padded forward equal each sequence alone; so does PPO's left-padded layout
    (GPT-2 has absolute positions: a position mistake under left padding would show) [N+ 1.C.4, 1.C.11]."""
    path = sft_llama if arch == "llama" else sft_gpt2
    tokenizer = rm.load_tokenizer(path)
    model = rm.ScalarModel(rm.load_reward_model(path, tokenizer)).eval()
    pad = tokenizer.pad_token_id
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, 300, (n,), generator=g).tolist()  # noqa: E731
    rows = [{"query_token": ids(q), "chosen_token": ids(c) + [0], "rejected_token": ids(r) + [0], "index": i}
            for i, (q, c, r) in enumerate([(7, 3, 9), (12, 5, 2), (4, 11, 6)])]

    def alone(seq):
        t = torch.tensor([seq])
        return model(t, torch.ones_like(t, dtype=torch.bool))[0, -1].item()

    with torch.no_grad():
        batch = rm.collate_pairs(rows, pad)
        rewards = rm.reward_at_eos(model(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        expected = [alone(r["query_token"] + r["chosen_token"]) for r in rows] + \
                   [alone(r["query_token"] + r["rejected_token"]) for r in rows]
        torch.testing.assert_close(rewards, torch.tensor(expected), atol=1e-5, rtol=1e-5)

        refs = [{"query_token": r["query_token"], "reference_token": r["chosen_token"], "index": r["index"]} for r in rows]
        batch = rm.collate_references(refs, pad, query_length=16)
        assert batch["padded_input_ids"][0, 0].item() == pad  # the shorter queries are left-padded
        padded = rm.reward_at_eos(model(batch["padded_input_ids"], batch["padded_attention_mask"]),
                                  batch["padded_attention_mask"])
        torch.testing.assert_close(padded, torch.tensor(expected[:3]), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def tokenize(rows: list[dict], tiny_model):
    import datasets

    tokenizer = rm.load_tokenizer(tiny_model)
    ds = datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
    return rm.tokenize_comparisons(ds, tokenizer, rm.Args(sft_model_path=tiny_model))


@pytest.mark.parametrize("case, message", [
    ("no_summaries", "`summaries` must be two entries"),
    ("one_summary", "`summaries` must be two entries"),
    ("choice_2", "`choice` must be 0 or 1, got 2"),
    ("choice_none", "`choice` must be 0 or 1, got None"),
    ("post_none", "must be strings"),
    ("cnndm_no_article", "needs a string info.article"),
])
def test_malformed_rows_are_errors_naming_the_row(case, message, tiny_model):
    rows = comparison_rows(3, 7, "validation")
    bad = rows[1]
    if case == "no_summaries":
        bad["summaries"] = None
    elif case == "one_summary":
        bad["summaries"] = bad["summaries"][:1]
    elif case == "choice_2":
        bad["choice"] = 2
    elif case == "choice_none":
        bad["choice"] = None
    elif case == "post_none":
        bad["info"]["post"] = None
    elif case == "cnndm_no_article":
        bad["batch"] = "cnndm2"
    with pytest.raises(ValueError, match=message) as e:
        tokenize(rows, tiny_model)
    assert "row 1" in str(e.value) and bad["info"]["id"] in str(e.value)


def test_empty_posts_and_summaries_are_counted_skips(tiny_model):
    rows = comparison_rows(5, 8, "validation")
    rows[1]["info"]["post"] = "   "
    rows[3]["summaries"][0]["text"] = ""
    ds, skipped = tokenize(rows, tiny_model)
    assert len(ds["validation"]) == 3
    assert skipped["validation"] == {"empty_post": 1, "empty_summary": 1}
    assert ds["validation"]["index"] == [0, 1, 2]


def test_missing_columns_are_named(tiny_model):
    rows = [{k: v for k, v in r.items() if k != "choice"} for r in comparison_rows(2, 9)]
    with pytest.raises(ValueError, match=r"lacks columns \['choice'\]"):
        tokenize(rows, tiny_model)


def test_pairs_are_built_like_the_sft_queries_and_cnndm_rows_get_their_format(tiny_model):
    import datasets

    rows = comparison_rows(2, 11, "validation") + [cnndm_row(0)]
    dataset = rm.split_cnndm(datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}))
    assert len(dataset["validation"]) == 2 and len(dataset["validation_cnndm"]) == 1
    ds, _ = rm.tokenize_comparisons(dataset, rm.load_tokenizer(tiny_model), rm.Args(sft_model_path=tiny_model))
    tokenizer = rm.load_tokenizer(tiny_model)
    row, pair = rows[0], ds["validation"][0]
    assert pair["query_token"] == rm.truncated_query_tokens(tokenizer, row["info"], 512)
    chosen = row["summaries"][row["choice"]]
    assert pair["chosen_token"] == tokenizer.encode(chosen["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
    assert pair["chosen"] == chosen["text"] and pair["chosen_policy"] == chosen["policy"]
    assert pair["policies"] == "ref--sup2"
    assert ds["validation_cnndm"][0]["query"].startswith("Article:\nOfficials said")


def test_cnndm_inputs_drop_the_newline_after_tldr_as_the_reference(tiny_model):
    """The reference's CNN/DM RM inputs re-encoded `query.strip() + summary`: "...TL;DR:" then " summary", with no
    newline between them; the query length is still checked with the newline, as the reference's query tokens."""
    import datasets

    tokenizer = rm.load_tokenizer(tiny_model)
    row = cnndm_row(0)
    dataset = rm.split_cnndm(datasets.DatasetDict({"validation": datasets.Dataset.from_list([row])}))
    pair = rm.tokenize_comparisons(dataset, tokenizer, rm.Args(sft_model_path=tiny_model))[0]["validation_cnndm"][0]
    query, chosen = rm.CNNDM_FORMAT.format(article=row["info"]["article"]), row["summaries"][row["choice"]]["text"]
    assert query.endswith("TL;DR:\n") and pair["query"].endswith("TL;DR:")
    reference = tokenizer.encode(query.strip() + chosen, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert pair["query_token"] + pair["chosen_token"] == reference
    with_newline = len(tokenizer.encode(query, add_special_tokens=False))
    assert rm.truncated_article_tokens(tokenizer, row["info"]["article"], with_newline, "r") == pair["query_token"]
    cut = rm.truncated_article_tokens(tokenizer, row["info"]["article"], with_newline - 1, "r")  # the article is cut
    assert len(cut) < len(pair["query_token"]) and tokenizer.decode(cut).endswith("\n\nTL;DR:")


def test_data_order_global_by_default_per_rank_with_the_flag():
    import datasets

    train = datasets.Dataset.from_dict({"x": list(range(100))})
    args = rm.Args(sft_model_path="unused", seed=3)
    (a, shuffle_a), (b, _) = (rm.training_rows(train, args, r, 40) for r in (0, 1))
    assert a["x"] == b["x"] and shuffle_a and len(a) == 40  # one subset; the DataLoader partitions it
    args.per_rank_shuffle = True
    (a, shuffle_a), (b, _) = (rm.training_rows(train, args, r, 40) for r in (0, 1))
    assert a["x"] != b["x"] and not shuffle_a  # [N+ 1.C.9] overlapping per-rank subsets


def test_wilson_interval_and_calibration_table():
    import numpy as np

    low, high = rm.wilson_interval(60, 100)
    assert 0.50 < low < 0.51 and 0.69 < high < 0.70
    margins = np.array([0.1, -0.2, 0.7, 0.9, -1.2, 3.0])
    table = rm.calibration_table(margins, margins > 0)
    assert table["margin_mid"].tolist() == [0.25, 0.75, 1.25, 3.25]
    assert table["pairs"].tolist() == [2, 2, 1, 1] and table["accuracy"].tolist() == [0.5, 1.0, 0.0, 1.0]
    assert table["predicted"].iloc[0] == pytest.approx(1 / (1 + math.exp(-0.25)))


# ---------------------------------------------------------------------------------------------------------
# End to end, the checkpoint contract, multi-process
# ---------------------------------------------------------------------------------------------------------


def test_end_to_end_outputs(trained):
    out = trained.output_dir
    m = read_metrics(out)
    for name in ("loss", "accuracy", "chosen_rewards", "rejected_rewards", "lr"):
        assert f"train/rm/{name}" in m
    for split in ("validation", "validation_cnndm"):
        for suffix in ("", "_ci95_low", "_ci95_high", "/split/valid1", "/batch/cnndm0" if "cnndm" in split else "/batch/batch3",
                       "/confidence/5" if split == "validation" else "", "/policies/ref--sup2"):
            assert f"eval/rm/{split}/accuracy{suffix}" in m, suffix
        assert os.path.getsize(os.path.join(out, f"{split}_calibration.png")) > 1000
    for stat in ("mean", "std", "max", "min", "unexpected_reward_diff_mean", "unexpected_reward_diff_gt_rtol_mean"):
        assert f"eval/rm/normalized_{stat}" in m
    assert m["eval/rm/normalized_unexpected_reward_diff_abs_max"] < 1e-4  # padding changes no reward
    assert m["data/validation/skipped/empty_summary"] == 1 and m["data/validation/pairs"] == 15
    assert m["data/validation_cnndm/pairs"] == 3 and m["data/train/pairs"] == 32
    assert m["samples"] == 32
    df = pd.read_csv(os.path.join(out, "validation_rewards.csv"))
    assert list(df.columns) == rm.CSV_COLUMNS and len(df) == 15
    assert rm.CSV_COLUMNS[1:] == ["query", "chosen", "rejected", "batch", "split", "confidence", "choice", "policies",
                                  "chosen_policy", "rejected_policy", "accuracy", "chosen_rewards", "rejected_rewards"]
    assert df["id"].tolist()[:5] == ["t21_0", "t21_1", "t21_2", "t21_3", "t21_4"]  # info.id, row order kept
    assert m["eval/rm/validation/accuracy"] == pytest.approx(df["accuracy"].mean())
    assert ((df["chosen_rewards"] > df["rejected_rewards"]) == (df["accuracy"] == 1)).all()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "run_info.json", "validation_calibration.csv"):
        assert os.path.exists(os.path.join(out, f)), f
    assert json.load(open(os.path.join(out, "run_info.json")))["mixed_precision"] == "no"


def test_normalisation_makes_reference_mean_zero_after_reload(trained):
    import datasets
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(trained.output_dir)
    bias = model.config.reward_bias
    assert bias == pytest.approx(read_metrics(trained.output_dir)["eval/rm/reward_bias"])
    tokenizer = rm.load_tokenizer(trained.output_dir)
    refs = rm.tokenize_references(rm.load_splits(trained.sft_dataset)["train"], tokenizer, trained)
    loader = torch.utils.data.DataLoader(refs.select_columns(["query_token", "reference_token", "index"]), batch_size=16,
                                         collate_fn=lambda rows: rm.collate_references(rows, tokenizer.pad_token_id, 512))
    scalar, rewards = rm.ScalarModel(model).eval(), []
    with torch.no_grad():
        for batch in loader:
            rewards.append(rm.reward_at_eos(scalar(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]))
    rewards = torch.cat(rewards) - bias
    assert isinstance(refs, datasets.Dataset) and len(rewards) == 64
    assert abs(rewards.mean().item()) < 1e-5 and rewards.std().item() > 1e-4


def test_checkpoint_loads_as_hf_sequence_classification_with_the_scripts_raw_score(trained):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(trained.output_dir).eval()  # no num_labels given
    tokenizer = rm.load_tokenizer(trained.output_dir)
    assert model.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    ds, _ = rm.tokenize_comparisons(rm.load_splits(trained.dataset, "comparisons"), tokenizer, trained)
    rows = [ds["validation"][i] for i in range(6)]
    batch = rm.collate_pairs(rows, tokenizer.pad_token_id)  # right-padded, lengths differ
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        ours = rm.reward_at_eos(rm.ScalarModel(model)(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    torch.testing.assert_close(hf, ours, atol=1e-5, rtol=1e-5)
    csv = pd.read_csv(os.path.join(trained.output_dir, "validation_rewards.csv"))
    written = torch.tensor(list(csv["chosen_rewards"][:6]) + list(csv["rejected_rewards"][:6]), dtype=torch.float)
    torch.testing.assert_close(hf - model.config.reward_bias, written, atol=1e-4, rtol=1e-4)


def test_evaluation_only_keeps_the_checkpoint_head(trained, tmp_path):
    out = str(tmp_path / "eval")
    rm.main(small_args(sft_model_path=trained.output_dir, dataset=trained.dataset, sft_dataset=trained.sft_dataset,
                       total_episodes=0, normalization_samples=0, output_dir=out))
    m = read_metrics(out)
    assert not any(k.startswith("train/") for k in m) and not os.path.exists(os.path.join(out, "model.safetensors"))
    assert m["eval/rm/validation/accuracy"] == read_metrics(trained.output_dir)["eval/rm/validation/accuracy"]
    a, b = (pd.read_csv(os.path.join(d, "validation_rewards.csv")) for d in (out, trained.output_dir))
    pd.testing.assert_series_equal(a["chosen_rewards"], b["chosen_rewards"], atol=1e-5)  # same bias, same head


@pytest.mark.slow
def test_two_processes_gather_every_pair_and_match_one_process(sft_llama, comparison_data, sft_data, tmp_path):
    """torchrun with 2 CPU processes (ACCELERATE_USE_CPU: gloo even where a GPU exists) against one process: the same
    global batches, so the same training, and evaluation gathered over both ranks. 13 validation rows do not
    split evenly over 2 ranks x 4 pairs: gather_for_metrics must drop the padding duplicates."""
    flags = dict(total_episodes=16, batch_size=8, local_micro_batch_size=2, local_eval_batch_size=4,
                 max_eval_samples=13, normalization_samples=10)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rm.main(rm.Args(sft_model_path=sft_llama, dataset=comparison_data, sft_dataset=sft_data, output_dir=one, **flags))
    cli = [f"--{k}={v}" for k, v in flags.items()]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "reward_tldr.py",
         "--sft_model_path", sft_llama, "--dataset", comparison_data, "--sft_dataset", sft_data, "--output_dir", two, *cli],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 accumulation x 2 processes" in proc.stdout
    m1, m2 = read_metrics(one), read_metrics(two)
    assert m2["eval/rm/validation/num_pairs"] == 13
    assert m1["eval/rm/validation/accuracy"] == m2["eval/rm/validation/accuracy"]
    assert m1["train/rm/loss"] == pytest.approx(m2["train/rm/loss"], abs=1e-5)
    assert m1["eval/rm/reward_bias"] == pytest.approx(m2["eval/rm/reward_bias"], abs=1e-5)
    a, b = (pd.read_csv(os.path.join(d, "validation_rewards.csv")) for d in (one, two))
    assert len(b) == 13 and (a["query"] == b["query"]).all() and (a["accuracy"] == b["accuracy"]).all()
    assert (a["chosen_rewards"] - b["chosen_rewards"]).abs().max() < 1e-4
    assert len(pd.read_csv(os.path.join(two, "normalization_rewards.csv"))) == 10
    lines = open(os.path.join(two, "metrics.jsonl")).read().splitlines()
    assert sum('"train/rm/loss"' in line for line in lines) == 2  # rank 0 writes, once per update


# ---------------------------------------------------------------------------------------------------------
# Faults: preemption signals and divergence
# ---------------------------------------------------------------------------------------------------------


def test_sigterm_saves_a_state_and_the_resumed_run_equals_an_uninterrupted_one(sft_llama, rm_data, sft_data,
                                                                               tmp_path):
    """The script as a subprocess gets SIGTERM once its first optimizer step is logged: it saves a state and exits
    with 143; --resume then ends bit-identical (metrics, weights, reward bias) to a run never interrupted."""
    import signal
    import time

    from safetensors.torch import load_file

    flags = dict(total_episodes=48, batch_size=4, local_micro_batch_size=2, local_eval_batch_size=4,
                 sft_model_path=sft_llama, dataset=rm_data, sft_dataset=sft_data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: bit-identical results need the same intra-op threads
    try:
        rm.main(rm.Args(**flags, output_dir=str(tmp_path / "full")))
        out = str(tmp_path / "stopped")
        argv = [os.path.join(ROOT, "reward_tldr.py"), "--output_dir", out]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
        while not (os.path.exists(metrics) and "train/rm/loss" in open(metrics).read()) and proc.poll() is None:
            assert time.time() < deadline, "the run logged no step"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 143, output[-3000:]
        states = os.listdir(os.path.join(out, "checkpoints"))
        assert len(states) == 1 and states[0] < "update_000012", states  # 48 pairs / batch 4: before the end
        assert f"received SIGTERM: saved the state of optimizer step {int(states[0][-6:])}" in output
        rm.main(rm.Args(**flags, output_dir=out, resume=True))
    finally:
        torch.set_num_threads(threads)

    def records(path):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                for line in open(os.path.join(path, "metrics.jsonl"))]

    full, resumed = records(str(tmp_path / "full")), records(out)
    assert len([r for r in full if "train/rm/loss" in r]) == 12 and full == resumed
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_reward_stops_the_run_and_keeps_the_last_good_state(sft_llama, rm_data, sft_data, tmp_path,
                                                                  monkeypatch):
    original, calls = rm.reward_at_eos, []

    def poisoned(rewards, mask):
        calls.append(1)
        out = original(rewards, mask)
        return out * float("nan") if len(calls) > 8 else out  # from the 1st micro-batch of step 3 (4 per step)

    monkeypatch.setattr(rm, "reward_at_eos", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"train/rm/chosen_rewards diverged at optimizer step 3 "
                                                 r"\(micro-batch 8\): 2 NaN and 0 infinite values") as info:
        rm.main(small_args(sft_model_path=sft_llama, dataset=rm_data, sft_dataset=sft_data, output_dir=out,
                           total_episodes=48, save_every=0))
    # no periodic states: the weights after step 2 (untouched by the NaN step) are saved when it diverges
    root = os.path.join(out, "checkpoints")
    assert info.value.args[0].endswith(f"Last good state: {os.path.join(root, 'update_000002')}")
    assert os.listdir(root) == ["update_000002"] and rm.state_problem(os.path.join(root, "update_000002")) is None
    assert json.load(open(os.path.join(root, "update_000002", "trainer_state.json")))["update"] == 2


def test_resume_skips_a_corrupt_state_after_a_crash(sft_llama, rm_data, sft_data, tmp_path, monkeypatch, capsys):
    """A crash in step 5 leaves states 2 and 4 (--keep_states 2); state 4 is then truncated on disk. Resume skips it
    with a message, continues from state 2 and ends bit-identical (metrics, weights) to an uninterrupted run."""
    from safetensors.torch import load_file

    flags = dict(sft_model_path=sft_llama, dataset=rm_data, sft_dataset=sft_data, total_episodes=48,
                 save_every=2, keep_states=2)
    rm.main(small_args(**flags, output_dir=str(tmp_path / "full")))
    original, calls = rm.reward_at_eos, []

    def crash(rewards, mask):
        calls.append(1)
        if len(calls) > 16:  # the 1st micro-batch of step 5 (4 per step)
            raise RuntimeError("simulated crash")
        return original(rewards, mask)

    out = str(tmp_path / "crashed")
    monkeypatch.setattr(rm, "reward_at_eos", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rm.main(small_args(**flags, output_dir=out))
    monkeypatch.setattr(rm, "reward_at_eos", original)
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["update_000002", "update_000004"]
    weights = os.path.join(root, "update_000004", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    capsys.readouterr()
    rm.main(small_args(**flags, output_dir=out, resume=True))
    printed = capsys.readouterr().out
    assert "skipping the state" in printed and "update_000004: model.safetensors has" in printed, printed

    def records(path):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in open(path)]

    assert records(tmp_path / "full" / "metrics.jsonl") == records(os.path.join(out, "metrics.jsonl"))
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------
# The default dataset: a script repository on its main branch, its parquet conversion on the hub
# ---------------------------------------------------------------------------------------------------------

# The column types of openai/summarize_from_feedback's "comparisons" configuration, as its loading script declares
# them and as the hub's parquet conversion stores them.
COMPARISON_FEATURES = {
    "info": {k: "string" for k in ("id", "post", "title", "subreddit", "site", "article")},
    "summaries": [{"text": "string", "policy": "string", "note": "string"}],
    "choice": "int32", "worker": "string", "batch": "string", "split": "string", "extra": {"confidence": "int32"},
}


def features(spec):
    import datasets

    if isinstance(spec, dict):
        return {k: features(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return datasets.List(features(spec[0]))
    return datasets.Value(spec)


def script_repository(root) -> str:
    """A local folder laid out as openai/summarize_from_feedback's main branch: a README and a loading script."""
    repo = os.path.join(root, "summarize_from_feedback")
    os.makedirs(repo)
    with open(os.path.join(repo, "README.md"), "w") as f:
        f.write("---\npretty_name: summarize_from_feedback\n---\n")
    with open(os.path.join(repo, "summarize_from_feedback.py"), "w") as f:
        f.write("import datasets\n\nclass SummarizeFromFeedback(datasets.GeneratorBasedBuilder):\n    pass\n")
    return repo


def parquet_conversion(root, train, validation) -> str:
    """A local folder laid out as the hub's parquet conversion of that repository (revision refs/convert/parquet):
    one folder per configuration, one per split, `NNNN.parquet` files, the script's nested column types."""
    import datasets

    repo = os.path.join(root, "summarize_from_feedback")
    comparisons = datasets.Features(features(COMPARISON_FEATURES))
    axis = datasets.Features(features({
        "info": COMPARISON_FEATURES["info"], "worker": "string", "batch": "string", "split": "string",
        "summary": {"text": "string", "policy": "string", "note": "string",
                    "axes": {k: "int64" for k in ("overall", "accuracy", "coverage", "coherence", "compatible")}}}))
    axis_row = {"info": comparison_rows(1, 7)[0]["info"], "worker": "w", "batch": "b", "split": "test",
                "summary": {"text": " x", "policy": "ref", "note": None,
                            "axes": {"overall": 7, "accuracy": 7, "coverage": 7, "coherence": 7, "compatible": None}}}
    for config, split, rows, feats in (("comparisons", "train", train, comparisons),
                                       ("comparisons", "validation", validation, comparisons),
                                       ("axis", "test", [axis_row], axis), ("axis", "validation", [axis_row], axis)):
        os.makedirs(os.path.join(repo, config, split))
        datasets.Dataset.from_list(rows, features=feats).to_parquet(os.path.join(repo, config, split, "0000.parquet"))
    return repo


def test_a_dataset_script_repository_is_refused_with_the_fix_named(tmp_path):
    """datasets >= 4 refuses loading scripts: openai/summarize_from_feedback's main branch cannot be loaded, whatever
    the code around it does; the stage names the revision that loads."""
    import datasets

    repo = script_repository(tmp_path)
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported"):
        datasets.load_dataset(repo, data_dir="comparisons")
    with pytest.raises(ValueError, match=f"{repo} at revision main is a dataset loading script.*"
                                         "--dataset_revision refs/convert/parquet"):
        rm.load_splits(repo, "comparisons")


def test_the_default_dataset_revision_loads_the_parquet_conversion(sft_llama, sft_data, tmp_path):
    """The defaults (--dataset_revision refs/convert/parquet --dataset_subset comparisons) read a repository laid out
    as the hub's parquet conversion through the call a hub name takes, with nested columns intact; a whole run on
    it finds the CNN/DM rows."""
    import datasets

    validation = comparison_rows(12, 20, "validation") + [cnndm_row(i) for i in range(3)]
    repo = parquet_conversion(tmp_path, comparison_rows(16, 10), validation)
    defaults = rm.Args(sft_model_path="")
    assert (defaults.dataset, defaults.dataset_revision, defaults.dataset_subset) == (
        "openai/summarize_from_feedback", "refs/convert/parquet", "comparisons")
    ds = rm.load_splits(repo, defaults.dataset_subset, defaults.dataset_revision)
    assert sorted(ds) == ["train", "validation"] and (len(ds["train"]), len(ds["validation"])) == (16, 15)
    assert ds["train"].features == datasets.Features(features(COMPARISON_FEATURES))
    assert ds["validation"][12]["info"]["post"] is None and ds["validation"][12]["batch"] == "cnndm0"
    assert ds["train"][3]["summaries"][1]["policy"] == "sup2" and ds["train"][3]["extra"]["confidence"] >= 1
    out = str(tmp_path / "run")
    rm.main(small_args(sft_model_path=sft_llama, dataset=repo, sft_dataset=sft_data, output_dir=out,
                       total_episodes=8, normalization_samples=8))
    m = read_metrics(out)
    assert m["data/validation/pairs"] == 12 and m["eval/rm/validation_cnndm/num_pairs"] == 3
