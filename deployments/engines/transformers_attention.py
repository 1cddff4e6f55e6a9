"""Decode steps of transformers' continuous batching without attention over the whole batch's keys.

With SDPA (the attention the CPU engine runs), the manager packs a step's queries into one row and
every request's cached keys into one long key sequence, and masks all but each query's own keys:
attention costs (queries x all keys of the batch), so a decode step of B requests does B times the
work it needs (measured: 27% of the forward pass at 32 requests). `install()` wraps the "sdpa"
attention function so that a decode-only step (one query per request, the step that dominates
serving) gathers each request's own keys into a padded [B, heads, longest, dim] batch and runs one
SDPA call over it. Any other call (prefill, mixed steps, plain forwards without the manager's
`cu_seq_lens_*`) goes to transformers' own function unchanged.

The registry is transformers' process-wide `ALL_ATTENTION_FUNCTIONS` (the manager accepts only
"sdpa", "paged|eager" or flash names, so a new name is not an option); the wrapper is installed once
per process and changes nothing for calls it does not take.
"""

from __future__ import annotations

import threading

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_lock = threading.Lock()


def _seqlens(value) -> torch.Tensor | None:
    """The manager's cumulative lengths: a tensor, or a one-entry dict per layer type."""
    if isinstance(value, dict):
        if len(value) != 1:
            return None
        value = next(iter(value.values()))
    return value if isinstance(value, torch.Tensor) else None


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     scaling: float | None) -> torch.Tensor | None:
    """Attention of a decode-only step, or None when the step is not one. `query` [1, H, B, D] (one
    query per request), `key` / `value` [1, Hkv, total_k, D] with request i's keys at
    cu_k[i]:cu_k[i+1] (its new token last). Returns [1, B, H, D], as the attention functions do."""
    batch = cu_q.numel() - 1
    if query.shape[0] != 1 or batch < 2 or query.shape[2] != batch or int(cu_q[-1]) != batch:
        return None
    k_lens = cu_k[1:] - cu_k[:-1]
    longest = int(k_lens.max())
    positions = torch.arange(longest, device=key.device)
    index = (cu_k[:-1].unsqueeze(1) + positions).clamp_(max=key.shape[2] - 1)  # [B, longest]
    keys = key[0][:, index].transpose(0, 1)  # [B, Hkv, longest, D]
    values = value[0][:, index].transpose(0, 1)
    queries = query[0].transpose(0, 1).unsqueeze(2)  # [B, H, 1, D]
    mask = (positions < k_lens.unsqueeze(1)).view(batch, 1, 1, longest)
    out = torch.nn.functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=mask, scale=scaling, enable_gqa=queries.shape[1] != keys.shape[1],
    )  # [B, H, 1, D]
    return out.transpose(1, 2).reshape(1, batch, out.shape[1], out.shape[3])


def install() -> None:
    """Wraps the registered "sdpa" attention (once per process)."""
    with _lock:
        original = ALL_ATTENTION_FUNCTIONS["sdpa"]
        if getattr(original, "_tandem_decode", False):
            return

        def sdpa_with_decode_batches(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
            cu_q, cu_k = _seqlens(kwargs.get("cu_seq_lens_q")), _seqlens(kwargs.get("cu_seq_lens_k"))
            if cu_q is not None and cu_k is not None and dropout == 0.0 and not kwargs.get("output_attentions"):
                out = decode_attention(query, key, value, cu_q, cu_k, scaling)
                if out is not None:
                    return out, None
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

        sdpa_with_decode_batches._tandem_decode = True
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_with_decode_batches
