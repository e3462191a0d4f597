"""benchmark/offline/gold_reward_ppo.py: PPO whose every score is the offline task's gold judge."""

import os

import pandas as pd
import pytest

import gold_reward_ppo as G
import ppo_tldr as P
import tldr_synth as synth
from test_ppo_tldr import make_chain, reset_accelerate


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("gold") / "corpus")
    synth.generate_corpus(d, seed=5, n_sft_train=24, n_sft_validation=8, n_sft_test=4, n_cmp_train=4,
                          n_cmp_validation=4)
    return d


def test_the_index_finds_the_post_of_a_truncated_query(small_corpus):
    index = G.CorpusIndex(small_corpus)
    row = synth.read_jsonl(os.path.join(small_corpus, "sft", "validation.jsonl"))[3]
    query = P.format_query(row["subreddit"], row["title"], row["post"])
    assert index.find(query)["id"] == row["id"]
    cut = row["post"][: row["post"].rfind("\n")] if "\n" in row["post"] else row["post"][:-5]
    assert index.find(P.format_query(row["subreddit"], row["title"], cut))["id"] == row["id"]
    with pytest.raises(KeyError, match="0 posts"):
        index.find(P.format_query(row["subreddit"], "A title no post has", row["post"]))
    with pytest.raises(ValueError, match="not a TL;DR query"):
        index.find("just some text")


def test_every_score_of_the_run_is_the_gold_score(tiny_model, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "get_score", P.get_score)  # restored after the test: main() replaces it
    sft, rm = make_chain(tiny_model, str(tmp_path / "chain"))
    out = str(tmp_path / "run")
    reset_accelerate()
    try:
        G.main(["--data_dir", small_corpus, "--sft_model_path", sft, "--reward_model_path", rm, "--dataset",
                os.path.join(small_corpus, "sft"), "--output_dir", out, "--query_length", "1000",
                "--response_length", "8", "--batch_size", "4", "--local_micro_batch_size", "2",
                "--local_rollout_forward_batch_size", "4", "--total_episodes", "4", "--validation_probe_size", "4",
                "--sample_every", "1", "--max_eval_samples", "4", "--local_eval_batch_size", "2",
                "--eval_splits", "validation"])
    finally:
        reset_accelerate()
    validation = {r["id"]: r for r in synth.read_jsonl(os.path.join(small_corpus, "sft", "validation.jsonl"))}
    probe = pd.read_csv(os.path.join(out, "samples", "update_000001.csv"), keep_default_na=False)
    table = pd.read_csv(os.path.join(out, "validation_table.csv"), keep_default_na=False)
    for df in (probe, table):
        assert len(df) == 4
        for _, r in df.iterrows():
            assert r["score"] == pytest.approx(synth.gold_score(validation[r["id"]], r["response"]), abs=1e-5)
            assert r["reference_score"] == pytest.approx(synth.gold_score(validation[r["id"]], r["reference"]),
                                                         abs=1e-5)
    # a random tiny policy writes nonsense: gold scores far below the references', as the judge must say
    assert table["score"].mean() < table["reference_score"].mean()
