"""The paper launchers (benchmark/paper/launch_paper.py): every printed command must parse against its stage script's
own `Args`, carry the paper's per-size settings and chain the stages' folders. No model is trained."""

import os
import shlex
import subprocess
import sys

import pytest
import tyro
import yaml

import launch_paper
import ppo_tldr
import reward_tldr
import sft_tldr
from conftest import ROOT

MODULES = {"sft_tldr.py": sft_tldr, "reward_tldr.py": reward_tldr, "ppo_tldr.py": ppo_tldr}
# the paper's gradient accumulation on 8 GPUs [N+ 1.B.8, 1.C.8, 1.D.4]
PPO_ACCUMULATION_8_GPUS = {"1b": 4, "2.8b": 16, "6.9b": 64}


def parse(argv: list[str]):
    """(script, parsed Args) of one stage command, through the stage's own tyro parser."""
    script, script_args = launch_paper.split_command(argv)
    return script, tyro.cli(MODULES[script].Args, args=script_args)


def world_size(argv: list[str]) -> int:
    """Processes a command starts: 1 for python, else --num_processes or the accelerate config's num_processes."""
    if argv[0] != "accelerate":
        return 1
    if "--num_processes" in argv:
        return int(argv[argv.index("--num_processes") + 1])
    with open(os.path.join(ROOT, argv[argv.index("--config_file") + 1])) as f:
        return yaml.safe_load(f)["num_processes"]


