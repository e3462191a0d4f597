"""A new user's mistakes, in every stage: each ends in a one-line error naming the flag, file or row before any output
is written, or in a clearly logged choice; none in a silent wrong result (README "Faults and bad input")."""

import json
import os
import re

import pytest

import ppo_tldr as P
import reward_tldr as R
import sft_tldr as S
from conftest import comparison_rows, sft_rows, write_jsonl
from test_ppo_tldr import make_chain, reset_accelerate

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
RUN_FILES = ("run_info.json", "metrics.jsonl")


@pytest.fixture(scope="module")
def chain(tiny_model, tmp_path_factory):
    """(SFT folder, RM folder) as sft_tldr.py and reward_tldr.py write them."""
    return make_chain(tiny_model, str(tmp_path_factory.mktemp("chain")), reward_bias=0.25)


@pytest.fixture(scope="module")
def cmp_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cmp"))
    write_jsonl(os.path.join(d, "train.jsonl"), comparison_rows(48, 10))
    write_jsonl(os.path.join(d, "validation.jsonl"), comparison_rows(8, 20, "validation"))
    return d


def stage_args(stage: str, chain, sft_data, cmp_data, out: str, **kw):
    """Tiny settings of each stage; `kw` overrides them."""
    if stage == "sft":
        base = dict(base_model=chain[0], dataset=sft_data, query_length=64, response_length=12, batch_size=8,
                    local_micro_batch_size=4, total_episodes=16, max_eval_samples=2, eval_splits=("validation",))
        return S, S.Args(output_dir=out, **{**base, **kw})
    if stage == "rm":
        base = dict(sft_model_path=chain[0], dataset=cmp_data, sft_dataset=sft_data, query_length=64,
                    response_length=12, batch_size=8, local_micro_batch_size=4, total_episodes=16,
                    max_eval_samples=4, normalization_samples=4)
        return R, R.Args(output_dir=out, **{**base, **kw})
    base = dict(sft_model_path=chain[0], reward_model_path=chain[1], dataset=sft_data, query_length=64,
                response_length=12, batch_size=8, local_micro_batch_size=4, local_rollout_forward_batch_size=4,
                total_episodes=16, validation_probe_size=0, sample_every=0, run_eval=False)
    return P, P.Args(output_dir=out, **{**base, **kw})


def run_stage(stage: str, chain, sft_data, cmp_data, out: str, **kw):
    module, args = stage_args(stage, chain, sft_data, cmp_data, out, **kw)
    reset_accelerate()
    try:
        return module.main(args)
    finally:
        reset_accelerate()


def refused(stage, chain, sft_data, cmp_data, out, match: str, **kw) -> str:
    """Run the stage, expect a ValueError matching `match` and no run files left behind; returns the message."""
    with pytest.raises(ValueError, match=match) as e:
        run_stage(stage, chain, sft_data, cmp_data, out, **kw)
    assert "\n" not in str(e.value)
    left = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    assert not left, f"a failed start left {left} in {out}"
    return str(e.value)


STAGES = ("sft", "rm", "ppo")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("flag, value, match", [
    ("batch_size", 0, "--batch_size 0: must be positive"),
    ("local_micro_batch_size", -2, "--local_micro_batch_size -2: must be positive"),
    ("response_length", 0, "--response_length 0: must be positive"),
    ("learning_rate", -1e-3, "--learning_rate -0.001: must be 0 or more"),
    ("total_episodes", 20, re.escape("--total_episodes 20 is not a multiple of --batch_size 8 (the remainder would "
                                     "be dropped); pass 16 or 24")),
])
def test_bad_flags_are_one_line_errors_before_any_output(stage, flag, value, match, chain, sft_data, cmp_data,
                                                         tmp_path):
    refused(stage, chain, sft_data, cmp_data, str(tmp_path / "out"), match, **{flag: value})


