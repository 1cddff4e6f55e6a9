"""Constrained decoding with xgrammar: regular expressions and JSON schemas as per-request token masks.

An engine owns one `GrammarConstraints` (one xgrammar `GrammarCompiler` for its tokenizer, with a bounded
cache, so a schema sent again compiles once). Per request it compiles the constraint, off the event loop,
before the request is queued (an invalid regex or schema is a `ValueError` naming it), and wraps the
compiled grammar in a `GrammarMask`: a `GrammarMatcher` of the request's own that, once per generated
token, catches up with the request's completion tokens and sets every token the grammar forbids next
to -inf in the request's row of logits. Once the grammar is complete the only tokens left are the stop
tokens (the model's EOS), so a constrained request ends with finish_reason "stop".

OpenAI's `response_format: {"type": "json_object"}` is the JSON schema `JSON_OBJECT_SCHEMA`: any object.
"""

from __future__ import annotations

import os
import re
import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
import xgrammar as xgr

from deployments.engines.engine import JSON_OBJECT_SCHEMA, validate_constraint  # noqa: F401 - JSON_OBJECT_SCHEMA: its docstring refers to it


# Memory bound of an engine's compiled-grammar cache (xgrammar evicts entries beyond it).
_CACHE_LIMIT_BYTES = 128 << 20
# Requests' grammars compiled at once per engine (more wait; see GrammarConstraints.compile_within).
_COMPILE_THREADS = 2
# xgrammar's C++ compile threads per compiler.
_MAX_COMPILE_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and checks with "Check failed: ...:").
_XGR_ERROR_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?(\S+\.(cc|h|cpp):\d+:\s*)?(Check failed:.*?is false:\s*)?")


_OPTIONAL_NEWLINE = xgr.Grammar.from_ebnf('root ::= "\\n"?')


def _clean_error(error: BaseException) -> str:
    text = str(error).strip()
    return _XGR_ERROR_PREFIX.sub("", text.splitlines()[0] if text else "") or type(error).__name__


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """`logits[i] = -inf` where bit i of the int32 `bitmask` is 0, in plain torch on any device (xgrammar's
    own kernels need CPU, or Triton on CUDA)."""
    bits = bitmask.to(logits.device)
    shifts = torch.arange(32, device=logits.device, dtype=bits.dtype)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten()[: logits.shape[-1]]
    logits.masked_fill_(~allowed, -torch.inf)


