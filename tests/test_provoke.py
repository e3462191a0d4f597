"""benchmark/offline/provoke.py: the length-biased relabellings and the verdict on a provoked run."""

import provoke


def test_length_biased_labels_always_choose_the_longer_summary():
    rows = [{"summaries": [{"text": "a b c"}, {"text": "a b"}], "choice": 1, "info": {"id": "x"}},
            {"summaries": [{"text": "a"}, {"text": "a b c d"}], "choice": 0, "info": {"id": "y"}},
            {"summaries": [{"text": "a b"}, {"text": "c d"}], "choice": 1, "info": {"id": "z"}}]
    out = provoke.length_biased(rows)
    assert [r["choice"] for r in out] == [0, 1, 0]
    assert [r["choice"] for r in rows] == [1, 0, 1]  # the input rows are left as they were
    assert out[0]["info"] == {"id": "x"}
    assert [r["choice"] for r in provoke.length_biased(rows, longer=False)] == [1, 0, 0]  # short_rm; ties: the first


def rows(golds):
    return [{"update": u, "probe_gold": g} for u, g in enumerate(golds, start=1)]


def test_a_trip_before_the_gold_falls_is_in_time_and_keeps_the_better_policy():
    # gold of the policy each update started from: rises to 0.62, then falls; the monitor trips at update 4
    incidents = [{"update": 4, "tripped": {"probe_gap_rise": [0.7, 0.5]}, "last_healthy_update": 2}]
    v = provoke.verdict(rows([0.55, 0.60, 0.62, 0.58, 0.40, 0.30]), incidents, final_gold=0.25)
    assert v["tripped_at_update"] == 4 and v["tripped_checks"] == ["probe_gap_rise"]
    assert abs(v["gold_fall_before_trip"] - 0.04) < 1e-9 and v["caught_in_time"]
    assert v["kept_update"] == 2 and v["kept_gold"] == 0.62 and v["kept_beats_final"]


def test_a_late_trip_or_none_is_not_in_time():
    late = [{"update": 5, "tripped": {"kl": [12, 10]}, "last_healthy_update": 3}]
    v = provoke.verdict(rows([0.55, 0.60, 0.62, 0.50, 0.40, 0.30]), late, final_gold=0.55)
    assert abs(v["gold_fall_before_trip"] - 0.22) < 1e-9 and not v["caught_in_time"]
    assert v["kept_gold"] == 0.50 and not v["kept_beats_final"]
    never = provoke.verdict(rows([0.55, 0.50, 0.40]), [], final_gold=0.40)
    assert never["tripped_at_update"] is None and not never["caught_in_time"] and "kept_update" not in never