@pytest.mark.parametrize("stage, flag, role", [
    ("ppo", "sft_model_path", "rm"),  # the reward model as the policy: a random LM head for untied models
    ("ppo", "reward_model_path", "sft"),
    ("sft", "base_model", "rm"),
    ("rm", "sft_model_path", "two_labels"),
])
def test_a_model_folder_is_checked_for_its_role(stage, flag, role, chain, sft_data, cmp_data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = {"sft": chain[0], "rm": chain[1]}.get(role)
    if role == "two_labels":  # a classifier that is no reward model
        folder = str(tmp_path / "cls")
        AutoModelForSequenceClassification.from_pretrained(chain[0], num_labels=2).save_pretrained(folder)
        AutoTokenizer.from_pretrained(chain[0]).save_pretrained(folder)
    expected = {"rm": "a reward model", "sft": "a causal LM", "two_labels": "a sequence classifier with 2 labels"}[role]
    refused(stage, chain, sft_data, cmp_data, str(tmp_path / "out"),
            f"--{flag} {re.escape(folder)}: holds {expected}", **{flag: folder})


def test_a_missing_weight_is_refused_at_load(tmp_path):
    """An untied LM head (Pythia, GPT-NeoX) loaded from a reward-model folder would be random; transformers only says
    so in its load report."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path / "lm"))
    AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "lm"), num_labels=1).save_pretrained(
        str(tmp_path / "rm"))
    with pytest.raises(ValueError, match=r"--sft_model_path .*/rm: 1 weights missing \(lm_head.weight\)"):
        P.load_checked(AutoModelForCausalLM, str(tmp_path / "rm"), "--sft_model_path")
    with pytest.raises(ValueError, match=r"1 weights missing \(score.weight\)"):  # no head is new by design here
        P.load_checked(AutoModelForSequenceClassification, str(tmp_path / "lm"), "--reward_model_path", num_labels=1)
    model, _ = R.load_checked(AutoModelForSequenceClassification, str(tmp_path / "lm"), "--sft_model_path",
                              new_ok=("score.",), num_labels=1)  # the RM stage's new head
    assert model.score.weight.shape == (1, 16)


@pytest.mark.parametrize("stage", STAGES)
def test_model_paths_that_are_no_model_folder_are_named(stage, chain, sft_data, cmp_data, tmp_path, monkeypatch):
    import huggingface_hub

    flag = "base_model" if stage == "sft" else "sft_model_path"
    out = str(tmp_path / "out")
    missing = str(tmp_path / "no" / "such" / "folder")
    refused(stage, chain, sft_data, cmp_data, out, "no such folder", **{flag: missing})
    # a relative folder with a typo looks like a hub name: offline it is looked up in the cache only ...
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused(stage, chain, sft_data, cmp_data, out, "runs/sft_typo: neither a local folder nor in the hub cache",
            **{flag: "runs/sft_typo"})
    # ... and online with one request, not the download client's retries

    def unreachable(*a, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    refused(stage, chain, sft_data, cmp_data, out, r"runs/sft_typo: neither a local folder nor reachable on the hub "
            r"\(ConnectionError", **{flag: "runs/sft_typo"})
    # a folder without tokenizer files, and one whose final save failed (config.json and a 0-byte model)
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes(open(os.path.join(chain[0], name), "rb").read())
    refused(stage, chain, sft_data, cmp_data, out, "no tokenizer files", **{flag: str(no_tok)})
    (no_tok / "tokenizer.json").write_bytes(open(os.path.join(chain[0], "tokenizer.json"), "rb").read())
    (no_tok / "model.safetensors").write_bytes(b"")
    refused(stage, chain, sft_data, cmp_data, out, r"model.safetensors has 0 bytes \(the save did not finish\)",
            **{flag: str(no_tok)})


def test_a_truncated_or_missing_weights_file_is_named(chain, tmp_path):
    import shutil

    folder = str(tmp_path / "m")
    shutil.copytree(chain[0], folder)
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 1)
    with pytest.raises(ValueError, match=r"--sft_model_path .*model.safetensors has \d+ bytes, its header needs \d+ "
                                         r"\(truncated\)"):
        P.check_model_source(folder, "--sft_model_path", ("causal_lm",))
    os.remove(weights)
    with pytest.raises(ValueError, match="no model weights"):
        P.check_model_source(folder, "--sft_model_path", ("causal_lm",))


@pytest.mark.parametrize("stage", STAGES)
def test_bad_dataset_files_are_named(stage, chain, sft_data, cmp_data, tmp_path, monkeypatch):
    import huggingface_hub

    out = str(tmp_path / "out")
    data = tmp_path / "data"
    rows = sft_rows(8, 1) if stage != "rm" else comparison_rows(8, 1)
    write_jsonl(str(data / "validation.jsonl"), rows)
    write_jsonl(str(data / "test.jsonl"), rows)
    (data / "train.jsonl").write_text("")
    refused(stage, chain, sft_data, cmp_data, out, re.escape(f"{data}/train.jsonl: the file is empty"),
            dataset=str(data))
    lines = [json.dumps(r) for r in rows]
    (data / "train.jsonl").write_text("\n".join(lines[:2] + [lines[2][:40]]))  # a copy cut short
    refused(stage, chain, sft_data, cmp_data, out, re.escape(f"{data}/train.jsonl: line 3 is not valid JSON"),
            dataset=str(data))
    refused(stage, chain, sft_data, cmp_data, out, "is a file; pass the folder that holds one file per split",
            dataset=str(data / "train.jsonl"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused(stage, chain, sft_data, cmp_data, out, "--dataset dat/tldr: neither a local folder nor in the hub cache",
            dataset="dat/tldr")


def test_the_whole_split_is_checked_before_total_episodes_cuts_it(chain, sft_data, cmp_data, tmp_path):
    """A bad row outside the rows a smoke run uses fails the smoke run, naming its row in the file."""
    data = tmp_path / "sft"
    rows = sft_rows(64, 1)
    rows[41]["summary"] = None
    write_jsonl(str(data / "train.jsonl"), rows)
    write_jsonl(str(data / "validation.jsonl"), sft_rows(4, 2))
    refused("sft", chain, sft_data, cmp_data, str(tmp_path / "o1"), r"split 'train' row 41 \(id='t1_41'\)",
            dataset=str(data), total_episodes=8)
    rows[41]["summary"], rows[50]["id"] = "ok.", rows[3]["id"]
    write_jsonl(str(data / "train.jsonl"), rows)
    refused("sft", chain, sft_data, cmp_data, str(tmp_path / "o2"), r"id='t1_3' in rows \[3, 50\]",
            dataset=str(data), total_episodes=8)
    # the RM stage: a malformed comparison, and a bad evaluation row beyond --max_eval_samples
    cmp = tmp_path / "cmp"
    rows = comparison_rows(48, 10)
    rows[37]["choice"] = 2
    write_jsonl(str(cmp / "train.jsonl"), rows)
    write_jsonl(str(cmp / "validation.jsonl"), comparison_rows(8, 20, "validation"))
    refused("rm", chain, sft_data, cmp_data, str(tmp_path / "o3"), r"split 'train' row 37 .*choice` must be 0 or 1",
            dataset=str(cmp), total_episodes=8)
    validation = comparison_rows(8, 20, "validation")
    validation[6]["summaries"] = validation[6]["summaries"][:1]
    write_jsonl(str(cmp / "train.jsonl"), comparison_rows(48, 10))
    write_jsonl(str(cmp / "validation.jsonl"), validation)
    refused("rm", chain, sft_data, cmp_data, str(tmp_path / "o4"), r"split 'validation' row 6 .*two entries",
            dataset=str(cmp), max_eval_samples=2)


def test_an_unwritable_output_folder_fails_at_start(chain, sft_data, cmp_data, tmp_path):
    (tmp_path / "a_file").write_text("")
    for stage in STAGES:
        refused(stage, chain, sft_data, cmp_data, str(tmp_path / "a_file" / "out"), "--output_dir .*: not writable")


@pytest.mark.parametrize("stage", STAGES)
def test_a_fresh_start_never_appends_to_an_older_run(stage, chain, sft_data, cmp_data, tmp_path, capsys):
    """The older run's files are moved to previous_runs/<n>/, with a message; its records never mix with ours."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"samples": 0, "older_run": 1}) + "\n")
    (out / "run_info.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not a stage output: left alone
    kw = {"run_eval": False} if stage != "rm" else {"normalization_samples": 0, "run_eval": False}
    run_stage(stage, chain, sft_data, cmp_data, str(out), **kw)
    printed = capsys.readouterr().out
    assert f"{out} holds an earlier run; this fresh start moved its 2 files (metrics.jsonl, run_info.json) to " \
           f"{out}/previous_runs/1" in printed
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records and not any("older_run" in r for r in records)
    assert "older_run" in open(out / "previous_runs" / "1" / "metrics.jsonl").read()
    assert (out / "notes.txt").read_text() == "mine"
    assert os.path.exists(out / "model.safetensors") and not os.path.exists(out / "final_model.tmp")


def test_a_resume_without_a_usable_state_says_so_and_starts_fresh(chain, sft_data, cmp_data, tmp_path, capsys):
    out = tmp_path / "out"
    broken = out / "checkpoints" / "update_000002"
    broken.mkdir(parents=True)  # a state whose save never finished: no manifest
    (out / "metrics.jsonl").write_text(json.dumps({"samples": 0, "older_run": 1}) + "\n")
    run_stage("sft", chain, sft_data, cmp_data, str(out), run_eval=False, resume=True)
    printed = capsys.readouterr().out
    assert "WARNING: --resume found no usable state in" in printed and "(1 skipped); starting a FRESH run" in printed
    assert "older_run" not in open(out / "metrics.jsonl").read()
    assert os.path.isdir(out / "previous_runs" / "1" / "checkpoints" / "update_000002")


def test_a_failed_final_save_leaves_no_model_the_next_stage_would_load(chain, sft_data, cmp_data, tmp_path,
                                                                       monkeypatch):
    """The weights are written into final_model.tmp and moved into place only when complete."""
    import transformers.modeling_utils

    def full_disk(tensors, filename, *args, **kwargs):
        open(filename, "wb").close()  # what a full disk leaves: an empty file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = str(tmp_path / "sft")
    with pytest.raises(OSError, match="No space left"):
        run_stage("sft", chain, sft_data, cmp_data, out, run_eval=False)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "config.json"))
    with pytest.raises(ValueError, match="no config.json"):
        R.check_model_source(out, "--sft_model_path", ("causal_lm", "reward_model"))


