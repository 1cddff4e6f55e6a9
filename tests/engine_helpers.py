"""Shared by the engine test modules: small request helpers. (Their fixtures, the built-in model and one
started transformers engine per module, are in conftest.py.)"""

from deployments.engines.engine import GenerationRequest, SamplingParams


def make_request(prompt=None, ids=None, request_id="t", **sampling) -> GenerationRequest:
    return GenerationRequest(request_id, SamplingParams(**sampling), prompt=prompt, prompt_token_ids=ids)


def chat_prompt(tokenizer, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer(chat_prompt(tokenizer, question))["input_ids"]


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
