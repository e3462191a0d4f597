"""The measurements behind ppo_tldr.py's CPU and bf16 choices (README "Throughput and memory").

Four checks, each printing measured numbers:
  alloc      a fresh 113 MiB tensor (SmolLM2's embedding gradient) against a reused one, with glibc's defaults and
             with `keep_freed_host_memory` (--keep_freed_memory); run in two fresh processes, as the setting is
             process-wide
  attention  forward + backward of one attention layer at the PPO training shape (8 x 253 tokens, 9 query heads
             and 3 key/value heads of 64, left padding): torch's SDPA kernel with a padding mask against eager
             matmuls + softmax, in fp32 and bf16 (`attention_kernel`)
  gradients  one PPO loss (clipped policy loss + 0.1 x clipped value loss, random whitened advantages) on a batch of
             the bench's prompts with sampled responses: the bf16-autocast gradient of policy + value against the
             fp32 one (relative difference, norms) and the size of AdamW's first step from each
  rounding   how far the bf16 copies of the weights, which the matmuls see under autocast, move when the fp32
             master weights move by `steps` Adam steps of the learning rate: changed fraction, and the squared
             movement against the fp32 one
  generation greedy sampling of 16 prompts x 48 tokens under bf16 autocast, entered at every forward (as a prepared
             model's forward does) against one autocast context around the whole generate() (sft_tldr.py's
             evaluation): autocast keeps its bf16 copies of the weights while a context is open, so the second
             casts them once instead of at every decoding step; the tokens must be the same. And fp32 without
             autocast, whose decoding steps (16 rows: small matmuls) need not gain from bf16 as much as training does

    python benchmark/perf/bf16_cpu_checks.py alloc attention                     # no model needed, about 1 min
    python benchmark/perf/bf16_cpu_checks.py gradients rounding   # after `bench_ppo.py --precision fp32,bf16`
    python benchmark/perf/bf16_cpu_checks.py generation --model_dir models/smollm2-135m   # any causal LM folder
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

ALLOC_CODE = """
import sys, time
sys.path.insert(0, {root!r})
import torch, ppo_tldr
if {keep}:
    assert ppo_tldr.keep_freed_host_memory()
def fresh():
    x = torch.zeros(49153, 576); del x
for _ in range(3):
    fresh()
t = time.perf_counter()
for _ in range(10):
    fresh()
fresh_ms = (time.perf_counter() - t) * 100
y = torch.zeros(49153, 576)
t = time.perf_counter()
for _ in range(10):
    y.zero_()
print(fresh_ms, (time.perf_counter() - t) * 100)
"""


def check_alloc() -> dict:
    out = {}
    for keep in (False, True):
        res = subprocess.run([sys.executable, "-c", ALLOC_CODE.format(root=ROOT, keep=keep)], capture_output=True,
                             text=True, check=True)
        fresh_ms, reused_ms = map(float, res.stdout.split()[-2:])
        out["kept" if keep else "default"] = fresh_ms
        setting = "--keep_freed_memory" if keep else "glibc defaults"
        print(f"alloc: fresh 113 MiB zeros {fresh_ms:5.1f} ms with {setting} "
              f"(filling an existing one: {reused_ms:.1f} ms)")
    return out


def attention(impl: str, q, k, v, mask):
    """Masked attention with grouped key/value heads: torch's SDPA kernel, or eager matmuls + an fp32 softmax (what
    transformers' eager implementation does). q (b, h, t, d), k and v (b, kv, t, d), mask (b, 1, t, t) True = keep."""
    import torch
    import torch.nn.functional as F

    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
    return torch.softmax(w, -1, dtype=torch.float32).to(q.dtype) @ v


