"""model/attention.py's blocked causal attention (`_attend_unfused`, CPU MLA training and
evaluation) against SDPA: the same outputs and gradients for causal and sliding-window masks,
whatever the block size against the sequence length.

    PYTHONPATH=platform .venv/bin/python -m pytest tests/unit/test_attention.py
"""

import pytest
import torch
import torch.nn.functional as F

from raymoe.model.attention import _attend, _attend_unfused, causal_mask


def _qkv(S: int, d: int = 12, dv: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(2, 3, S, w, generator=g, dtype=dtype).requires_grad_() for w in (d, d, dv))
    return q, k, v


def _sdpa(q, k, v, window, scale):
    mask = causal_mask(q.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


@pytest.mark.parametrize("S,block,window", [(5, 128, None), (20, 8, None), (20, 7, None), (20, 8, 5), (20, 3, 4), (33, 16, 1)])
def test_blocked_attention_gives_sdpa_outputs_and_gradients(S, block, window):
    q, k, v = _qkv(S)
    g_out = torch.randn(2, 3, S, 8, generator=torch.Generator().manual_seed(1))
    ref = _sdpa(q, k, v, window, 0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g_out)
    out = _attend_unfused(q, k, v, window, 0.3, block=block)
    grads = torch.autograd.grad(out, (q, k, v), g_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_default_scale_is_one_over_root_query_width():
    q, k, v = _qkv(9)
    torch.testing.assert_close(_attend_unfused(q, k, v, None, None), _sdpa(q, k, v, None, None), rtol=1e-5, atol=1e-6)


def test_bf16_attention_takes_its_softmax_in_fp32_and_returns_bf16():
    q, k, v = _qkv(16, dtype=torch.bfloat16)
    out = _attend_unfused(q, k, v, None, None, block=8)
    assert out.dtype == torch.bfloat16
    ref = _sdpa(q.float(), k.float(), v.float(), None, None)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_attend_takes_the_blocked_path_only_where_sdpa_has_no_fused_cpu_kernel(monkeypatch):
    import raymoe.model.attention as A
    calls = []
    monkeypatch.setattr(A, "_attend_unfused", lambda *a, **kw: calls.append(a[0].shape) or _attend_unfused(*a, **kw))
    q, k, v = _qkv(6)
    _attend(q, k, v, None)                      # MLA-like: value width differs -> blocked
    _attend(q, k, q, None)                      # equal widths: SDPA's flash kernel
    _attend(q, k, v, None, doc_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool).tril())  # packed rows: SDPA
    assert calls == [q.shape]
