"""Per-request sampling and logits masks for transformers' continuous-batching loop (see `transformers_engine`).

The `ContinuousBatchingManager` samples with one global `do_sample` and one global seed, so the engine runs it
with `do_sample=False` (argmax) and `SamplingProcessor`, a per-request CB logits processor, turns the argmax into
a sample for the rows that want one: temperature, top-k, top-p, then Gumbel noise drawn from a generator seeded
by (request seed, token position). argmax(logits / T + Gumbel) is an exact sample of softmax(logits / T), and
the noise depends on nothing else in the batch, so a seeded request is reproducible whatever it is batched
with. Rows at temperature 0 are left alone: exact greedy.

Before sampling, on greedy and sampled rows alike: a request's `LogitAdjustment` (logit_bias, min_tokens,
repetition / frequency / presence penalties), then its `LogitsMask` (constrained decoding), so that a mask
always wins. Rows with neither cost nothing extra.

Log-probs (`SamplingParams.logprobs`): for the rows that ask, the processor takes log_softmax of the row's
logits as they come in (the raw model distribution, before any of the above) and, once the row's final
scores are computed, records the token the manager will pick (their argmax) with its raw log-prob and the
row's top-k, in `RequestSlot.logprob_entries` keyed by completion position. Rows that do not ask cost
nothing extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

# The logits-processor kwarg that carries a request's handle into the CB thread.
SLOT_KWARG = "tandem_slot"
_MASK64 = (1 << 64) - 1
# Below this temperature a request decodes greedily (dividing logits by ~0 would overflow to inf / NaN).
MIN_TEMPERATURE = 1e-5


class LogitsMask(Protocol):
    """A per-request restriction of the next-token logits, e.g. an xgrammar token bitmask.

    Called on the decode-loop thread once per generated token of its request, before sampling, with the
    request's row of float32 logits (`[vocab_size]`, to be modified in place, e.g. disallowed tokens set to
    -inf) and all completion tokens so far (a grammar matcher advances over the ones it has not seen).
    If it raises, its request ends with an `EngineError`; the other requests are unaffected.
    """

    def apply(self, logits: torch.Tensor, completion_ids: Sequence[int]) -> None: ...


class LogitAdjustment:
    """A request's logit_bias, penalties and min_tokens, applied in place to its logits row: logit_bias,
    repetition_penalty (prompt and completion tokens), frequency and presence penalties (completion tokens
    only), as vLLM orders them; then min_tokens' -inf on the ids that would end the request (the same in
    any order, and last lets a grammar mask restore them, see `_adjust_and_mask`)."""

    def __init__(
        self,
        *,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        min_tokens: int = 0,
        blocked_ids: Sequence[int] = (),
        logit_bias: dict[int, float] | None = None,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.repetition_penalty = float(repetition_penalty)
        # Nothing to hold back without terminal ids (ignore_eos and no stop_token_ids).
        self.min_tokens = int(min_tokens) if blocked_ids else 0
        self.blocked_ids = torch.tensor(sorted(set(blocked_ids)), dtype=torch.long)
        bias = logit_bias or {}
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long)
        self.bias_values = torch.tensor([float(v) for v in bias.values()], dtype=torch.float32)
        # Only read by the repetition penalty; the completion's repeats need no dedup (each copy gets the same value).
        self.prompt_ids = torch.tensor(sorted(set(prompt_ids)) if self.repetition_penalty != 1.0 else [], dtype=torch.long)
        self._device = torch.device("cpu")

    @classmethod
    def for_request(cls, sampling, prompt_ids: Sequence[int], terminal_ids: Sequence[int]) -> LogitAdjustment | None:
        """The adjustment of a request's `SamplingParams` (None: it adjusts nothing). `terminal_ids`: the ids
        that would end it (EOS unless ignore_eos, and its stop_token_ids), held back until min_tokens."""
        adjustment = cls(
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            min_tokens=sampling.min_tokens,
            blocked_ids=terminal_ids,
            logit_bias=sampling.logit_bias,
            prompt_ids=prompt_ids,
        )
        return adjustment if adjustment.is_active else None

    @property
    def is_active(self) -> bool:
        return bool(self.needs_completion or self.min_tokens or len(self.bias_ids))

    @property
    def needs_completion(self) -> bool:
        """Whether it reads the completion's tokens (the processor then keeps them up to date)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def blocks(self, position: int) -> bool:
        return position < self.min_tokens

    def apply(self, logits: torch.Tensor, completion_ids: Sequence[int], position: int) -> None:
        self.adjust(logits, completion_ids)
        if self.blocks(position):
            logits[self.blocked_ids] = -math.inf

    def adjust(self, logits: torch.Tensor, completion_ids: Sequence[int]) -> None:
        """Everything but min_tokens."""
        if logits.device != self._device:  # once: the model's device
            self._device = logits.device
            for name in ("blocked_ids", "bias_ids", "bias_values", "prompt_ids"):
                setattr(self, name, getattr(self, name).to(logits.device))
        if len(self.bias_ids):
            logits.index_add_(0, self.bias_ids, self.bias_values.to(logits.dtype))
        if not self.needs_completion:
            return
        completion = torch.tensor(completion_ids, dtype=torch.long, device=logits.device)
        p = self.repetition_penalty
        if p != 1.0:
            seen = torch.cat([self.prompt_ids, completion])
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / p, values * p)
        if (self.frequency_penalty or self.presence_penalty) and len(completion):
            ids, counts = torch.unique(completion, return_counts=True)
            logits[ids] -= self.frequency_penalty * counts.to(logits.dtype) + self.presence_penalty


