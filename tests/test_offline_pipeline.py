"""Tests of the offline pipeline's driver (benchmark/offline/offline_pipeline.py): precision choice, the RM data mix and
the report, on a small synthetic corpus and hand-made sample tables (no model is trained here)."""

import json
import os
import sys

import pandas as pd
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark", "offline"))

import offline_pipeline as op  # noqa: E402
import tldr_synth as synth  # noqa: E402

SMALL = {"n_sft_train": 40, "n_sft_validation": 30, "n_sft_test": 10, "n_cmp_train": 60, "n_cmp_validation": 40}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out_dir = str(tmp_path_factory.mktemp("pipeline") / "data")
    synth.generate_corpus(out_dir, seed=0, **SMALL)
    return out_dir


def test_bf16_only_where_it_is_clearly_faster():
    assert op.choose_precision(fp32_gflops=215, bf16_gflops=850) == "bf16"  # avx512_bf16: 3.9x
    assert op.choose_precision(fp32_gflops=156, bf16_gflops=56) == "fp32"  # AVX-512 without bf16 instructions
    assert op.choose_precision(fp32_gflops=86, bf16_gflops=1.3) == "fp32"  # AVX2 only: 65x slower
    assert op.choose_precision(fp32_gflops=100, bf16_gflops=120) == "fp32"  # below the 1.3x margin
    assert op.pick_precision("fp32") == ("fp32", {"requested": "fp32"})  # an explicit choice is not measured


def test_profiles_fill_every_size_and_flags_override():
    args = op.parse_args(["--profile", "full", "--ppo_lr", "1e-6"])
    assert args.ppo_lr == 1e-6 and args.ppo_episodes == op.PROFILES["full"]["ppo_episodes"]
    default = op.parse_args([])
    assert all(getattr(default, key) == value for key, value in op.PROFILES["default"].items())
    for profile in op.PROFILES.values():
        assert profile["ppo_episodes"] % profile["ppo_batch"] == 0