class GrammarConstraints:
    """One engine's grammar compiler. Thread-safe: compile from worker threads, never the event loop.

    `vocab_size` is the width of the model's logits (it can exceed the tokenizer's vocabulary);
    `stop_token_ids` are the tokens that end a request (the model's EOS ids): the only tokens a mask
    allows once its grammar is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=_COMPILE_THREADS, thread_name_prefix="grammar-compile")

    def compiler(self) -> xgr.GrammarCompiler:
        """Built on first use: the tokenizer scan takes a while for large vocabularies."""
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
                )
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=_MAX_COMPILE_THREADS, cache_enabled=True, cache_limit_bytes=_CACHE_LIMIT_BYTES
                )
            return self._compiler

    def compile(self, *, regex: str | None = None, json_schema: str | None = None) -> xgr.CompiledGrammar | None:
        """The compiled grammar of a request's constraint (None: unconstrained). Raises ValueError on an
        invalid regex or schema."""
        validate_constraint(regex, json_schema)
        if regex is None and json_schema is None:
            return None
        compiler = self.compiler()
        if regex is not None:
            try:
                return compiler.compile_regex(regex)
            except Exception as e:  # noqa: BLE001 - xgrammar reports bad input as RuntimeError
                raise ValueError(f"invalid regex {regex!r}: {_clean_error(e)}") from None
        try:
            # Compact JSON (", " and ": " separators, no other whitespace): free whitespace lets small
            # models pad forever instead of closing the object. One newline may follow it: byte-level
            # BPEs with Qwen2's pre-tokenizer join closing punctuation and a newline into one token
            # ('"}}\n' ends a Qwen tool call), and a model that only knows that token would otherwise
            # be pushed off its way of closing the object.
            grammar = xgr.Grammar.concat(
                xgr.Grammar.from_json_schema(json_schema, any_whitespace=False), _OPTIONAL_NEWLINE
            )
            return compiler.compile_grammar(grammar)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"invalid json_schema: {_clean_error(e)}") from None

    async def compile_within(self, timeout_s: float, *, regex: str | None = None, json_schema: str | None = None) -> xgr.CompiledGrammar | None:
        """`compile` in one of the engine's compile threads (never on the event loop), refused with a
        ValueError when it takes longer than `timeout_s`, waiting for a thread included: some schemas
        take minutes (xgrammar's time grows fast with e.g. thousands of optional properties). The
        compile itself cannot be interrupted; it finishes in the background (and is cached), holding
        one of the `_COMPILE_THREADS`, so runaway grammars cost a bounded share of the CPU."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(self.compile, regex=regex, json_schema=json_schema))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            what = "regex" if regex is not None else "json_schema"
            raise ValueError(
                f"the {what} constraint did not compile within {timeout_s:g} s (engine_args.grammar_compile_timeout_s); "
                "simplify it (e.g. fewer optional properties or enum values)"
            ) from None

    def mask(self, grammar: xgr.CompiledGrammar) -> GrammarMask:
        return GrammarMask(grammar, self.vocab_size, self.stop_token_ids)


class GrammarMask:
    """A request's grammar state, as the engine's `LogitsMask`: `apply(logits_row, completion_ids)`.

    The matcher is advanced lazily, from the completion tokens the engine passes in, never from what a
    mask allowed: a token sampled but then discarded by the engine (its request was evicted and is
    re-prefilled) never reaches the matcher, and a call for a position already seen just refills the
    same mask. Should the completion ever disagree with what the matcher took, it is rolled back to the
    common prefix first.
    """

    def __init__(self, grammar: xgr.CompiledGrammar, vocab_size: int, stop_token_ids: Sequence[int]):
        self._matcher = xgr.GrammarMatcher(grammar)
        self._vocab_size = vocab_size
        self._stop_set = set(stop_token_ids)
        self._stop_ids = torch.tensor(sorted(self._stop_set), dtype=torch.long)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._seen: list[int] = []  # the completion tokens the matcher has caught up with
        self._matched = 0  # how many of them the matcher accepted (later ones: stop tokens after the end)

    @property
    def is_completed(self) -> bool:
        """The text so far is a complete match (more may still be allowed, e.g. more digits)."""
        return self._matcher.is_completed()

    @property
    def is_terminated(self) -> bool:
        """The matcher has accepted a stop token: nothing but stop tokens may follow."""
        return self._matcher.is_terminated()

    def apply(self, logits: torch.Tensor, completion_ids: Sequence[int]) -> None:
        self._catch_up(completion_ids)
        if self._matcher.is_terminated():
            # Only reachable when EOS does not end the request (ignore_eos): keep emitting stop tokens.
            allowed = torch.full_like(logits, -torch.inf)
            stop_ids = self._stop_ids.to(logits.device)
            allowed[stop_ids] = logits[stop_ids]
            logits.copy_(allowed)
            return
        if not self._matcher.fill_next_token_bitmask(self._bitmask):
            return  # every token allowed
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, self._bitmask[0], vocab_size=self._vocab_size)
        else:
            apply_bitmask_torch(logits, self._bitmask[0])

    def _catch_up(self, completion_ids: Sequence[int]) -> None:
        seen = self._seen
        n = len(seen)
        if len(completion_ids) < n or list(completion_ids[:n]) != seen:
            common = 0
            for a, b in zip(seen, completion_ids):
                if a != b:
                    break
                common += 1
            if self._matched > common:
                self._matcher.rollback(self._matched - common)
                self._matched = common
            del seen[common:]
        for token in completion_ids[len(seen) :]:
            token = int(token)
            if self._matcher.is_terminated():
                if token not in self._stop_set:
                    raise RuntimeError(f"token {token} follows the end of the grammar")
            elif self._matcher.accept_token(token):
                self._matched += 1
            else:
                raise RuntimeError(f"token {token} does not match the grammar")
            seen.append(token)
