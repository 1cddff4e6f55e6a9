"""Shared by the engine test modules: the built-in model, one started engine per module, and
small request helpers."""

import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from deployments.models.builtin import resolve_model_source
from deployments.engines.engine import GenerationRequest, SamplingParams
from deployments.engines.transformers_engine import TransformersEngine

# Small steps so that prompts longer than 64 tokens are prefilled in chunks. One torch thread: on a
# shared 2-core box, 2-thread OpenMP regions stall whenever the other core is busy, which slows a
# tiny model's forward passes by 10-100x.
ENGINE_ARGS = {"max_num_seqs": 32, "max_model_len": 256, "max_batch_tokens": 64, "num_threads": 1}


@pytest.fixture(scope="module")
def model_path():
    return str(resolve_model_source("builtin:tiny-chat"))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return AutoTokenizer.from_pretrained(model_path)


@pytest_asyncio.fixture(scope="module")
async def engine(model_path):
    eng = TransformersEngine(model_path, ENGINE_ARGS)
    await eng.start()
    yield eng
    await eng.shutdown()


def make_request(prompt=None, ids=None, request_id="t", **sampling) -> GenerationRequest:
    return GenerationRequest(request_id, SamplingParams(**sampling), prompt=prompt, prompt_token_ids=ids)


def chat_prompt(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def record_batch_rows(engine, monkeypatch) -> list[int]:
    """Spy on the engine's sampling processor: the returned list gets the number of rows (requests)
    of every decode step, to show that concurrent requests share forward passes."""
    rows_per_step: list[int] = []
    prepare = engine._processor.prepare_tensor_args

    def spy(requests_with_new_token):
        rows_per_step.append(len(requests_with_new_token))
        return prepare(requests_with_new_token)

    monkeypatch.setattr(engine._processor, "prepare_tensor_args", spy)
    return rows_per_step


async def collect(engine, request):
    deltas = [d async for d in engine.generate(request)]
    return deltas, "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]