def attention_layer_ms(impl: str, dtype, repeats: int = 5) -> float:
    """Forward + backward of one layer's attention at the training shape, left-padded like a PPO micro-batch."""
    import torch

    b, heads, kv_heads, t, d = 8, 9, 3, 253, 64
    torch.manual_seed(0)
    q = torch.randn(b, heads, t, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, kv_heads, t, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, kv_heads, t, d, dtype=dtype, requires_grad=True)
    pad = torch.arange(b) % 3  # 0-2 left-padding columns per row, as queries of 199-201 tokens
    key_ok = torch.arange(t)[None, :] >= pad[:, None]  # (b, t)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & key_ok[:, None, None, :]  # (b, 1, t, t)
    mask = mask | torch.eye(t, dtype=torch.bool)[None, None]  # padded rows attend to themselves (no NaN)

    def step():
        attention(impl, q, k, v, mask).float().sum().backward()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e3


def check_attention() -> dict:
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for impl in ("sdpa", "eager"):
            out[f"{name}_{impl}"] = ms = attention_layer_ms(impl, dtype)
            print(f"attention: {name} {impl:5s} {ms:5.1f} ms per layer, forward + backward")
    return out


def flat(tensors) -> "torch.Tensor":
    import torch

    return torch.cat([t.double().flatten() for t in tensors])


def adam_first_step(grad, eps: float):
    """AdamW's first update divided by the learning rate: bias-corrected m / (sqrt(v) + eps) = g / (|g| + eps)."""
    return grad / (grad.abs() + eps)


def check_gradients(model_dir: str, eps: float = 1e-5, response_length: int = 53) -> dict:
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import ppo_tldr as P

    sft, rm = os.path.join(model_dir, "sft"), os.path.join(model_dir, "rm")
    tok = AutoTokenizer.from_pretrained(sft)
    pad, R = tok.pad_token_id, response_length
    rows = [json.loads(line) for line in open(os.path.join(model_dir, "data", "train.jsonl"))][:8]
    ids = [P.truncated_query_tokens(tok, r, 512) for r in rows]
    width = max(map(len, ids))
    queries = torch.tensor([P.left_pad(x, width, pad) for x in ids])
    torch.manual_seed(0)

    def load(attn):
        policy = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32, attn_implementation=attn)
        critic = P.NormalizedScalarModel(AutoModelForSequenceClassification.from_pretrained(
            rm, dtype=torch.float32, attn_implementation=attn), value_head_bias=True)  # as ppo_tldr.py's value model
        P.fp32_head(policy.get_output_embeddings())
        P.fp32_head(critic.model.score)
        return P.PolicyAndValueWrapper(policy, critic)

    model = load("sdpa").eval()
    with torch.no_grad():
        responses, old = P.generate_with_logprobs(model.policy, queries, pad, P.sampling_config(R, 0.7), R)
    query_responses = torch.cat((queries, responses), 1)
    advantages = torch.randn(len(rows), R)
    advantages = (advantages - advantages.mean()) / advantages.std()
    returns = 0.3 * torch.randn(len(rows), R)
    mask = torch.ones(len(rows), R, dtype=torch.bool)

    def grads(m, bf16: bool):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, values = P.forward(m, query_responses, pad, logits_to_keep=R + 1)
            logprobs = P.response_logprobs(P.response_logits(out.logits, R).float(), responses, 0.7)
            vpred = values[:, width - 1 : -1].float()
            vf_loss, _ = P.value_loss(vpred, vpred.detach(), returns, mask, 0.2)
            pg_loss, _, _ = P.policy_loss(logprobs, old.float(), advantages, mask, 0.2)
            (pg_loss + 0.1 * vf_loss).backward()
        return flat(p.grad for p in m.parameters())

    g32 = grads(model, False)
    out = {"fp32_norm": g32.norm().item()}
    for attn in ("sdpa", "eager"):
        g16 = grads(model if attn == "sdpa" else load("eager"), True)
        rel = ((g16 - g32).norm() / g32.norm()).item()
        u16, u32 = adam_first_step(g16, eps), adam_first_step(g32, eps)
        out[attn] = {"rel_diff": rel, "norm": g16.norm().item(), "adam_step_norm": u16.norm().item(),
                     "adam_step_norm_fp32": u32.norm().item()}
        print(f"gradients: bf16 ({attn}) vs fp32: |g16 - g32| / |g32| = {rel:.3f}; |g| {g16.norm():.3f} vs "
              f"{g32.norm():.3f}; first AdamW step (eps {eps:g}) |u| {u16.norm():.0f} vs {u32.norm():.0f}")
    return out


