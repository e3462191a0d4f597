"""Tests of the SFT stage: data processing, loss, EOS handling, saving, and multi-process equivalence."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import sft_tldr as sft
from conftest import ROOT, build_model, build_tokenizer, sft_rows, write_jsonl


def small_args(model, data, out, **kw):
    base = dict(base_model=model, dataset=data, output_dir=out, query_length=96, response_length=16, batch_size=4,
                local_eval_batch_size=4, learning_rate=1e-3)
    base.update(kw)
    return sft.Args(**base)


def test_query_format_is_the_papers():
    q = sft.format_query("tifu", "My title", "Line one.\nLine two.")
    assert q == "SUBREDDIT: r/tifu\n\nTITLE: My title\n\nPOST: Line one.\nLine two.\n\nTL;DR:"


def test_truncation_cuts_at_the_last_newline_and_pads_to_exact_length(tiny_model):
    tok = sft.load_tokenizer(tiny_model)
    paragraphs = ["my cat and my dog went to the party with my sister"] * 12
    row = {"id": "x", "subreddit": "tifu", "title": "a title", "post": "\n".join(paragraphs)}
    full = tok.encode(sft.format_query(row["subreddit"], row["title"], row["post"]))
    limit = len(full) - 20
    ids = sft.truncated_query_tokens(tok, row, limit)
    assert len(ids) <= limit
    text = tok.decode(ids)
    kept_post = text.split("POST: ")[1].rsplit("\n\nTL;DR:", 1)[0]
    # the post was cut just before a newline: whole paragraphs only, and the TL;DR: suffix survives
    assert kept_post == "\n".join(paragraphs[: kept_post.count("\n") + 1])
    assert text.endswith("TL;DR:")
    padded = sft.left_pad(ids, limit, tok.pad_token_id)
    assert len(padded) == limit and padded[-len(ids):] == ids
    assert set(padded[: limit - len(ids)]) <= {tok.pad_token_id}


def test_truncation_without_newline_drops_characters(tiny_model):
    tok = sft.load_tokenizer(tiny_model)
    row = {"id": "x", "subreddit": "tifu", "title": "t", "post": "my cat went to work " * 20}
    limit = len(tok.encode(sft.format_query("tifu", "t", row["post"]))) - 5
    ids = sft.truncated_query_tokens(tok, row, limit)
    assert len(ids) <= limit and tok.decode(ids).endswith("\n\nTL;DR:")
    # one character at a time: the longest prefix of the post that fits
    kept = tok.decode(ids).split("POST: ")[1][: -len("\n\nTL;DR:")]
    assert row["post"].startswith(kept)
    longer = row["post"][: len(kept) + 1]
    assert len(tok.encode(sft.format_query("tifu", "t", longer))) > limit


def test_truncation_that_cannot_fit_names_the_row(tiny_model):
    tok = sft.load_tokenizer(tiny_model)
    row = {"id": "row-42", "subreddit": "tifu", "title": "my cat " * 50, "post": "short"}
    with pytest.raises(ValueError, match="row-42"):
        sft.truncated_query_tokens(tok, row, 32)


def test_pad_token_is_added_and_distinct_from_eos(tmp_path, tiny_model):
    tok = sft.load_tokenizer(tiny_model)  # the fixture tokenizer has no pad token
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    # a tokenizer that uses EOS as pad gets a new pad too
    from transformers import AutoTokenizer

    t2 = AutoTokenizer.from_pretrained(tiny_model)
    t2.pad_token = t2.eos_token
    t2.save_pretrained(tmp_path)
    assert sft.load_tokenizer(str(tmp_path)).pad_token_id != t2.eos_token_id


def test_embeddings_resized_only_without_room(tmp_path):
    build_tokenizer(str(tmp_path))
    tok = sft.load_tokenizer(str(tmp_path))
    roomy = build_model(str(tmp_path), vocab_rows=512)
    sft.fit_embeddings(roomy, tok)
    assert roomy.get_input_embeddings().weight.shape[0] == 512
    tight = build_model(str(tmp_path), vocab_rows=len(tok) - 1)
    sft.fit_embeddings(tight, tok)
    assert tight.get_input_embeddings().weight.shape[0] == len(tok)
    assert tight.config.pad_token_id == tok.pad_token_id


def test_reference_response_has_leading_space_and_eos(tiny_model, sft_data):
    tok = sft.load_tokenizer(tiny_model)
    ds = sft.load_splits(sft_data)
    out, _ = sft.tokenize_sft(ds, tok, small_args(tiny_model, sft_data, "unused"))
    row = out["train"][0]
    n = row["reference_response_token_len"]
    ref = row["reference_response_token"]
    assert ref[n - 1] == tok.eos_token_id and set(ref[n:]) <= {tok.pad_token_id}
    assert tok.decode(ref[: n - 1]) == " " + row["summary"]
    # the training sequence is the unpadded query followed by the response, right-padded
    q = [t for t in row["query_token"] if t != tok.pad_token_id]
    seq = row["query_reference_response_token"]
    assert seq[: len(q) + n] == q + ref[:n]
    assert len(seq) == 96 + 16 and len(row["query_token"]) == 96


def test_overlong_summary_is_truncated_and_counted(tiny_model, tmp_path, capsys):
    rows = sft_rows(8, 5)
    rows[3]["summary"] = "my cat went to the party " * 10
    for split in ("train", "validation", "test"):
        write_jsonl(str(tmp_path / "d" / f"{split}.jsonl"), rows)
    tok = sft.load_tokenizer(tiny_model)
    out, _ = sft.tokenize_sft(sft.load_splits(str(tmp_path / "d")), tok, small_args(tiny_model, "", ""))
    assert sum(out["train"]["reference_response_truncated"]) == 1
    assert len(out["train"][3]["reference_response_token"]) == 16


def test_loss_ignores_padding_and_keeps_eos(tiny_model):
    from transformers import AutoModelForCausalLM

    tok = sft.load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    ids = torch.tensor([tok.encode("my cat went to work") + [eos]])
    padded = torch.cat([ids, torch.full((1, 7), pad)], 1)
    loss = sft.sft_loss(sft.forward(model, ids, pad).logits, ids, pad)
    loss_padded = sft.sft_loss(sft.forward(model, padded, pad).logits, padded, pad)
    torch.testing.assert_close(loss, loss_padded)
    # EOS is a target: dropping it changes the loss
    no_eos = ids[:, :-1]
    assert not torch.allclose(loss, sft.sft_loss(sft.forward(model, no_eos, pad).logits, no_eos, pad))


def test_mixed_batch_loss_is_token_mean():
    logits = torch.randn(2, 5, 7)
    ids = torch.tensor([[1, 2, 3, 9, 9], [4, 5, 6, 2, 1]])
    loss = sft.sft_loss(logits, ids, pad_token_id=9)
    nll = -torch.log_softmax(logits, -1)
    terms = [nll[0, 0, 2], nll[0, 1, 3]] + [nll[1, t, ids[1, t + 1]] for t in range(4)]
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_dropout_is_disabled():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.5,
                                       embd_pdrop=0.5, attn_pdrop=0.5)).train()
    ids = torch.randint(0, 50, (2, 8))
    assert not torch.equal(model(ids).logits, model(ids).logits)
    sft.disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)


def eos_loving_model(tiny_model, bias: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[0] = bias  # token 0 is the fixture's EOS
    model.lm_head = head
    return model


def test_eos_can_be_sampled_and_truncation_keeps_the_first(tiny_model):
    tok = sft.load_tokenizer(tiny_model)
    model = eos_loving_model(tiny_model, bias=5.0)
    queries = torch.tensor([sft.left_pad(tok.encode("my cat"), 8, tok.pad_token_id)] * 8)
    torch.manual_seed(0)
    sft.prepare_for_sampling(model)
    responses = sft.generate(model, queries, tok.pad_token_id, sft.sampling_config(16, 1.0))
    assert responses.shape == (8, 16)  # always the full length, never stopped early
    assert (responses == tok.eos_token_id).any()
    post = sft.truncate_response(responses, tok.eos_token_id, tok.pad_token_id)
    for raw, cut in zip(responses, post):
        hits = (raw == tok.eos_token_id).nonzero()
        if len(hits):
            i = hits[0].item()
            assert torch.equal(cut[: i + 1], raw[: i + 1])
            assert (cut[i + 1 :] == tok.pad_token_id).all()
        else:
            assert torch.equal(cut, raw)


def test_stopping_at_eos_gives_the_same_truncated_samples(tiny_model):
    """--stop_generation_at_eos ends a batch once every row has an EOS: the texts after truncation are the ones the
    reference's full-length sampling gives from the same random state, in fewer decoding steps."""
    tok = sft.load_tokenizer(tiny_model)
    model = eos_loving_model(tiny_model, bias=6.0)
    queries = torch.tensor([sft.left_pad(tok.encode("my cat"), 8, tok.pad_token_id)] * 8)
    sft.prepare_for_sampling(model)
    torch.manual_seed(3)
    full = sft.generate(model, queries, tok.pad_token_id, sft.sampling_config(32, 1.0))
    config = sft.sampling_config(32, 1.0)
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(3)
    stopped = sft.generate(model, queries, tok.pad_token_id, config)
    assert stopped.shape[1] < full.shape[1] == 32  # every row ended early
    cut_full = sft.truncate_response(full, tok.eos_token_id, tok.pad_token_id)
    cut_stopped = sft.truncate_response(stopped, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(cut_full[:, : stopped.shape[1]], cut_stopped)
    assert (cut_full[:, stopped.shape[1] :] == tok.pad_token_id).all()


def test_the_transformers_min_length_pitfall_is_real(tiny_model):
    """The reason for prepare_for_sampling: with the model's EOS id and min_new_tokens == max_new_tokens,
    EOS is never sampled. If this starts failing, transformers changed and the workaround can be revisited."""
    from transformers import GenerationConfig

    tok = sft.load_tokenizer(tiny_model)
    model = eos_loving_model(tiny_model, bias=5.0)
    queries = torch.tensor([sft.left_pad(tok.encode("my cat"), 8, tok.pad_token_id)] * 8)
    torch.manual_seed(0)
    cfg = GenerationConfig(max_new_tokens=16, min_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
                           do_sample=True, eos_token_id=None, pad_token_id=tok.pad_token_id)
    out = model.generate(input_ids=queries, attention_mask=queries != tok.pad_token_id, generation_config=cfg)
    assert not (out[:, 8:] == tok.eos_token_id).any()


def test_truncate_response_hand_worked():
    r = torch.tensor([[5, 0, 6, 0], [5, 6, 7, 0], [5, 6, 7, 8]])
    out = sft.truncate_response(r, eos_token_id=0, pad_token_id=9)
    assert out.tolist() == [[5, 0, 9, 9], [5, 6, 7, 0], [5, 6, 7, 8]]


def test_left_padding_does_not_change_logits(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    tok = sft.load_tokenizer(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ids = torch.tensor([tok.encode("my cat went to work")])
    padded = torch.tensor([sft.left_pad(ids[0].tolist(), ids.shape[1] + 5, tok.pad_token_id)])
    a = sft.forward(model, ids, tok.pad_token_id).logits
    b = sft.forward(model, padded, tok.pad_token_id).logits[:, 5:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_main_trains_saves_and_reloads_identically(tiny_model, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "run")
    model = sft.main(small_args(tiny_model, sft_data, out, max_eval_samples=4))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    losses = [r["train/sft/loss"] for r in records if "train/sft/loss" in r]
    assert len(losses) == 16 and losses[-1] < losses[0]  # 64 rows / batch 4, lr 1e-3: the loss falls
    evals = {k for r in records for k in r}
    for split in ("validation", "test"):
        assert {f"{split}/sft/loss", f"{split}/sft/rouge/rougeL"} <= evals
        assert os.path.exists(os.path.join(out, f"{split}_table.csv"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id
    ids = torch.tensor([tok.encode("my cat went to work")])
    torch.testing.assert_close(model.eval()(ids).logits, reloaded(ids).logits, rtol=0, atol=0)
    assert reloaded.generation_config.eos_token_id == tok.eos_token_id


def test_preprocess_only_saves_the_tokenized_dataset(tiny_model, sft_data, tmp_path):
    import datasets

    out = str(tmp_path / "pre")
    sft.main(small_args(tiny_model, sft_data, out, preprocess_only=True))
    ds = datasets.load_from_disk(os.path.join(out, "dataset"))
    cols = set(ds["train"].column_names)
    assert {"id", "subreddit", "title", "post", "summary", "query_token", "reference_response_token",
            "query_reference_response_token"} <= cols
    assert os.path.exists(os.path.join(out, "tokenizer_config.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_missing_column_is_a_clear_error(tiny_model, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "summary"} for r in sft_rows(4, 1)]
    for split in ("train", "validation", "test"):
        write_jsonl(str(tmp_path / f"{split}.jsonl"), rows)
    with pytest.raises(ValueError, match="summary"):
        sft.main(small_args(tiny_model, str(tmp_path), str(tmp_path / "out")))


def test_help_renders_and_every_field_is_read():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "sft_tldr.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--base-model" in res.stdout.replace("_", "-")
    source = open(os.path.join(ROOT, "sft_tldr.py")).read()
    tree = ast.parse(source)
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}
    fields = sft.Args.__dataclass_fields__
    unread = [f for f in fields if f not in read]
    assert unread == [], f"Args fields never read: {unread}"


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_model, sft_data, tmp_path):
    """Same global batch: 1 process x micro 1 x accumulation 2 == 2 processes x micro 1 x accumulation 1."""
    common = ["--base_model", tiny_model, "--dataset", sft_data, "--query_length", "96", "--response_length", "16",
              "--batch_size", "2", "--total_episodes", "16", "--learning_rate", "1e-3", "--no-run-eval"]
    script = os.path.join(ROOT, "sft_tldr.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}  # gloo even where a GPU exists
    subprocess.run([sys.executable, script, *common, "--output_dir", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=300)
    # a timeout turns a stuck process group into a failure instead of a hung suite
    subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", script, *common,
                    "--output_dir", str(tmp_path / "two")], check=True, env=env, capture_output=True, timeout=300)

    def losses(run):
        return [json.loads(line)["train/sft/loss"] for line in open(tmp_path / run / "metrics.jsonl")
                if "train/sft/loss" in line]

    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 8
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)


def test_zero_episodes_evaluates_the_untrained_model(tiny_model, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "base")
    model = sft.main(small_args(tiny_model, sft_data, out, total_episodes=0, max_eval_samples=4,
                                eval_splits=("validation",)))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert not any("train/sft/loss" in r for r in records)
    assert any("validation/sft/rouge/rougeL" in r for r in records)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model.eval()(ids).logits, base(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Faults: preemption signals and divergence
# ---------------------------------------------------------------------------------------------------------


def without_wall_clock(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in open(path)]


def run_until_sigterm(script, argv, out, record_key):
    """Start `script` as a subprocess, send SIGTERM once metrics.jsonl holds a `record_key` record, and return
    (exit code, output)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
    while not (os.path.exists(metrics) and record_key in open(metrics).read()) and proc.poll() is None:
        assert time.time() < deadline, "the run logged no step"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


def test_sigterm_saves_a_state_and_the_resumed_run_equals_an_uninterrupted_one(tiny_model, sft_data, tmp_path,
                                                                               one_thread):
    from safetensors.torch import load_file

    sft.main(small_args(tiny_model, sft_data, str(tmp_path / "full"), run_eval=False))
    out = str(tmp_path / "stopped")
    argv = ["--base_model", tiny_model, "--dataset", sft_data, "--output_dir", out, "--query_length", "96",
            "--response_length", "16", "--batch_size", "4", "--local_eval_batch_size", "4", "--learning_rate", "1e-3",
            "--no-run-eval"]
    code, output = run_until_sigterm("sft_tldr.py", argv, out, "train/sft/loss")
    assert code == 143, output[-3000:]
    states = os.listdir(os.path.join(out, "checkpoints"))
    assert len(states) == 1 and states[0] < "update_000016", states  # 64 rows / batch 4: stopped before the end
    assert f"received SIGTERM: saved the state of optimizer step {int(states[0][-6:])}" in output
    sft.main(small_args(tiny_model, sft_data, out, run_eval=False, resume=True))
    full, resumed = without_wall_clock(tmp_path / "full" / "metrics.jsonl"), without_wall_clock(f"{out}/metrics.jsonl")
    assert len([r for r in full if "train/sft/loss" in r]) == 16 and full == resumed
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_state(tiny_model, sft_data, tmp_path, monkeypatch):
    original, calls = sft.sft_loss, []

    def poisoned(*args):
        calls.append(1)
        return original(*args) * (float("nan") if len(calls) > 12 else 1.0)  # from the 1st micro-batch of step 4

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"train/sft/loss diverged at optimizer step 4 \(micro-batch 12\): "
                                                 r"1 NaN and 0 infinite values") as info:
        sft.main(small_args(tiny_model, sft_data, out, run_eval=False, save_every=2))
    # the periodic state of step 2, and the weights after step 3 (untouched by the NaN step) saved when it diverged
    root = os.path.join(out, "checkpoints")
    assert info.value.args[0].endswith(f"Last good state: {os.path.join(root, 'update_000003')}")
    assert sorted(os.listdir(root)) == ["update_000002", "update_000003"]
    assert sft.state_problem(os.path.join(root, "update_000003")) is None
    assert json.load(open(os.path.join(root, "update_000003", "trainer_state.json")))["update"] == 3
    monkeypatch.setattr(sft, "sft_loss", original)  # the run resumes from there and finishes
    sft.main(small_args(tiny_model, sft_data, out, run_eval=False, save_every=2, resume=True))
    assert os.path.exists(os.path.join(out, "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# Bad input: each class is an error naming the file or row, or a counted skip
# ---------------------------------------------------------------------------------------------------------


def tokenize_rows(tiny_model, tmp_path, rows):
    write_jsonl(str(tmp_path / "d" / "train.jsonl"), rows)
    tok = sft.load_tokenizer(tiny_model)
    return sft.tokenize_sft(sft.load_splits(str(tmp_path / "d")), tok, small_args(tiny_model, "", ""))


@pytest.mark.parametrize("field, value, shown", [
    ("summary", None, "'summary': None"), ("post", ["a", "list"], "'post': ['a', 'list']"),
    ("title", 7, "'title': 7"), ("id", None, "'id': None"),
])
def test_a_field_of_the_wrong_type_is_an_error_naming_the_row(tiny_model, tmp_path, field, value, shown):
    rows = sft_rows(6, 1)
    rows[4][field] = value
    with pytest.raises(ValueError, match=r"split 'train' row 4 \(id=.*\): id must be a string or an integer and "
                                         r"subreddit, title, post, summary strings; got .*" + re.escape(shown)):
        tokenize_rows(tiny_model, tmp_path, rows)


def test_empty_posts_and_summaries_are_counted_skips(tiny_model, sft_data, tmp_path):
    rows = sft_rows(8, 1)
    rows[1]["post"], rows[2]["summary"], rows[5]["summary"] = " \n ", "", "  "
    out, skipped = tokenize_rows(tiny_model, tmp_path, rows)
    assert skipped == {"train": {"empty_post": 1, "empty_summary": 2}}
    assert out["train"]["id"] == [r["id"] for i, r in enumerate(rows) if i not in (1, 2, 5)]
    # the run reports the counts in metrics.jsonl
    for split in ("validation", "test"):
        write_jsonl(str(tmp_path / "d" / f"{split}.jsonl"), sft_rows(2, 9))
    out_dir = str(tmp_path / "run")
    sft.main(small_args(tiny_model, str(tmp_path / "d"), out_dir, run_eval=False))  # 5 rows: one step
    first = json.loads(open(os.path.join(out_dir, "metrics.jsonl")).readline())
    assert first["data/train/rows"] == 5 and first["data/train/skipped/empty_post"] == 1
    assert first["data/train/skipped/empty_summary"] == 2


def test_duplicate_ids_are_an_error_naming_the_rows(tiny_model, tmp_path):
    rows = sft_rows(6, 1)
    rows[4]["id"] = rows[1]["id"]
    with pytest.raises(ValueError, match=re.escape(f"split 'train': 1 ids repeat, e.g. id={rows[1]['id']!r} in "
                                                   f"rows [1, 4]")):
        tokenize_rows(tiny_model, tmp_path, rows)


def test_a_file_that_is_not_utf8_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(sft_rows(2, 1)[0]).encode() + b'\n{"id": "x", "post": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 is not valid UTF-8 (invalid continuation byte")):
        sft.load_splits(str(tmp_path))


def test_a_missing_split_is_an_error_naming_the_dataset(tiny_model, tmp_path):
    write_jsonl(str(tmp_path / "validation.jsonl"), sft_rows(4, 1))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} has no 'train' split (found ['validation'])")):
        sft.main(small_args(tiny_model, str(tmp_path), str(tmp_path / "out")))
    write_jsonl(str(tmp_path / "train.jsonl"), sft_rows(4, 1))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} lacks evaluation splits ['test']")):
        sft.main(small_args(tiny_model, str(tmp_path), str(tmp_path / "out")))


def test_resume_skips_a_corrupt_state_after_a_crash(tiny_model, sft_data, tmp_path, monkeypatch, capsys):
    """A crash at step 6 leaves states 2 and 4 (--keep_states 2); state 4 is then truncated on disk. Resume skips it
    with a message, continues from state 2 and ends bit-identical to an uninterrupted run."""
    from safetensors.torch import load_file

    sft.main(small_args(tiny_model, sft_data, str(tmp_path / "full"), run_eval=False))
    original, calls = sft.sft_loss, []

    def crash(*args):
        calls.append(1)
        if len(calls) > 20:  # the 1st micro-batch of step 6
            raise RuntimeError("simulated crash")
        return original(*args)

    out = str(tmp_path / "crashed")
    monkeypatch.setattr(sft, "sft_loss", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sft.main(small_args(tiny_model, sft_data, out, run_eval=False, save_every=2, keep_states=2))
    monkeypatch.setattr(sft, "sft_loss", original)
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["update_000002", "update_000004"]
    weights = os.path.join(root, "update_000004", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    capsys.readouterr()
    sft.main(small_args(tiny_model, sft_data, out, run_eval=False, save_every=2, keep_states=2, resume=True))
    printed = capsys.readouterr().out
    assert "skipping the state" in printed and "update_000004: model.safetensors has" in printed, printed
    assert "update_000002" in printed
    full, resumed = without_wall_clock(tmp_path / "full" / "metrics.jsonl"), without_wall_clock(f"{out}/metrics.jsonl")
    assert full == resumed
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_default_dataset_layout_loads_as_plain_parquet_files(tiny_model, tmp_path):
    """The default dataset is a repository of parquet files as `push_to_hub` writes them (data/<split>-*.parquet and a
    README declaring them), not a loading script: a local folder laid out like it loads through the call a hub name
    takes, and a run reads it."""
    import datasets

    assert sft.Args().dataset == "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
    repo = tmp_path / "summarize_from_feedback_tldr_3_filtered"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: data/{s}-*\n" for s in ("train", "validation", "test")) + "---\n")
    for split, n, seed in (("train", 16, 1), ("validation", 4, 2), ("test", 4, 3)):
        datasets.Dataset.from_list(sft_rows(n, seed)).to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    ds = sft.load_splits(str(repo))
    assert {s: len(d) for s, d in ds.items()} == {"train": 16, "validation": 4, "test": 4}
    assert ds["validation"][1] == sft_rows(4, 2)[1]
    out = str(tmp_path / "out")
    sft.main(small_args(tiny_model, str(repo), out, max_eval_samples=2, eval_splits=("validation",)))
    assert os.path.exists(os.path.join(out, "validation_table.csv"))
