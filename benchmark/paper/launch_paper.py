"""Launch the paper's runs: Pythia 1B / 2.8B / 6.9B x four seeds, each chaining SFT -> reward model -> PPO.

Every run is three commands; each stage's output folder is the next stage's input [N+ 5]:

    models/pythia-{size}/sft_{seed}      sft_tldr.py     --base_model EleutherAI/pythia-{size}-deduped
    models/pythia-{size}/reward_{seed}   reward_tldr.py  --sft_model_path models/pythia-{size}/sft_{seed}
    models/pythia-{size}/policy_{seed}   ppo_tldr.py     --sft_model_path models/pythia-{size}/sft_{seed}
                                                         --reward_model_path models/pythia-{size}/reward_{seed}

with the paper's settings: learning rate 3e-6 everywhere; global batches SFT 128, RM 64, PPO 512 for 1M episodes;
SFT and RM micro-batch 1 [N+ 1.B.8, 1.C.8]; the reference RM's data order, each process shuffling the comparisons
with its own seed so that their subsets overlap (`--per_rank_shuffle` [N+ 1.C.9]: the released RMs, whose accuracy
the paper reports, were trained on about 66% unique pairs); the PPO micro-batch and rollout batch per size [N+ 1.D.4]:

    size    PPO micro   rollout forward batch   accumulation on 8 GPUs (on 1 GPU)
    1B      16          64                      4  (32)
    2.8B    4           32                      16 (128)
    6.9B    1           4 and --offload         64 (512)

Our scripts take the GLOBAL `--batch_size` and the per-process `--local_micro_batch_size` and derive the gradient
accumulation from the number of processes, so the same command keeps the paper's batches on 8 GPUs or on one.

Targets:
  node        one 8-GPU node: `accelerate launch --config_file benchmark/accelerate/deepspeed_zero2.yaml ...`
              (DeepSpeed ZeRO-2, bf16, 8 processes: the reference runs' setting [N+ 1.D.22, 5])
  single_gpu  one GPU: `python script.py ...`, the same global batches by accumulation (8x more steps), with
              ACCELERATE_MIXED_PRECISION=bf16 in its environment (a plain `python` run is fp32 otherwise; the paper
              trained in bf16; `--mixed_precision no` for GPUs without bf16). The 6.9B PPO stage needs DeepSpeed for
              --offload, so it runs under accelerate with one process and the node's config. Only 1B fits
              a 80 GB GPU comfortably: full fine-tuning keeps ~16 bytes per trained parameter (bf16/fp32 weights,
              gradients, Adam), and PPO trains two models (policy and value)
  slurm       writes an sbatch array script, 12 tasks = 3 sizes x 4 seeds, MODEL = MODELS[id / 4] and
              SEED = SEEDS[id % 4] as the reference's sbatches [N+ 5]; each task runs this file with
              `--target node` for its one size and seed, so SFT -> RM -> PPO are chained inside the task.
              `--requeue`: a requeued task skips finished stages, and the interrupted stage resumes from its
              latest state (`--save_every`, `--resume`)

A stage that exits 0 gets a `launch_done.json` marker in its output folder; later launches skip it (`--force`
reruns it). Commands run one after the other and the first failure stops the launch.

    python benchmark/paper/launch_paper.py --target node --dry_run                  # print the 36 commands
    python benchmark/paper/launch_paper.py --target node --sizes 1b --seeds 44413 --track
    python benchmark/paper/launch_paper.py --target single_gpu --sizes 1b --seeds 44413 55513
    python benchmark/paper/launch_paper.py --target slurm --dry_run                 # print the sbatch script
    python benchmark/paper/launch_paper.py --target slurm --partition hopper-prod   # write and submit it
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = ("node", "single_gpu", "slurm")
SEEDS = (44413, 55513, 66613, 77713)  # [N+ 1.B.9]
ACCELERATE_CONFIG = "benchmark/accelerate/deepspeed_zero2.yaml"  # [N+ 5] deepspeed.yaml: ZeRO-2, bf16, 8 GPUs
DONE_MARKER = "launch_done.json"
LEARNING_RATE = "3e-6"  # every stage and size [N+ 1.B.6, 1.C.7, 1.D.2]


@dataclass(frozen=True)
class Size:
    """Per-size settings of the reference launch scripts [N+ 1.D.4, 1.D.22]."""

    key: str  # what --sizes takes
    model: str  # hub name of the base model
    ppo_micro_batch: int  # PPO rollouts per training forward pass and process
    rollout_batch: int  # PPO rollouts per generation / no-grad forward and process
    offload: bool  # ZeRO-3 + CPU offload of the frozen reference and reward models


SIZES = {
    "1b": Size("1b", "EleutherAI/pythia-1b-deduped", 16, 64, False),
    "2.8b": Size("2.8b", "EleutherAI/pythia-2.8b-deduped", 4, 32, False),
    "6.9b": Size("6.9b", "EleutherAI/pythia-6.9b-deduped", 1, 4, True),
}

# global batches and micro-batches of SFT and RM; the reference keeps their defaults for every size [N+ 1.B.8, 1.C.8]
SFT_BATCH, RM_BATCH, PPO_BATCH = 128, 64, 512
SFT_MICRO, RM_MICRO = 1, 1
PPO_EPISODES = 999_936  # [N+ 1.D.4] the paper's 1M episodes in whole batches: 1953 updates of 512
STATE_EVERY_STEPS = 100  # SFT and RM on preemptible jobs: a resumable state every 100 optimizer steps (911 / 1450 in all)


@dataclass(frozen=True)
class Stage:
    """One stage of one run: the script, its own arguments (launcher excluded) and its output folder."""

    name: str  # sft | reward | ppo
    script: str  # file name in the repository root
    args: tuple[str, ...]
    output_dir: str


def resolve_size(name: str) -> Size:
    """`--sizes` entries: a key (1b, 2.8b, 6.9b), `pythia-1b`, or the full hub name."""
    for size in SIZES.values():
        if name.lower() in (size.key, f"pythia-{size.key}", size.model.lower()):
            return size
    raise ValueError(f"unknown size {name!r}; choose from {', '.join(SIZES)}")


def run_dirs(size: Size, seed: int, models_dir: str = "models") -> dict[str, str]:
    """The three output folders of one run: models/pythia-{size}/{sft,reward,policy}_{seed}."""
    base = os.path.join(models_dir, f"pythia-{size.key}")
    return {name: os.path.join(base, f"{folder}_{seed}") for name, folder in
            (("sft", "sft"), ("reward", "reward"), ("ppo", "policy"))}


def paper_stages(size: Size, seed: int, models_dir: str = "models", track: bool = False,
                 ppo_save_every: int = 0) -> list[Stage]:
    """SFT -> RM -> PPO of one size and seed with the paper's settings; pure (no launcher, no file access).

    The values are spelled out even where they equal the scripts' defaults, so a printed command is a complete
    record of the run and a change of default cannot silently change the reproduction."""
    d = run_dirs(size, seed, models_dir)
    common = ["--seed", str(seed), "--learning_rate", LEARNING_RATE] + (["--track"] if track else [])
    sft = ["--base_model", size.model, "--output_dir", d["sft"], "--exp_name", f"sft_tldr__pythia-{size.key}",
           "--batch_size", str(SFT_BATCH), "--local_micro_batch_size", str(SFT_MICRO), *common]
    reward = ["--sft_model_path", d["sft"], "--output_dir", d["reward"],
              "--exp_name", f"reward_tldr__pythia-{size.key}",
              "--batch_size", str(RM_BATCH), "--local_micro_batch_size", str(RM_MICRO),
              "--dataset", "openai/summarize_from_feedback", "--dataset_revision", "refs/convert/parquet",
              "--dataset_subset", "comparisons",  # the release as parquet files (README "Datasets")
              "--per_rank_shuffle",  # [N+ 1.C.9] the reference RM's overlapping per-process shuffles
              *common]
    ppo = ["--sft_model_path", d["sft"], "--reward_model_path", d["reward"], "--output_dir", d["ppo"],
           "--exp_name", f"ppo_tldr__pythia-{size.key}", "--batch_size", str(PPO_BATCH),
           "--local_micro_batch_size", str(size.ppo_micro_batch),
           "--local_rollout_forward_batch_size", str(size.rollout_batch),
           "--total_episodes", str(PPO_EPISODES), *common]
    if size.offload:
        ppo.append("--offload")  # [N+ 1.D.22] the 6.9B recipe
    if ppo_save_every:  # preemptible jobs: periodic training states in every stage, continued when requeued
        sft += ["--save_every", str(STATE_EVERY_STEPS), "--resume"]
        reward += ["--save_every", str(STATE_EVERY_STEPS), "--resume"]
        ppo += ["--save_every", str(ppo_save_every), "--resume"]
    return [Stage("sft", "sft_tldr.py", tuple(sft), d["sft"]),
            Stage("reward", "reward_tldr.py", tuple(reward), d["reward"]),
            Stage("ppo", "ppo_tldr.py", tuple(ppo), d["ppo"])]


def launcher(target: str, stage: Stage, python: str = "python", mixed_precision: str = "bf16") -> list[str]:
    """The argv in front of the script for a target."""
    if target in ("node", "slurm"):  # a slurm task runs the node commands
        return ["accelerate", "launch", "--config_file", ACCELERATE_CONFIG]
    if target == "single_gpu":
        if "--offload" in stage.args:  # --offload is a DeepSpeed feature: one DeepSpeed process
            return ["accelerate", "launch", "--config_file", ACCELERATE_CONFIG, "--num_processes", "1"]
        # the Accelerator of a plain python process reads its precision from this variable
        return (["env", f"ACCELERATE_MIXED_PRECISION={mixed_precision}"] if mixed_precision != "no" else []) + [python]
    raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")


def stage_command(target: str, stage: Stage, python: str = "python", mixed_precision: str = "bf16") -> list[str]:
    return [*launcher(target, stage, python, mixed_precision), stage.script, *stage.args]


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """(script, the script's arguments) of a stage command: everything after the `*_tldr.py` element."""
    for i, token in enumerate(argv):
        if token.endswith("_tldr.py"):
            return token, list(argv[i + 1:])
    raise ValueError(f"no stage script in {shlex.join(argv)}")


def plan(target: str, sizes: list[str], seeds: list[int], models_dir: str = "models", track: bool = False,
         ppo_save_every: int = 0, python: str = "python",
         mixed_precision: str = "bf16") -> list[tuple[str, Stage, list[str]]]:
    """(run label, stage, argv) of every stage command, runs in order size-major, stages in chain order."""
    out = []
    for name in sizes:
        size = resolve_size(name)
        for seed in seeds:
            for stage in paper_stages(size, seed, models_dir, track, ppo_save_every):
                argv = stage_command(target, stage, python, mixed_precision)
                out.append((f"pythia-{size.key} seed {seed}", stage, argv))
    return out


# ---------------------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------------------


def slurm_script(sizes: list[str], seeds: list[int], models_dir: str = "models", track: bool = False,
                 ppo_save_every: int = 100, partition: str = "hopper-prod", repo: str = ROOT,
                 python: str = "python") -> str:
    """An sbatch array script, one task per (size, seed): MODEL = MODELS[id / n_seeds], SEED = SEEDS[id % n_seeds].

    Each task calls this launcher with `--target node` for its size and seed, so the task runs exactly the node
    commands (printed under the script by `--dry_run`), chained and stopping at the first failure. With the
    environment variable LAUNCH_DRY_RUN=1 a task prints its commands instead of running them."""
    models = [resolve_size(s).model for s in sizes]
    n = len(models) * len(seeds)
    flags = ["--models_dir", models_dir, "--ppo_save_every", str(ppo_save_every)] + (["--track"] if track else [])
    return "\n".join([
        "#!/bin/bash",
        "#SBATCH --job-name=nplus-tldr",
        f"#SBATCH --partition={partition}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        "#SBATCH --gpus-per-task=8",
        "#SBATCH --cpus-per-gpu=10",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        f"#SBATCH --array=0-{n - 1}",
        "#SBATCH --output=slurm/logs/%x_%A_%a.out",
        "# The paper's runs [N+ 5]: one task per (model size, seed), SFT -> RM -> PPO chained inside the task.",
        "# A requeued task skips finished stages (launch_done.json); the interrupted stage resumes from its last state.",
        "set -euo pipefail",
        f"cd {shlex.quote(repo)}",
        f"MODELS=({' '.join(models)})",
        f"SEEDS=({' '.join(str(s) for s in seeds)})",
        "TASK=${SLURM_ARRAY_TASK_ID:?run this script with sbatch (or set SLURM_ARRAY_TASK_ID)}",
        "MODEL=${MODELS[$((TASK / ${#SEEDS[@]}))]}",
        "SEED=${SEEDS[$((TASK % ${#SEEDS[@]}))]}",
        'echo "# task $TASK: $MODEL seed $SEED"',
        "# LAUNCH_DRY_RUN=1: print the task's commands instead of running them",
        f'{shlex.quote(python)} benchmark/paper/launch_paper.py --target node --sizes "$MODEL" --seeds "$SEED" '
        f'{shlex.join(flags)} ${{LAUNCH_DRY_RUN:+--dry_run}}',
        "",
    ])


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


def is_done(output_dir: str) -> bool:
    return os.path.exists(os.path.join(ROOT, output_dir, DONE_MARKER))


def will_resume(stage: Stage) -> bool:
    """Whether the stage continues an interrupted run: --resume and a saved state (the stage then cuts its own
    metrics.jsonl back to that state)."""
    checkpoints = os.path.join(ROOT, stage.output_dir, "checkpoints")
    return "--resume" in stage.args and os.path.isdir(checkpoints) and any(
        n.startswith("update_") and not n.endswith(".tmp") for n in os.listdir(checkpoints))


def set_aside_stale_metrics(stage: Stage) -> None:
    """The stages append to metrics.jsonl: an interrupted attempt's lines would mix with the new run's curves."""
    path = os.path.join(ROOT, stage.output_dir, "metrics.jsonl")
    if os.path.exists(path) and not will_resume(stage):
        os.replace(path, f"{path}.interrupted.{int(time.time())}")
        print(f"# moved the metrics of an interrupted attempt aside: {path}.interrupted.*", flush=True)


def run_plan(commands: list[tuple[str, Stage, list[str]]], force: bool = False) -> None:
    """Run the commands one after the other from the repository root; stop at the first failure."""
    for label, stage, argv in commands:
        if not force and is_done(stage.output_dir):
            print(f"# skip {label} {stage.name}: {stage.output_dir}/{DONE_MARKER} exists", flush=True)
            continue
        set_aside_stale_metrics(stage)
        print(f"\n# {label}: {stage.name}\n{shlex.join(argv)}", flush=True)
        start = time.time()
        code = subprocess.run(argv, cwd=ROOT).returncode
        if code:
            raise SystemExit(f"{label} {stage.name} failed with exit code {code}; stopping (finished stages are "
                             f"skipped when you launch again)")
        with open(os.path.join(ROOT, stage.output_dir, DONE_MARKER), "w") as f:
            json.dump({"command": argv, "seconds": round(time.time() - start, 1), "finished": time.time()}, f)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--target", choices=TARGETS, default="node", help="where to run (see below)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help=f"model sizes: {', '.join(SIZES)}")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="training seeds")
    p.add_argument("--track", action="store_true", help="pass --track (Weights & Biases) to every stage")
    p.add_argument("--dry_run", action="store_true", help="print every command (or the sbatch script); run nothing")
    p.add_argument("--models_dir", default="models", help="root of the output folders, relative to the repository")
    p.add_argument("--ppo_save_every", type=int, default=None,
                   help="PPO: save a resumable state every N updates and --resume from it; when set, SFT and RM also "
                        "save one every 100 optimizer steps (default: 100 for slurm, else 0 = off). Each stage keeps "
                        "its 2 newest states (--keep_states); a PPO state holds two models and their Adam moments")
    p.add_argument("--force", action="store_true", help="rerun stages that already have a launch_done.json")
    p.add_argument("--partition", default="hopper-prod", help="slurm partition")
    p.add_argument("--sbatch_file", default="slurm/paper.sbatch", help="where the slurm target writes its script")
    p.add_argument("--python", default="python", help="python executable in the printed and run commands")
    p.add_argument("--mixed_precision", choices=("bf16", "fp16", "no"), default="bf16",
                   help="single_gpu: precision of the plain python runs (node and slurm: the accelerate config's bf16)")
    args = p.parse_args(argv)
    for name in args.sizes:
        resolve_size(name)  # fail early, before anything runs
    if args.ppo_save_every is None:
        args.ppo_save_every = 100 if args.target == "slurm" else 0
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.target == "slurm":
        script = slurm_script(args.sizes, args.seeds, args.models_dir, args.track, args.ppo_save_every,
                              args.partition, ROOT, args.python)
        if args.dry_run:
            print(script)
            print("# what each array task runs (its --target node commands):")
            # task id = size index * len(seeds) + seed index, as MODELS[id / n] and SEEDS[id % n] in the script
            for task, (size, seed) in enumerate((s, e) for s in args.sizes for e in args.seeds):
                for label, _, argv in plan("node", [size], [seed], args.models_dir, args.track, args.ppo_save_every):
                    print(f"# task {task} ({label}): {shlex.join(argv)}")
            print(f"# submit: sbatch {args.sbatch_file}")
            return
        path = os.path.join(ROOT, args.sbatch_file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.makedirs(os.path.join(ROOT, "slurm", "logs"), exist_ok=True)
        with open(path, "w") as f:
            f.write(script)
        print(f"wrote {path}")
        subprocess.run(["sbatch", path], cwd=ROOT, check=True)
        return
    commands = plan(args.target, args.sizes, args.seeds, args.models_dir, args.track, args.ppo_save_every,
                    args.python, args.mixed_precision)
    if args.target == "single_gpu" and any(resolve_size(s).key != "1b" for s in args.sizes):
        print("# note: beyond 1B, one 80 GB GPU cannot hold full fine-tuning (and PPO trains two models); "
              "expect out-of-memory without more offloading", file=sys.stderr)
    if args.dry_run:
        current = None
        for label, stage, argv in commands:
            if label != current:
                print(f"\n# {label}")
                current = label
            print(shlex.join(argv))
        return
    run_plan(commands, args.force)


if __name__ == "__main__":
    main()
