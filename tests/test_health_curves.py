"""benchmark/paper/health_curves.py on a crafted PPO output folder: the table follows the logged signals, flags exactly
the updates above a limit, scores the probe with the gold judge, and writes the figure."""

import json
import os

import pandas as pd

import health_curves as hc
import tldr_synth as synth


def test_health_table_and_figure(tmp_path, capsys):
    corpus = str(tmp_path / "corpus")
    synth.generate_corpus(corpus, seed=3, n_sft_train=4, n_sft_validation=4, n_sft_test=2, n_cmp_train=4,
                          n_cmp_validation=4)
    validation = synth.read_jsonl(os.path.join(corpus, "sft", "validation.jsonl"))
    run = tmp_path / "ppo"
    (run / "samples").mkdir(parents=True)
    limits = {"health_max_eos_drop": 0.5, "health_max_kl": 10.0, "health_max_length_drift": 0.5,
              "health_max_entropy_rise": None, "health_max_repetition_rise": 0.2, "health_max_duplicate_rise": 0.25,
              "health_max_probe_gap_rise": 1.0}
    (run / "run_info.json").write_text(json.dumps({"args": limits}))
    eos_drop = [0.0, 0.1, 0.7, 0.9]
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"episodes": 0}) + "\n")
        for u, drop in enumerate(eos_drop, start=1):
            f.write(json.dumps({"episodes": 8 * u, "objective/scores": 0.1 * u, "objective/kl": 2.0 * u,
                                "health/eos_drop": drop, "health/kl": 2.0 * u, "health/length_drift": 0.1,
                                "health/entropy_rise": 5.0, "health/repetition_rise": 0.0,
                                "health/duplicate_rise": 0.0}) + "\n")
    # the probe: the complete reference summaries at update 1, then the truncated variant (gold falls)
    for u, kind in ((1, "ref"), (2, "ref"), (3, "truncated"), (4, "truncated")):
        rows = []
        for r in validation:
            story, _ = synth._example_story(r)
            text = r["summary"] if kind == "ref" else synth.candidate_summaries(story)["truncated"][0]
            rows.append({"id": r["id"], "query": "q", "response": text, "reference": r["summary"], "score": float(u),
                         "reference_score": 0.0})
        pd.DataFrame(rows).to_csv(run / "samples" / f"update_{u:06d}.csv", index=False)

    examples = {r["id"]: r for r in validation}
    rows, got_limits = hc.health_rows(str(run), examples)
    assert got_limits["entropy_rise"] is None and got_limits["eos_drop"] == 0.5
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    assert [r["probe_rm"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
    ref_gold = sum(synth.gold_score(r, r["summary"]) for r in validation) / len(validation)
    assert abs(rows[0]["probe_gold"] - ref_gold) < 1e-9 and rows[2]["probe_gold"] < rows[1]["probe_gold"]
    # entropy_rise is disabled (None), so its 5.0 fails nothing; the KL limit 10 is never crossed
    assert [hc.failing(r, got_limits) for r in rows] == [[], [], ["eos_drop"], ["eos_drop"]]

    hc.main(["--ppo_dir", str(run), "--data_dir", corpus])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("update | probe_rm | probe_gold | eos_drop | kl | length_drift")
    assert "entropy_rise" not in out.splitlines()[0]
    assert (run / "health" / "health_curves.png").stat().st_size > 0

    # the monitor replayed on the same run with other limits: eos_drop at 0.8 trips once (updates 3-4 at 0.7, 0.9:
    # only update 4 fails), patience 1 trips at update 4 and indicts the policy of update 3
    assert hc.replay(rows, got_limits, patience=2) == [
        {"update": 4, "tripped": {"eos_drop": [0.9, 0.5]}, "last_healthy_update": 1}]
    assert hc.replay(rows, hc.parse_limits(["eos_drop=0.8"], got_limits), patience=1) == [
        {"update": 4, "tripped": {"eos_drop": [0.9, 0.8]}, "last_healthy_update": 2}]
    assert hc.replay(rows, hc.parse_limits(["eos_drop=none"], got_limits), patience=2) == []
    hc.main(["--ppo_dir", str(run), "--data_dir", corpus, "--limit", "kl=5", "--out", str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert "limits changed: {'kl': 5.0}: update 4 (eos_drop, kl) -> last healthy update 1" in out
    verdict = json.loads(out.split("verdict: ")[1].splitlines()[0])
    assert verdict["tripped_at_update"] == 4 and verdict["kept_update"] == 1 and verdict["caught_in_time"] is False


def test_replay_limits_must_name_a_check():
    import pytest

    with pytest.raises(SystemExit, match="NAME=VALUE"):
        hc.parse_limits(["no_such_check=1"], {})
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        hc.parse_limits(["kl="], {})