def test_win_and_tie_rates():
    rate, half_width = op.win_rate([1.0, 0.5, 0.2, 0.3], [0.5, 0.5, 0.9, 0.1])
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4) and half_width > 0
    assert op.tie_rate([1.0, 0.5, 0.2], [1.0, 0.4, 0.2]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        op.win_rate([1.0], [])
    assert op.peak_update([0.1, 0.4, 0.3]) == 1


def sample_table(path: str, rows: list[dict], policy: str) -> str:
    """A stage's table (id, query, response, reference) whose responses are one candidate of each post."""
    records = []
    for row in rows:
        story, _ = synth._example_story(row)
        records.append({"id": row["id"], "query": "q", "response": synth.candidate_summaries(story)[policy][0],
                        "reference": row["summary"]})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def test_rm_data_mixes_synthetic_pairs_and_the_sft_policys_samples(corpus, tmp_path):
    args = op.parse_args(["--data_dir", corpus, "--rm_synthetic_pairs", "20", "--rm_eval_synthetic", "10",
                          "--rm_eval_model", "12"])
    train = synth.read_jsonl(os.path.join(corpus, "sft", "train.jsonl"))[:15]
    validation = synth.read_jsonl(os.path.join(corpus, "sft", "validation.jsonl"))
    tables = [sample_table(str(tmp_path / "s0.csv"), train, "drop_fact"),
              sample_table(str(tmp_path / "s1.csv"), train, "complete")]
    greedy = sample_table(str(tmp_path / "greedy.csv"), validation, "truncated")
    counts = op.build_rm_data(args, tables, greedy, str(tmp_path / "rm_data"))
    rows = {split: synth.read_jsonl(str(tmp_path / "rm_data" / f"{split}.jsonl")) for split in counts}
    sources = {split: [row["extra"]["source"] for row in split_rows] for split, split_rows in rows.items()}
    assert sources["train"].count("synthetic") == 20
    # per post: sample vs sample, and each sample vs the reference unless the texts are equal
    assert 15 < sources["train"].count("sft_samples") <= 45
    assert sources["validation"].count("synthetic") == 10 and sources["validation"].count("sft_vs_reference") == 12
    for row in rows["train"] + rows["validation"]:
        assert row["choice"] in (0, 1) and len(row["summaries"]) == 2
        assert row["summaries"][0]["text"] != row["summaries"][1]["text"]
    val_ids = {row["id"] for row in validation}
    assert all(row["info"]["id"] in val_ids for row in rows["validation"] if row["extra"]["source"] != "synthetic")
    # deterministic: the same call writes the same files
    op.build_rm_data(args, tables, greedy, str(tmp_path / "again"))
    for split in counts:
        assert (tmp_path / "rm_data" / f"{split}.jsonl").read_bytes() == (tmp_path / "again" / f"{split}.jsonl").read_bytes()


def test_length_balanced_synthetic_pairs_leave_length_no_clue_to_the_label(corpus):
    rows = synth.read_jsonl(os.path.join(corpus, "comparisons", "train.jsonl"))

    def sides(selected):
        words = [[len(s["text"].split()) for s in r["summaries"]] for r in selected]
        return [(w[r["choice"]] > w[1 - r["choice"]]) - (w[r["choice"]] < w[1 - r["choice"]])
                for r, w in zip(selected, words)]

    plain = sides(op.pair_rows(rows, 40, 0, "synthetic"))
    balanced_rows = op.pair_rows(rows, 40, 0, "synthetic", balance_length=True)
    balanced = sides(balanced_rows)
    assert plain.count(-1) > plain.count(1)  # the corpus' rejected summaries run long (filler, repetition)
    assert len(balanced) == 40 and balanced.count(1) == balanced.count(-1) == 20
    ids = {r["info"]["id"] + str(r["summaries"]) for r in rows}
    assert all(r["info"]["id"] + str(r["summaries"]) in ids and r["extra"]["source"] == "synthetic"
               for r in balanced_rows)
    assert balanced_rows == op.pair_rows(rows, 40, 0, "synthetic", balance_length=True)  # deterministic
    # fewer rows of one side than n / 2: all of them, the rest from the other side
    few_longer = [r for r, side in zip(rows, sides(rows)) if side == -1][:30] + [
        r for r, side in zip(rows, sides(rows)) if side == 1][:3]
    assert sorted(sides(op.pair_rows(few_longer, 10, 0, "synthetic", balance_length=True))) == [-1] * 7 + [1] * 3


def test_report_ranks_policies_by_their_gold_win_rate_against_the_references(corpus, tmp_path):
    """Hand-made tables: the "untrained" model writes truncated summaries, "SFT" the references themselves and "PPO"
    the complete summaries, so the report must rank them in that order against the references."""
    run = tmp_path / "run"
    validation = synth.read_jsonl(os.path.join(corpus, "sft", "validation.jsonl"))
    d = {k: str(run / k) for k in ("base", "sft", "samples", "rm", "ppo")}
    sample_table(os.path.join(d["base"], "validation_table.csv"), validation, "truncated")
    os.makedirs(d["sft"])
    pd.DataFrame([{"id": r["id"], "query": "q", "response": r["summary"], "reference": r["summary"]}
                  for r in validation]).to_csv(os.path.join(d["sft"], "validation_table.csv"), index=False)
    sample_table(os.path.join(d["ppo"], "validation_table.csv"), validation, "complete")
    args = op.parse_args(["--data_dir", corpus, "--run_dir", str(run)])
    op.write_report(args, d, {"sft": 1.0}, {"chosen": "fp32"})
    report = (run / "report.md").read_text()
    rates = {}
    for line in report.splitlines():
        for name in ("untrained", "SFT", "PPO"):
            if line.startswith(f"| {name} |"):
                rates[name] = float(line.split("|")[2].split("±")[0])
    assert rates["untrained"] < 0.35 and rates["SFT"] == 0.5  # the references tie themselves
    flawed = 1 - sum(synth.reference_flaw(synth._example_story(r)[0]) == "none" for r in validation) / len(validation)
    assert rates["PPO"] == pytest.approx(flawed + (1 - flawed) / 2, abs=6e-4)  # beats every flawed reference, ties the rest
    assert "PPO against SFT, head to head" in report
    # mean words: the complete summaries (PPO) run longer than the truncated ones (untrained)
    mean_words = {line.split("|")[1].strip(): float(line.split("|")[5]) for line in report.splitlines()
                  if line.startswith(("| untrained |", "| SFT |", "| PPO |", "| references |"))}
    assert mean_words["untrained"] < mean_words["references"] == mean_words["SFT"] < mean_words["PPO"]
    # key-fact coverage and invented concepts: the complete summaries state every fact and make nothing up; the
    # references miss facts where their flaw drops or blurs one; the truncated ones cover least
    coverage = {line.split("|")[1].strip(): float(line.split("|")[6]) for line in report.splitlines()
                if line.startswith(("| untrained |", "| SFT |", "| PPO |", "| references |"))}
    invented = {line.split("|")[1].strip(): float(line.split("|")[7]) for line in report.splitlines()
                if line.startswith(("| PPO |", "| references |"))}
    assert coverage["PPO"] == 1.0 and invented["PPO"] == 0.0
    assert coverage["untrained"] < coverage["references"] == coverage["SFT"] < 1.0


def test_report_says_when_the_ppo_stage_did_not_finish(corpus, tmp_path):
    """A PPO stage that died after its first update left metrics but no policy: the report must say so, not
    summarise the partial record as a finished run; once the policy is saved, the warning goes."""
    run = tmp_path / "run"
    d = {k: str(run / k) for k in ("base", "sft", "samples", "rm", "ppo")}
    os.makedirs(d["ppo"])
    with open(os.path.join(d["ppo"], "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"episodes": 32, "objective/scores": -0.3, "objective/kl": 0.0,
                            "objective/response_length": 20.0, "objective/eos_fraction": 0.9,
                            "time/episodes_per_second": 0.1}) + "\n")
    args = op.parse_args(["--data_dir", corpus, "--run_dir", str(run)])
    op.write_report(args, d, {}, {"chosen": "fp32"})
    report = (run / "report.md").read_text()
    assert "The PPO stage did not finish" in report and "1 updates, 32 episodes" in report
    open(os.path.join(d["ppo"], "model.safetensors"), "w").close()
    op.write_report(args, d, {}, {"chosen": "fp32"})
    report = (run / "report.md").read_text()
    assert "did not finish" not in report and "1 updates, 32 episodes" in report


