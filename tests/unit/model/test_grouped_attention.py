"""Masked attention with grouped KV heads, folded into plain attention per KV head, equals SDPA's GQA."""

import pytest
import torch
import torch.nn.functional as F

from cogbatch.model.language import _grouped_attention


@pytest.mark.parametrize("L", [1, 5])
@pytest.mark.parametrize("cuda_layout", [False, True])
def test_folded_query_heads_match_sdpa_gqa(L, cuda_layout, monkeypatch):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, hd = 3, 8, 2, 11, 16
    q = torch.randn(B, H, L, hd, generator=g)
    k, v = torch.randn(2, B, Hkv, T, hd, generator=g)
    mask = torch.zeros(B, 1, L, T)
    mask[0, :, :, :4] = torch.finfo(torch.float32).min  # a left-padded slot
    mask[:, :, :, T - L :] += torch.triu(torch.full((L, L), torch.finfo(torch.float32).min), 1)  # causal new tokens
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if cuda_layout:  # CUDA's memory-efficient kernel returns a (B, H, L, hd) view of (B, L, H, hd) memory
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2))  # fmt: skip
    torch.testing.assert_close(_grouped_attention(q, k, v, mask), want)