def printed_commands(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def check_run(commands: list[list[str]], size_key: str, seed: int, workers: int, save_every: int = 0) -> None:
    """One run's three commands: scripts in chain order, paper values, chained folders, derived batches."""
    size = launch_paper.SIZES[size_key]
    assert [launch_paper.split_command(c)[0] for c in commands] == ["sft_tldr.py", "reward_tldr.py", "ppo_tldr.py"]
    (_, sft), (_, rm), (_, ppo) = (parse(c) for c in commands)
    assert [world_size(c) for c in commands] == [workers] * 3
    for args in (sft, rm, ppo):
        assert args.seed == seed and args.learning_rate == 3e-6
    # SFT [N+ 1.B]: the base model, global batch 128, micro 1
    assert sft.base_model == size.model
    assert sft.output_dir == f"models/pythia-{size_key}/sft_{seed}"
    assert (sft.batch_size, sft.local_micro_batch_size) == (128, 1)
    assert sft_tldr.derive(sft, workers, 116_722).gradient_accumulation_steps == 128 // workers
    # RM [N+ 1.C]: initialised from this run's SFT folder, global batch 64, micro 1
    assert rm.sft_model_path == sft.output_dir
    assert rm.output_dir == f"models/pythia-{size_key}/reward_{seed}"
    assert (rm.batch_size, rm.local_micro_batch_size) == (64, 1)
    assert reward_tldr.derive(rm, workers, 92_832).gradient_accumulation_steps == 64 // workers
    assert rm.per_rank_shuffle  # [N+ 1.C.9] the reference RM's overlapping per-process data order
    assert (rm.dataset, rm.dataset_revision, rm.dataset_subset) == (
        "openai/summarize_from_feedback", "refs/convert/parquet", "comparisons")
    # PPO [N+ 1.D.4]: both earlier folders, batch 512, per-size micro and rollout batch, offload for 6.9B
    assert (ppo.sft_model_path, ppo.reward_model_path) == (sft.output_dir, rm.output_dir)
    assert ppo.output_dir == f"models/pythia-{size_key}/policy_{seed}"
    assert (ppo.batch_size, ppo.total_episodes) == (512, 999_936)  # 1953 updates, as the reference
    assert ppo.local_micro_batch_size == size.ppo_micro_batch == {"1b": 16, "2.8b": 4, "6.9b": 1}[size_key]
    assert ppo.local_rollout_forward_batch_size == size.rollout_batch == {"1b": 64, "2.8b": 32, "6.9b": 4}[size_key]
    assert ppo.offload == (size_key == "6.9b")
    derived = ppo_tldr.derive(ppo, workers)
    assert derived.gradient_accumulation_steps == PPO_ACCUMULATION_8_GPUS[size_key] * 8 // workers
    assert derived.num_updates == 1953
    assert (ppo.save_every, ppo.resume) == ((save_every, True) if save_every else (0, False))
    for args in (sft, rm):  # preemptible jobs keep resumable states in every stage
        assert (args.save_every, args.resume) == ((launch_paper.STATE_EVERY_STEPS, True) if save_every else (0, False))
    if ppo.offload:  # ppo_tldr.py refuses --offload without DeepSpeed
        assert commands[2][:4] == ["accelerate", "launch", "--config_file", launch_paper.ACCELERATE_CONFIG]


@pytest.mark.parametrize("target,workers", [("node", 8), ("single_gpu", 1)])
def test_printed_commands_parse_and_carry_the_paper_settings(target, workers, capsys):
    launch_paper.main(["--target", target, "--dry_run"])
    commands = printed_commands(capsys.readouterr().out)
    assert len(commands) == 3 * 4 * 3
    i = 0
    for size_key in ("1b", "2.8b", "6.9b"):
        for seed in (44413, 55513, 66613, 77713):
            check_run(commands[i:i + 3], size_key, seed, workers)
            i += 3
    prefix = {"node": ["accelerate", "launch", "--config_file", launch_paper.ACCELERATE_CONFIG],
              "single_gpu": ["env", "ACCELERATE_MIXED_PRECISION=bf16", "python"]}
    assert all(c[:len(prefix[target])] == prefix[target] for c in commands if "--offload" not in c)


def test_sizes_seeds_and_track_options(capsys):
    launch_paper.main(["--target", "node", "--dry_run", "--sizes", "pythia-2.8b", "--seeds", "55513", "--track"])
    commands = printed_commands(capsys.readouterr().out)
    check_run(commands, "2.8b", 55513, 8)
    assert all(parse(c)[1].track for c in commands)
    launch_paper.main(["--target", "single_gpu", "--dry_run", "--sizes", "1b", "--seeds", "1",
                       "--mixed_precision", "no"])
    assert all(c[0] == "python" for c in printed_commands(capsys.readouterr().out))
    with pytest.raises(ValueError, match="unknown size"):
        launch_paper.main(["--target", "node", "--dry_run", "--sizes", "12b"])


def test_slurm_array_tasks_run_the_node_commands(capsys, tmp_path):
    """Execute the generated sbatch script with bash for every array id (dry run) and parse what each task runs."""
    launch_paper.main(["--target", "slurm", "--dry_run"])
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-11" in out and "#SBATCH --requeue" in out and "#SBATCH --gpus-per-task=8" in out
    script = launch_paper.slurm_script(list(launch_paper.SIZES), list(launch_paper.SEEDS), python=sys.executable)
    path = tmp_path / "paper.sbatch"
    path.write_text(script)
    env = {**os.environ, "LAUNCH_DRY_RUN": "1"}
    for task in range(12):
        res = subprocess.run(["bash", str(path)], env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        size_key, seed = ("1b", "2.8b", "6.9b")[task // 4], launch_paper.SEEDS[task % 4]  # MODELS[id/4], SEEDS[id%4]
        check_run(printed_commands(res.stdout), size_key, seed, 8, save_every=100)
    # an id outside the array is an error, not a silent run of something else
    res = subprocess.run(["bash", str(path)], env={**env, "SLURM_ARRAY_TASK_ID": "12"}, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0


def test_a_wrong_flag_is_caught():
    """The check above can fail: a flag a stage does not have, or a misspelled one, stops tyro."""
    sft, rm, ppo = launch_paper.paper_stages(launch_paper.SIZES["1b"], 44413)
    for stage in (sft, rm, ppo):
        with pytest.raises(SystemExit):
            tyro.cli(MODULES[stage.script].Args, args=[*stage.args, "--no_such_flag", "1"])
    renamed = [a.replace("--local_rollout_forward_batch_size", "--rollout_batch_size") for a in ppo.args]
    with pytest.raises(SystemExit):
        tyro.cli(ppo_tldr.Args, args=renamed)
    with pytest.raises(ValueError):
        launch_paper.split_command(["accelerate", "launch", "train.py"])


def test_run_plan_chains_stops_on_failure_and_skips_finished_stages(tmp_path, capsys):
    """Runs tiny python commands instead of the stages: order, stop at the first failure, done markers."""
    log = tmp_path / "log.txt"

    def stage(name: str, code: int):
        out = tmp_path / name
        out.mkdir(exist_ok=True)
        argv = [sys.executable, "-c", f"open({str(log)!r}, 'a').write({name!r} + '\\n'); raise SystemExit({code})"]
        return ("run", launch_paper.Stage(name, "x_tldr.py", (), str(out)), argv)

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"samples": 1}\n')  # an interrupted attempt's lines
    with pytest.raises(SystemExit, match="b failed"):
        launch_paper.run_plan([stage("a", 0), stage("b", 3), stage("c", 0)])
    assert log.read_text().split() == ["a", "b"]
    assert (tmp_path / "a" / launch_paper.DONE_MARKER).exists()
    assert not (tmp_path / "b" / launch_paper.DONE_MARKER).exists()
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # set aside, not mixed with the next attempt
    assert any(n.startswith("metrics.jsonl.interrupted.") for n in os.listdir(tmp_path / "b"))
    launch_paper.run_plan([stage("a", 0), stage("b", 0), stage("c", 0)])
    assert log.read_text().split() == ["a", "b", "b", "c"]  # a was skipped
