"""The paper's figures (benchmark/paper/plot_paper.py) from fake run folders: 2 sizes x 2 seeds of SFT, RM and PPO with
small metrics.jsonl / CSV files in the stages' formats. Checks the aggregated numbers and that the PNGs are real."""

import json
import math
import os
import statistics

import numpy as np
import pandas as pd
import pytest

import plot_paper
import reward_tldr

SIZES = {"1b": "EleutherAI/pythia-1b-deduped", "2.8b": "EleutherAI/pythia-2.8b-deduped"}
SEEDS = (44413, 55513)
# the numbers the fake runs log, chosen so mean and std differ per size
RM_ACC = {("1b", 44413): 0.62, ("1b", 55513): 0.64, ("2.8b", 44413): 0.66, ("2.8b", 55513): 0.69}
ROUGE = {("1b", 44413): 0.24, ("1b", 55513): 0.25, ("2.8b", 44413): 0.26, ("2.8b", 55513): 0.26}
PPO_WINS = {("1b", 44413): (6, 10), ("1b", 55513): (3, 10), ("2.8b", 44413): (7, 10), ("2.8b", 55513): (8, 10)}


def write_run(folder, args: dict, records: list[dict]) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "run_info.json"), "w") as f:
        json.dump({"args": args, "argv": [], "git_sha": ""}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(folder)


def judged_table(path, wins: int, n: int, invalid: int = 0, words: int = 5) -> None:
    """A judge.py output: `wins` rows preferred ours, `invalid` unreadable, the rest the reference."""
    preferred = ["ours"] * wins + ["invalid"] * invalid + ["reference"] * (n - wins - invalid)
    pd.DataFrame({"query": ["q"] * n, "response": [" ".join(["w"] * words)] * n, "reference": ["r"] * n,
                  "score": np.linspace(-1, 1, n), "reference_score": [0.0] * n, "preferred": preferred}
                 ).to_csv(path, index=False)


def make_runs(root, sizes=("1b", "2.8b"), seeds=SEEDS, folder="pythia-{size}") -> None:
    """models/pythia-{size}/{sft,reward,policy}_{seed} in the stages' formats."""
    rng = np.random.default_rng(0)
    for size in sizes:
        for seed in seeds:
            base = root / "models" / folder.format(size=size)
            sft = write_run(base / f"sft_{seed}", {"base_model": SIZES[size], "seed": seed, "total_episodes": None},
                            [{"samples": 128, "train/sft/loss": 2.0},
                             {"samples": 256, "validation/sft/loss": 1.9,
                              "validation/sft/rouge/rougeL": ROUGE[size, seed]}])
            judged_table(os.path.join(sft, "validation_table_judged.csv"), 3, 10, invalid=1, words=4)
            rm = write_run(base / f"reward_{seed}", {"sft_model_path": sft, "seed": seed},
                           [{"samples": 64, "train/rm/loss": 0.69},
                            {"samples": 128, "eval/rm/validation/accuracy": 0.5},  # an earlier value: not the last
                            {"samples": 128, "eval/rm/validation/accuracy": RM_ACC[size, seed],
                             "eval/rm/validation_cnndm/accuracy": RM_ACC[size, seed] - 0.01}])
            margins = rng.normal(0, 2, 400)
            correct = rng.random(400) < 1 / (1 + np.exp(-np.abs(margins) * 0.7))
            reward_tldr.calibration_table(margins, correct).to_csv(os.path.join(rm, "validation_calibration.csv"),
                                                                   index=False)
            wins, n = PPO_WINS[size, seed]
            ppo = write_run(base / f"policy_{seed}", {"sft_model_path": sft, "reward_model_path": rm, "seed": seed},
                            [{"episodes": 512 * k, "samples": 512 * k, "objective/scores": 0.1 * k + seed % 7,
                              "objective/kl": 2.0 * k, "objective/response_length": 30 + k} for k in range(1, 6)]
                            + [{"episodes": 2560, "samples": 2560, "eval/validation/score": 1.0}])
            judged_table(os.path.join(ppo, "validation_table_judged.csv"), wins, n, words=8)


def check_png(path: str) -> None:
    import matplotlib.image

    assert os.path.getsize(path) > 5_000, path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_parse_model_size_and_labels():
    assert plot_paper.parse_model_size("EleutherAI/pythia-1b-deduped") == 1e9
    assert plot_paper.parse_model_size("EleutherAI/pythia-2.8b-deduped") == 2.8e9
    assert plot_paper.parse_model_size("EleutherAI/pythia-6.9b-deduped") == 6.9e9
    assert plot_paper.parse_model_size("models/smollm2-135m") == 135e6
    assert plot_paper.parse_model_size("HuggingFaceTB/SmolLM2-135M-Instruct") == 135e6
    assert plot_paper.parse_model_size("models/pythia-1b/sft_44413") == 1e9
    assert plot_paper.parse_model_size("gpt2") is None
    assert plot_paper.parse_model_size("runs/offline/sft", {"offline": 135e6}) == 135e6
    assert [plot_paper.size_label(s) for s in (1e9, 2.8e9, 6.9e9, 135e6)] == ["1B", "2.8B", "6.9B", "135M"]


def test_aggregation_helpers():
    agg = plot_paper.aggregate([(1e9, 1, 0.2), (1e9, 2, 0.4), (2.8e9, 1, 0.5), (2.8e9, 2, math.nan), (1e8, 1, 0.9)])
    assert list(agg["size"]) == [1e8, 1e9, 2.8e9]
    assert list(agg["n"]) == [1, 2, 1]
    assert agg["mean"].tolist() == pytest.approx([0.9, 0.3, 0.5])
    assert agg["std"].tolist() == pytest.approx([0.0, statistics.stdev([0.2, 0.4]), 0.0])
    curves = plot_paper.mean_std_curves({1: [(1, 1.0), (2, 2.0), (3, 3.0)], 2: [(1, 3.0), (2, 4.0)]})
    assert curves["x"].tolist() == [1, 2, 3] and curves["mean"].tolist() == [2.0, 3.0, 3.0]
    assert curves["n"].tolist() == [2, 2, 1] and curves["std"].tolist() == pytest.approx([2 ** 0.5, 2 ** 0.5, 0.0])
    smoothed = plot_paper.mean_std_curves({1: [(1, 1.0), (2, 3.0), (3, 5.0)]}, smooth=2)
    assert smoothed["mean"].tolist() == [1.0, 2.0, 4.0]
    assert plot_paper.win_rate_from_values(["ours", "reference", "invalid", "ours"]) == (2 / 3, 3)
    assert plot_paper.win_rate_from_values([1, 0, 0.5, float("nan")]) == (0.5, 3)
    assert plot_paper.win_rate_from_values(["1", "0", ""]) == (0.5, 2)

    class CharTokenizer:  # stands in for the run folder's tokenizer
        def encode(self, text, add_special_tokens=False):
            return list(text)

    assert plot_paper.response_lengths(["ab c", "d"]) == [2, 1]
    assert plot_paper.response_lengths(["ab c", "d"], CharTokenizer()) == [4, 1]


def test_figures_and_numbers_for_two_sizes_and_two_seeds(tmp_path):
    make_runs(tmp_path)
    out = tmp_path / "figures"
    written = plot_paper.main([str(tmp_path / "models"), "--out_dir", str(out), "--length_unit", "words"])
    for name in ("rm_accuracy_vs_size", "rouge_vs_size", "win_rate_vs_size", "win_rate_vs_length", "rm_calibration",
                 "ppo_curves"):
        check_png(written[name])
    summary = pd.read_csv(out / "summary.csv")

    def row(metric, stage, label):
        r = summary[(summary.metric == metric) & (summary.stage == stage) & (summary.size_label == label)]
        assert len(r) == 1, (metric, stage, label)
        return r.iloc[0]

    for size, label in (("1b", "1B"), ("2.8b", "2.8B")):
        acc = [RM_ACC[size, s] for s in SEEDS]  # the last logged value, not the earlier 0.5
        r = row("rm_accuracy/validation", "reward", label)
        assert r["n"] == 2
        assert (r["mean"], r["std"]) == (pytest.approx(statistics.mean(acc)), pytest.approx(statistics.stdev(acc)))
        cnndm = row("rm_accuracy/validation_cnndm", "reward", label)
        assert cnndm["mean"] == pytest.approx(statistics.mean(acc) - 0.01)
        rouge = [ROUGE[size, s] for s in SEEDS]
        r = row("rougeL", "sft", label)
        assert (r["mean"], r["std"]) == (pytest.approx(statistics.mean(rouge)), pytest.approx(statistics.stdev(rouge)))
        wins = [PPO_WINS[size, s][0] / PPO_WINS[size, s][1] for s in SEEDS]
        r = row("win_rate", "ppo", label)
        assert (r["mean"], r["std"]) == (pytest.approx(statistics.mean(wins)), pytest.approx(statistics.stdev(wins)))
        assert row("win_rate", "sft", label)["mean"] == pytest.approx(3 / 9)  # the invalid row is left out
        assert row("mean_length", "ppo", label)["mean"] == 8
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 12 and sorted(runs["stage"].value_counts().items()) == [("ppo", 4), ("reward", 4), ("sft", 4)]
    ppo = runs[(runs.stage == "ppo") & (runs.size_label == "2.8B") & (runs.seed == 55513)].iloc[0]
    assert (ppo["win_rate"], ppo["n_judged"]) == (0.8, 10)
    # the RM's size came through its SFT folder's run_info.json, to the base model
    assert set(runs[runs.stage == "reward"]["model"]) == set(SIZES.values())


def test_one_size_and_the_offline_options(tmp_path):
    """The offline run's shape: one model size, two seeds, a win rate from given columns, a size from --size_map."""
    make_runs(tmp_path, sizes=("1b",), folder="offline")
    for seed in SEEDS:  # a base model whose name tells no size
        path = tmp_path / "models" / "offline" / f"sft_{seed}" / "run_info.json"
        info = json.loads(path.read_text())
        info["args"]["base_model"] = "local/tiny-model"
        path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="size_map"):
        plot_paper.load_run(str(tmp_path / "models" / "offline" / "reward_44413"))
    out = tmp_path / "figures"
    written = plot_paper.main([str(tmp_path / "models" / "offline" / "*"), "--out_dir", str(out),
                               "--size_map", "tiny=135e6", "--win_scores", "score,reference_score"])
    for name in ("rm_accuracy_vs_size", "rouge_vs_size", "win_rate_vs_size", "win_rate_vs_length", "rm_calibration",
                 "ppo_curves"):
        check_png(written[name])
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["size_label"]) == {"135M"}
    r = summary[(summary.metric == "win_rate") & (summary.stage == "ppo")].iloc[0]
    assert (r["mean"], r["n"]) == (0.5, 2)  # linspace(-1, 1, 10) against 0: 5 of 10 rows win
    # a column of numeric verdicts (e.g. a gold judge's) works the same way
    for seed in SEEDS:
        table = tmp_path / "models" / "offline" / f"policy_{seed}" / "validation_table.csv"
        pd.DataFrame({"query": ["q"] * 4, "response": ["a b"] * 4, "reference": ["r"] * 4,
                      "gold_win": [1, 1, 0, 0.5]}).to_csv(table, index=False)
        os.remove(table.parent / "validation_table_judged.csv")
    plot_paper.main([str(tmp_path / "models"), "--out_dir", str(out), "--size_map", "tiny=135e6",
                     "--win_column", "gold_win"])
    summary = pd.read_csv(out / "summary.csv")
    r = summary[(summary.metric == "win_rate") & (summary.stage == "ppo")].iloc[0]
    assert (r["mean"], r["std"]) == (pytest.approx(0.625), 0.0)


