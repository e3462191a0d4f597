"""benchmark/perf/gpu_check.py: its tiny mode runs every code path through the stage scripts and reports measured
figures (the CI run of the GPU check), a missing DeepSpeed skips its paths with a clear line, a missing package is named
with the offline install, a path that cannot start fails, and the figures' arithmetic (FLOPs, steps, projection)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark", "perf"))

import gpu_check as G  # noqa: E402

try:
    import deepspeed  # noqa: F401

    HAVE_DEEPSPEED = True
except ImportError:
    HAVE_DEEPSPEED = False


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_mode_runs_and_measures_every_path(tmp_path):
    """The command a person runs, on CPU: every path passes and is listed, with positive figures in the JSON."""
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "perf", "gpu_check.py"), "--tiny",
                           "--out_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stdout = proc.stdout
    listing = stdout[stdout.index("paths exercised:"):]
    expected = {name: "PASS" for name in G.PATHS}
    if not HAVE_DEEPSPEED:
        expected.update({name: "SKIP" for name, (_, ds, _) in G.PATHS.items() if ds})
    for name, status in expected.items():
        line = next(x for x in listing.splitlines() if x.split()[1:2] == [name])
        assert line.split()[0] == status, line
        if status == "SKIP":
            assert "skipped: not installed" in line
    assert "result: PASS" in stdout

    summary = json.load(open(out / "gpu_check.json"))
    assert summary["mode"] == "tiny" and summary["result"] == "pass"
    assert positive(summary["matmul_peak_gflops_bf16"])
    for name, status in expected.items():
        path = summary["paths"][name]
        if status == "SKIP":
            assert path["status"] == "skipped"
            continue
        assert path["status"] == "pass", (name, path["reason"])
        f = path["figures"]
        for key in ("training_s", "scoring_s", "episodes_per_s", "training_gflops_per_s", "peak_memory_gib"):
            assert positive(f[key]), (name, key, f)
        # useful FLOPs can only be a fraction of what the same device's best matmul reaches
        assert 0 < f["training_fraction_of_matmul_peak"] < 1, (name, f)
        if path["stage"] in ("sft", "ppo"):  # the stages that sample
            assert positive(f["generation_s"]) and positive(f["generated_tokens_per_s"]), (name, f)
        if path["stage"] == "ppo":
            assert f["generation_s"] + f["scoring_s"] + f["training_s"] + f["validation_probe_s"] <= f["update_s"]
            assert f["episodes_per_s"] == pytest.approx(summary["settings"]["ppo"]["batch"] / f["update_s"])
        else:
            assert f["steps_timed"] == summary["settings"][path["stage"]]["steps"] - 1  # the first is a warm-up
    # stage_timer.py saw the kernel and precision each path was meant to run with
    records = [json.loads(x) for x in open(out / "runs" / "sft" / "metrics.jsonl")]
    first = next(r for r in records if "timer/attn_implementation" in r)
    assert (first["timer/attn_implementation"], first["timer/autocast"]) == ("sdpa", "bf16")

    proj = summary["projection"]
    assert proj["path"] == ("ppo_zero2" if HAVE_DEEPSPEED else "ppo") and proj["updates"] == 999_936 // 512
    assert proj["wall_s"] == pytest.approx(proj["updates"] * proj["update_s"])
    assert sum(proj["phases_s"].values()) == pytest.approx(proj["update_s"])
    assert proj["update_s"] == pytest.approx(summary["paths"][proj["path"]]["figures"]["update_s"] * 64 / 4)
    assert f"1953 updates x {proj['update_s']:.3f} s = {proj['wall_s']:,.0f} s" in stdout


def test_missing_deepspeed_skips_its_paths_and_a_path_that_cannot_start_fails(tmp_path, monkeypatch, capsys):
    """DeepSpeed made unimportable: its paths print "skipped: not installed" with the offline install; a plain path
    left no time by --time_limit is a FAIL line and the exit status is 1."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    code = G.main(["--tiny", "--out_dir", str(tmp_path / "check"), "--paths", "sft,sft_zero2,ppo_zero3_offload",
                   "--time_limit", "1"])
    stdout = capsys.readouterr().out
    assert code == 1
    assert "deepspeed: not installed" in stdout and "DS_BUILD_OPS=0 pip wheel --no-deps -w wheels deepspeed" in stdout
    listing = stdout[stdout.index("paths exercised:"):].splitlines()
    for name in ("sft_zero2", "ppo_zero3_offload"):
        line = next(x for x in listing if x.split()[1:2] == [name])
        assert line.split()[0] == "SKIP" and "skipped: not installed" in line
    sft = next(x for x in listing if x.split()[1:2] == ["sft"])
    assert sft.split()[0] == "FAIL" and "time limit" in sft
    summary = json.load(open(tmp_path / "check" / "gpu_check.json"))
    assert summary["result"] == "fail" and summary["paths"]["sft_zero2"]["status"] == "skipped"
    assert summary["counts"] == {"pass": 0, "fail": 0, "skipped": 2, "not run": 1}