def test_the_manifest_catches_a_flipped_byte_in_a_large_file(tmp_path, monkeypatch):
    """Files above MANIFEST_HASH_LIMIT get a CRC-32: a flipped byte that keeps the size (and the file parseable) is
    caught on resume."""

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            with open(os.path.join(folder, "model.safetensors"), "wb") as f:
                f.write(bytes(range(256)) * 64)  # 16 KiB

    monkeypatch.setattr(S, "MANIFEST_HASH_LIMIT", 4096)
    folder = str(tmp_path / "checkpoints" / "update_000001")
    S.save_state_atomic(OneProcess(), folder, {"update": 1}, keep=2)
    assert S.state_problem(folder) is None
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(10_000)
        byte = f.read(1)
        f.seek(10_000)
        f.write(bytes([byte[0] ^ 1]))
    assert S.state_problem(folder) == "model.safetensors does not match its CRC-32 in the manifest"


def test_paper_settings_are_whole_batches():
    """The PPO default (the paper's 1M episodes) in whole batches of 512: 1953 updates, as the reference ran."""
    args = P.Args(sft_model_path="s", reward_model_path="r")
    assert args.total_episodes % args.batch_size == 0 and P.derive(args, 1).num_updates == 1953
    with pytest.raises(ValueError, match="pass 999936 or 1000448"):
        P.derive(P.Args(sft_model_path="s", reward_model_path="r", total_episodes=1_000_000), 1)


def test_the_offline_pipeline_passes_whole_batches():
    """benchmark/offline/offline_pipeline.py's profiles pass the --total_episodes check of every stage (the RM's
    episodes are its mixed pairs rounded down to whole batches)."""
    import offline_pipeline

    for profile in offline_pipeline.PROFILES:
        a = offline_pipeline.parse_args(["--profile", profile])
        for episodes, batch in ((a.sft_episodes, a.sft_batch), (a.ppo_episodes, a.ppo_batch),
                                (a.rm_synthetic_pairs // a.rm_batch * a.rm_batch, a.rm_batch)):
            S.check_episodes(episodes, batch)
    with pytest.raises(ValueError, match="pass 96 or 112"):
        S.check_episodes(100, 16)