def test_score_win_rate_skips_tables_without_the_score_columns(tmp_path):
    """An SFT table has no reward-model scores: with --win_scores it gives no verdict instead of failing."""
    folder = str(tmp_path / "sft")
    os.makedirs(folder)
    pd.DataFrame({"query": ["q"], "response": ["a b"], "reference": ["c"]}).to_csv(
        os.path.join(folder, "validation_table.csv"), index=False)
    run = plot_paper.Run(folder, "sft", "smollm2", 135e6, 1, [])
    assert plot_paper.run_win_rate(run, "validation", None, ("score", "reference_score"), None, "words") is None
    pd.DataFrame({"query": ["q", "q"], "response": ["a b", "c"], "reference": ["c", "d"], "score": [1.0, 0.0],
                  "reference_score": [0.5, 0.5]}).to_csv(os.path.join(folder, "validation_table.csv"), index=False)
    result = plot_paper.run_win_rate(run, "validation", None, ("score", "reference_score"), None, "words")
    assert result["win_rate"] == 0.5 and result["n_judged"] == 2


def test_relative_checkpoint_paths_resolve_against_the_runs_working_directory(tmp_path, monkeypatch):
    """A PPO run started in `work/` names its SFT checkpoint `runs/sft`; plotting from elsewhere still finds the base
    model through the working directory recorded in run_info.json."""
    work = tmp_path / "work"
    for name, info in (("sft", {"args": {"base_model": "EleutherAI/pythia-1b-deduped", "seed": 1}}),
                       ("ppo", {"args": {"sft_model_path": "runs/sft", "reward_model_path": "runs/rm", "seed": 1},
                                "cwd": str(work)})):
        os.makedirs(work / "runs" / name)
        with open(work / "runs" / name / "run_info.json", "w") as f:
            json.dump(info, f)
    monkeypatch.chdir(tmp_path)
    run = plot_paper.load_run(str(work / "runs" / "ppo"))
    assert run.model == "EleutherAI/pythia-1b-deduped" and run.size == pytest.approx(1e9, rel=0.2)


def test_older_runs_moved_aside_by_a_fresh_start_are_not_found(tmp_path):
    """A stage moves an older run in its --output_dir to previous_runs/<n>/; only the current run is plotted."""
    for folder in ("runs/sft", "runs/sft/previous_runs/1", "runs/sft/checkpoints/update_000002", "runs/rm"):
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "run_info.json").write_text("{}")
    found = plot_paper.find_run_folders([str(tmp_path / "runs")])
    assert found == [str(tmp_path / "runs" / "rm"), str(tmp_path / "runs" / "sft")]