def test_a_missing_package_is_named_with_its_offline_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rouge_score", None)
    assert G.main(["--tiny", "--out_dir", str(tmp_path / "check")]) == 2
    stdout = capsys.readouterr().out
    assert "missing Python packages: rouge-score" in stdout
    assert "pip download -d wheels rouge-score" in stdout
    assert "pip install --no-index --find-links wheels rouge-score" in stdout
    assert not (tmp_path / "check").exists()  # nothing built before the check of the packages


def test_help_states_the_time_limit_and_the_oldest_versions(capsys):
    with pytest.raises(SystemExit):
        G.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "under 8 minutes" in text and "--time_limit" in text
    assert {"torch", "transformers", "deepspeed"} <= set(G.MIN_TESTED)
    assert all(f"{name} {version}" in text for name, version in G.MIN_TESTED.items())
    with pytest.raises(SystemExit):
        G.parse_args(["--paths", "sft,nope"])


def test_step_figures_leave_out_the_warm_up_step():
    """Records as stage_timer.py writes them: three optimizer steps closing at 10, 12 and 15 s."""
    def record(wall, tokens):
        return {"train/sft/loss": 1.0, "timer/wall": wall, "timer/train_tokens": tokens,
                "timer/train_attention_pairs": tokens * 10}

    records = [{"data/train/rows": 8, "timer/wall": 1.0}, record(10.0, 100), record(12.0, 200), record(15.0, 400)]
    f = G.step_figures(records, "train/sft/loss", batch=4, flops_of=lambda r: 1e9 * r["timer/train_tokens"],
                       peak_gflops=1000.0)
    assert f["steps_timed"] == 2 and f["training_s"] == 2.5 and f["episodes_per_s"] == 4 / 2.5
    assert f["training_tflop"] == pytest.approx(0.3)  # mean of the timed steps' 200e9 and 400e9
    assert f["training_gflops_per_s"] == pytest.approx(300 / 2.5)
    assert f["training_fraction_of_matmul_peak"] == pytest.approx(0.12)
    # one step only: timed from the record before it
    assert G.step_figures(records[:2], "train/sft/loss", 4, lambda r: 1e9, 1000.0)["training_s"] == 9.0
    assert G.lm_training_flops(10, 2, 4, tokens=100, pairs=1000, head_positions=50, vocab=16) == \
        6 * 10 * 100 + 6 * 2 * 4 * 1000 + 6 * 4 * 16 * 50


def test_projection_arithmetic():
    figures = {"update_s": 10.0, "generation_s": 2.0, "scoring_s": 1.0, "training_s": 6.0, "validation_probe_s": 0.5}
    p = G.projection(figures, batch=64, path="ppo_zero2", tiny=False)
    assert p["updates"] == 1953 and p["scale"] == 1 and p["wall_s"] == 19530.0
    assert p["phases_s"]["other_s"] == pytest.approx(0.5)
    assert "1953 updates x 10.000 s = 19,530 s = 5.42 h" in p["text"]
    half = G.projection(figures, batch=32, path="ppo", tiny=True)  # half the per-GPU batch: twice the time
    assert half["wall_s"] == 2 * p["wall_s"] and "tiny mode" in half["text"]


def test_a_run_with_the_wrong_kernel_or_precision_fails(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_text("")
    size = G.SIZES["tiny"]
    steps = [{"train/sft/loss": 1.0, "timer/wall": float(i)} for i in range(size["sft"]["steps"])]
    steps[0].update({"timer/attn_implementation": "eager", "timer/autocast": "off", "timer/param_dtype": "float32"})
    figures = {"training_s": 1.0, "peak_memory_gib": 0.5}
    problems = G.run_problems("sft", size, str(run), steps, figures)
    assert any("eager" in p for p in problems) and any("autocast was off" in p for p in problems)
    steps[0].update({"timer/attn_implementation": "sdpa", "timer/autocast": "bf16"})
    assert G.run_problems("sft", size, str(run), steps, figures) == []
    assert "1 of 3 optimizer steps logged" in G.run_problems("sft", size, str(run), steps[:1], figures)
    problems = G.run_problems("sft_zero2", size, str(run), steps, figures)  # fp32 weights and no DeepSpeed config
    assert any("not bf16" in p for p in problems) and any("DeepSpeed did not run" in p for p in problems)
