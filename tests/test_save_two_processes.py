"""The final-model save with two processes: a rank that reaches `save_pretrained` late must not find the temporary
folder gone (FileNotFoundError) or re-create it after the main process has moved its files into place."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import importlib
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

stage = importlib.import_module(sys.argv[2])
model_dir, out = sys.argv[3], sys.argv[4]
accelerator = Accelerator(cpu=True)
model = AutoModelForCausalLM.from_pretrained(model_dir)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
if not accelerator.is_main_process:  # the other rank is still busy when the main process starts saving
    original = model.save_pretrained
    def late_save(*a, **k):
        time.sleep(2.0)
        return original(*a, **k)
    model.save_pretrained = late_save
stage.save_model_atomic(model, tokenizer, out, accelerator)
'''


@pytest.mark.parametrize("stage", ["sft_tldr", "reward_tldr", "ppo_tldr"])
def test_final_save_waits_for_every_rank(stage, tiny_model, tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), ROOT, stage, tiny_model, str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    left = sorted(os.listdir(out))
    assert "final_model.tmp" not in left, left
    assert "config.json" in left and "model.safetensors" in left, left