@dataclass
class RequestSlot:
    """What the sampling processor needs to know about one live request."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    prompt_len: int
    logits_mask: LogitsMask | None = None
    adjustment: LogitAdjustment | None = None
    min_p: float = 0.0  # sampled rows only
    logprobs: int | None = None  # SamplingParams.logprobs: None records nothing
    # Written by the processor on the decode-loop thread:
    position: int = 0  # index of the completion token being sampled
    # Only maintained for a mask or an adjustment that reads them:
    completion_ids: list[int] = field(default_factory=list)
    error: BaseException | None = None
    # Only with logprobs: completion position -> (chosen id, its raw log-prob, top ids, their log-probs).
    # Keyed by position (counted from the full sequence, see `prepare_tensor_args`), so an entry recorded
    # again after the manager re-prefills an evicted request replaces, never shifts, the others. The
    # engine pops each entry once its token has arrived.
    logprob_entries: dict[int, tuple[int, float, list[int], list[float]]] = field(default_factory=dict)


class SamplingProcessor(ContinuousBatchingLogitsProcessor):
    """Per-request sampling and logits masks for the CB loop, whose own sampler is argmax.

    The CB API hands a processor one int32 per batch row; ours is the request's slot handle (-1: none).
    The per-row work happens in Python with the slot looked up by handle, which is why the engine runs
    the manager eagerly (no CUDA graphs, no torch.compile, no async batching): `prepare_tensor_args` and
    `__call__` then alternate on the loop thread, one pair per forward pass.
    """

    supported_kwargs = {SLOT_KWARG: int}
    ignored_kwargs = ()

    def __init__(self) -> None:
        # handle -> slot; written on the event loop, read on the decode thread (single dict ops: GIL-safe)
        self.slots: dict[int, RequestSlot] = {}
        self._num_rows = 0

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        handles = []
        for future_state in requests_with_new_token:
            state = future_state.state
            handle = state.logit_processor_kwargs.get(SLOT_KWARG, -1)
            slot = self.slots.get(handle)
            if slot is not None:
                # Counted from the full sequence, which survives the manager re-prefilling an evicted
                # request (generated tokens then move into initial_tokens).
                sequence_len = len(state.initial_tokens) + len(state.generated_tokens)
                slot.position = sequence_len - slot.prompt_len
                adjustment = slot.adjustment
                if slot.logits_mask is not None or (adjustment is not None and adjustment.needs_completion):
                    slot.completion_ids = (state.initial_tokens + state.generated_tokens)[slot.prompt_len :]
            handles.append(handle)
        # Rows past these carry stale arguments (the manager only resets them at start) and their
        # logits are discarded, so `__call__` skips them.
        self._num_rows = len(handles)
        return torch.tensor(handles, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        sampled_rows: list[int] = []
        sampled_slots: list[RequestSlot] = []
        live: list[tuple[int, RequestSlot]] = []
        for row, handle in enumerate(tensor_arg[: self._num_rows].tolist()):
            slot = self.slots.get(handle)
            if slot is not None and slot.error is None:
                live.append((row, slot))
        logprob_rows = [(row, slot) for row, slot in live if slot.logprobs is not None]
        raw_logprobs = None
        if logprob_rows:
            # The raw distribution: before adjustments, masks and sampling change the rows in place.
            rows = torch.tensor([row for row, _ in logprob_rows], device=scores.device)
            raw_logprobs = torch.log_softmax(scores[rows].float(), dim=-1)
        for row, slot in live:
            if slot.adjustment is not None or slot.logits_mask is not None:
                try:
                    _adjust_and_mask(scores[row], slot)
                except Exception as e:  # noqa: BLE001 - fail this request only, never the shared loop
                    slot.error = e
                    continue
            if slot.temperature >= MIN_TEMPERATURE:
                sampled_rows.append(row)
                sampled_slots.append(slot)
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=scores.device)
            scores[rows] = gumbel_sample_scores(scores[rows], sampled_slots)
        if logprob_rows:
            _record_logprobs(scores, raw_logprobs, logprob_rows)
        return scores


def _record_logprobs(scores: torch.Tensor, raw_logprobs: torch.Tensor, logprob_rows: list[tuple[int, RequestSlot]]) -> None:
    """Each row's entry at its slot's position: the manager's pick (the argmax of the final scores) with
    its raw log-prob, and the row's top-k raw log-probs (most likely first)."""
    rows = torch.tensor([row for row, _ in logprob_rows], device=scores.device)
    chosen = scores[rows].argmax(dim=-1)
    chosen_logprobs = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    k = max(slot.logprobs for _, slot in logprob_rows)
    if k:
        top_values, top_ids = raw_logprobs.topk(k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for i, (chosen_id, (_, slot)) in enumerate(zip(chosen.tolist(), logprob_rows)):
        if slot.error is not None:
            continue
        n = slot.logprobs
        top = (top_ids[i][:n], top_values[i][:n]) if n else ([], [])
        slot.logprob_entries[slot.position] = (chosen_id, chosen_logprobs[i], *top)


def _adjust_and_mask(logits: torch.Tensor, slot: RequestSlot) -> None:
    adjustment, mask = slot.adjustment, slot.logits_mask
    held = None
    if adjustment is not None:
        adjustment.adjust(logits, slot.completion_ids)
        if adjustment.blocks(slot.position):
            blocked = adjustment.blocked_ids
            if mask is not None:
                held = logits[blocked].clone()
            logits[blocked] = -math.inf
    if mask is not None:
        mask.apply(logits, slot.completion_ids)
        if held is not None and bool(torch.isneginf(logits).all()):
            # The grammar allows only ids min_tokens holds back (it is complete): the mask wins.
            logits[blocked] = held
            mask.apply(logits, slot.completion_ids)  # refills the same mask for a position already seen


def gumbel_sample_scores(logits: torch.Tensor, slots: list[RequestSlot]) -> torch.Tensor:
    """Scores whose argmax is a sample from each row's temperature / min-p / top-k / top-p distribution."""
    vocab, device = logits.size(-1), logits.device
    temperature = torch.tensor([s.temperature for s in slots], dtype=logits.dtype, device=device).unsqueeze(1)
    x = logits / temperature
    if any(s.min_p > 0 for s in slots):
        # p < min_p * p_max  <=>  x < x_max + log(min_p), whatever the normalization; log(0) = -inf keeps all.
        log_min_p = torch.tensor([s.min_p for s in slots], dtype=x.dtype, device=device).log().unsqueeze(1)
        x = x.masked_fill(x < x.max(dim=-1, keepdim=True).values + log_min_p, -math.inf)
    top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in slots], device=device)
    if bool((top_k < vocab).any()):
        kth_largest = torch.topk(x, int(top_k.max()), dim=-1).values.gather(1, (top_k - 1).unsqueeze(1))
        x = x.masked_fill(x < kth_largest, -math.inf)
    # top_p == 1 rows get an unreachable threshold, so float rounding of the cumulative sum cannot drop tokens.
    top_p = torch.tensor([s.top_p if s.top_p < 1 else math.inf for s in slots], dtype=x.dtype, device=device)
    top_p = top_p.unsqueeze(1)
    if bool(torch.isfinite(top_p).any()):
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        # Explicitly so: a top_p that rounds to 0 in the logits' dtype would otherwise drop every token.
        drop_sorted[:, 0] = False
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), -math.inf)
    noise = torch.stack([_gumbel_noise(vocab, s.seed, s.position) for s in slots])
    return x + noise.to(device)


def _gumbel_noise(size: int, seed: int, position: int) -> torch.Tensor:
    # Drawn on the CPU whatever the model's device, so a seed means the same noise everywhere.
    generator = torch.Generator().manual_seed(_mix64(seed, position))
    uniform = torch.rand(size, generator=generator).clamp_(min=1e-20)
    return -torch.log(-torch.log(uniform))


def _mix64(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): nearby seeds and positions get unrelated generator states."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class ProcessorList(ContinuousBatchingLogitsProcessorList):
    def __init__(self, processor: ContinuousBatchingLogitsProcessor):
        super().__init__(LogitsProcessorList([processor]))
        # The base class only counts the argument rows of processors it converted itself.
        self.tensors_required = 1