def rounding_movement(weights, update) -> tuple[float, float]:
    """(fraction of entries whose bf16 copy changes, squared movement of the bf16 copies / squared fp32 movement)
    when fp32 master weights `weights` move by `update`."""
    seen = (weights + update).bfloat16().double() - weights.bfloat16().double()
    return (seen != 0).double().mean().item(), (seen.pow(2).sum() / update.double().pow(2).sum()).item()


def check_rounding(model_dir: str, lr: float, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(model_dir, "sft"), dtype=torch.float32)
    torch.manual_seed(0)
    changed = moved = numel = fp32_sq = 0.0
    for w in model.parameters():
        if w.dim() < 2:
            continue
        update = lr * steps * torch.sign(torch.randn_like(w))  # Adam moves each weight by about lr per step
        frac, ratio = rounding_movement(w.detach(), update)
        changed += frac * w.numel()
        numel += w.numel()
        sq = update.double().pow(2).sum().item()
        fp32_sq += sq
        moved += ratio * sq
    out = {"changed_fraction": changed / numel, "squared_movement_ratio": moved / fp32_sq}
    print(f"rounding: {steps} Adam steps of lr {lr:g} change the bf16 copy of {out['changed_fraction']:.3f} of the "
          f"matrix weights; squared movement seen by the bf16 matmuls = {out['squared_movement_ratio']:.0f}x fp32's")
    return out


def check_generation(model_dir: str, prompts: int = 16, tokens: int = 48, repeats: int = 2) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    queries = torch.randint(100, model.config.vocab_size - 100, (prompts, 180))  # the offline posts' typical length
    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=None)
    forward = model.forward

    def autocast_forward(*a, **k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*a, **k)

    out, seconds = {}, {}
    for name in ("fp32", "per_forward", "one_context") * repeats:
        model.forward = autocast_forward if name == "per_forward" else forward
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "one_context"):
            out[name] = model.generate(input_ids=queries, attention_mask=torch.ones_like(queries),
                                       generation_config=config)
        seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - start)
    same = torch.equal(out["per_forward"], out["one_context"])
    print(f"generation: {prompts} x {tokens} tokens, autocast at every forward {seconds['per_forward']:.2f} s, one "
          f"context around generate() {seconds['one_context']:.2f} s "
          f"({seconds['per_forward'] / seconds['one_context']:.2f}x); same tokens: {same}; fp32 without autocast "
          f"{seconds['fp32']:.2f} s ({seconds['fp32'] / seconds['one_context']:.2f}x the one-context bf16 time)")
    return {**seconds, "same_tokens": same}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checks", nargs="+", choices=["alloc", "attention", "gradients", "rounding", "generation"])
    p.add_argument("--model_dir", default="runs/bench/smollm2_fp32_bf16",
                   help="a bench_ppo.py output folder (sft/, rm/, data/train.jsonl)")
    p.add_argument("--lr", type=float, default=3e-6)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    needs_models = {"gradients", "rounding"} & set(args.checks)
    if needs_models and not os.path.exists(os.path.join(args.model_dir, "rm", "config.json")):
        raise SystemExit(f"{sorted(needs_models)} read the models of a bench run: {args.model_dir}/rm not found; run "
                         "`python benchmark/perf/bench_ppo.py --model smollm2 --precision fp32,bf16` or pass "
                         "--model_dir")
    results = {}
    for check in args.checks:
        if check == "alloc":
            results[check] = check_alloc()
        elif check == "attention":
            results[check] = check_attention()
        elif check == "gradients":
            results[check] = check_gradients(args.model_dir)
        elif check == "generation":
            results[check] = check_generation(args.model_dir)
        else:
            results[check] = check_rounding(args.model_dir, args.lr, args.steps)
    return results


if __name__ == "__main__":
    main()
