"""benchmark/perf/bf16_cpu_checks.py: the helper math behind the README's bf16 explanations, and the attention timing
at the training shape with both kernels."""

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark", "perf"))

import bf16_cpu_checks as C  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_rounding_movement_by_hand():
    ones = torch.ones(1000)  # the bf16 step at 1.0 is 2**-7
    # 0.001 rounds back to 1.0: the bf16 copy does not move at all
    assert C.rounding_movement(ones, torch.full_like(ones, 0.001)) == (0.0, 0.0)
    # 0.005 rounds up to 1 + 2**-7: every entry moves by a whole step, (2**-7 / 0.005)**2 times the squared update
    frac, ratio = C.rounding_movement(ones, torch.full_like(ones, 0.005))
    assert frac == 1.0 and math.isclose(ratio, (2**-7 / 0.005) ** 2, rel_tol=1e-6)


def test_small_updates_move_bf16_copies_rarely_but_far():
    """Updates far below the bf16 step: few entries change, each by a whole step, so the squared movement is many
    times the fp32 one (about step / update), while its mean follows the update."""
    torch.manual_seed(0)
    w = torch.rand(200_000) * 0.5 + 0.5  # bf16 step 2**-8 in [0.5, 1)
    update = torch.full_like(w, 1e-4)
    frac, ratio = C.rounding_movement(w, update)
    step = 2**-8
    assert 0.5 * 1e-4 / step < frac < 2 * 1e-4 / step
    assert 0.5 * step / 1e-4 < ratio < 2 * step / 1e-4
    seen = (w + update).bfloat16().double() - w.bfloat16().double()
    assert math.isclose(seen.mean().item(), 1e-4, rel_tol=0.2)


def test_adam_first_step_is_sign_above_eps_and_linear_below():
    g = torch.tensor([1e-2, -1e-2, 1e-8, -1e-8, 0.0])
    u = C.adam_first_step(g, 1e-5)
    assert torch.allclose(u[:2], torch.tensor([1.0, -1.0]), atol=1e-3)
    assert torch.allclose(u[2:4], g[2:4] / 1e-5, rtol=1e-3) and u[4] == 0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_timed_attention_kernels_compute_the_same_attention(impl):
    """Both kernels the check times compute the same masked attention with grouped key/value heads, so the timing
    compares like with like."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    b, h, kv, t, d = 2, 9, 3, 12, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    out = C.attention(impl, q, k, v, mask)
    assert torch.allclose(out, ref, atol=1e-5)


def test_one_autocast_context_around_generate_samples_the_same_tokens(tiny_model):
    """The generation check's claim, on a tiny model: autocast entered once around generate() (its cached bf16 weight
    copies) gives the tokens of autocast entered at every forward, the way a prepared model samples."""
    result = C.check_generation(tiny_model, prompts=4, tokens=12, repeats=1)
    assert result["same_tokens"] is True
    assert result["per_forward"] > 0 and result["one_context"] > 0 and result["fp32"] > 0