def test_longer_wins_counts_only_pairs_of_unequal_length():
    assert op.longer_wins([True, True, False, True], [5, 3, 7, 4], [3, 5, 2, 4]) == pytest.approx(1 / 3)
    assert op.longer_wins([True], [4], [4]) is None


def test_the_stages_chain_end_to_end_on_a_tiny_model(tiny_model, corpus, tmp_path):
    """The whole chain through the real stage scripts, tiny sizes: every stage's output feeds the next (SFT samples
    -> RM data mix -> RM -> PPO) and the report judges all of them."""
    run = tmp_path / "run"
    op.main(["--model_dir", tiny_model, "--data_dir", corpus, "--run_dir", str(run), "--precision", "fp32",
             "--stages", "base,sft,samples,rm,ppo,report", "--eval_samples", "6", "--sft_episodes", "16",
             "--sft_batch", "8", "--sample_prompts", "6", "--rm_synthetic_pairs", "10", "--rm_batch", "8",
             "--rm_eval_synthetic", "6", "--rm_eval_model", "6", "--ppo_episodes", "8", "--ppo_batch", "4",
             "--ppo_critic_warmup", "1", "--probe_size", "2"])
    report = (run / "report.md").read_text()
    for line in ("| untrained |", "| SFT |", "| PPO |", "PPO against SFT, head to head", "| sft_vs_reference | 6 |",
                 "longer wins: labels / RM |",
                 "| synthetic | 6 |", "Validation probe (2 prompts)", "(`health_curves.png`)"):
        assert line in report, line
    assert (run / "health_curves.png").stat().st_size > 0
    counts = {split: len(synth.read_jsonl(str(run / "rm_data" / f"{split}.jsonl"))) for split in ("train", "validation")}
    assert counts["validation"] == 12 and counts["train"] > 10
    rm_info = json.load(open(run / "rm" / "run_info.json"))
    assert rm_info["args"]["total_episodes"] == counts["train"] // 8 * 8
    assert json.load(open(run / "precision.json"))["chosen"] == "fp32"
    for png in ("ppo_curves.png", "gold_vs_kl.png"):
        assert (run / png).stat().st_size > 0


def test_tables_with_a_lone_carriage_return_in_a_sample_read_back_whole(tmp_path):
    """pandas' to_csv (how the stages write tables) leaves a field holding a lone "\\r" unquoted; the default reader
    splits the row there. The pipeline reads with "\\n" row ends only."""
    path = str(tmp_path / "table.csv")
    pd.DataFrame([{"id": "a", "response": "one\rtwo"}, {"id": "b", "response": "three"}]).to_csv(path, index=False)
    assert len(pd.read_csv(path, keep_default_na=False)) != 2  # the fault this guards against
    assert op.load_csv(path) == [{"id": "a", "response": "one\rtwo"}, {"id": "b", "response": "three"}]
