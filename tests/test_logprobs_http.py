"""Log-probabilities of generated tokens over HTTP, with the `openai` client: chat `logprobs` /
`top_logprobs` and completions `logprobs`, whole and streamed, checked against the model itself."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.conftest import API_KEY

MODEL = "tiny-chat"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


def _next_token_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def test_chat_logprobs_are_the_models_and_cover_every_token(client, tokenizer, reference_model):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.message.content == ANSWER
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens  # one entry per generated token (the final EOS too)
    assert "".join(t.token for t in content).startswith(ANSWER)
    for t in content:
        assert len(t.top_logprobs) == 3
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert (t.token, t.logprob) == (t.top_logprobs[0].token, t.top_logprobs[0].logprob)  # greedy: the top token
        assert t.bytes == list(t.token.encode())
    # The values are the model's own: log_softmax of its logits, position by position.
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    for t in content[:5]:
        expected = _next_token_logprobs(reference_model, ids)
        token_id = int(expected.argmax())
        assert tokenizer.decode([token_id]) == t.token
        assert t.logprob == pytest.approx(float(expected[token_id]), abs=1e-4)
        ids.append(token_id)


def test_streamed_logprobs_equal_the_whole_answers(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=64, logprobs=True, top_logprobs=2, stream=True,
    )
    streamed = [t for chunk in stream if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole.choices[0].logprobs.content]


def test_without_logprobs_there_are_none(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    assert r.choices[0].logprobs is None
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)


def test_completions_logprobs_in_openais_legacy_shape(client, tokenizer, reference_model):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and top[token] == logprob == max(top.values())
    expected = _next_token_logprobs(reference_model, tokenizer(prompt)["input_ids"])
    assert lp.token_logprobs[0] == pytest.approx(float(expected.max()), abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, param, fragment",
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"top_logprobs": 2}, None, "logprobs must be set to true if top_logprobs is used"),
    ],
)
def test_bad_chat_logprobs_are_400(client, kwargs, param, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, **kwargs)
    error = e.value.response.json()["error"]
    assert fragment in error["message"] and error["param"] == param


def test_completions_logprobs_with_echo_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", logprobs=1, echo=True)
    assert "logprobs together with echo" in e.value.response.json()["error"]["message"]


def test_agent_models_have_no_logprobs(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="agent:safe_response", messages=QUESTION, logprobs=True)
    error = e.value.response.json()["error"]
    assert error["param"] == "logprobs" and "not available for agent models" in error["message"]


def test_handle_callers_get_the_entries_too(model_handle):
    answer = model_handle.chat.remote(QUESTION, temperature=0, max_tokens=64, logprobs=1).result()
    assert answer["text"] == ANSWER
    assert [e[0] for e in answer["logprobs"]] == answer["token_ids"]
    assert all(len(e[3]) == 1 and e[3][0][0] == e[0] for e in answer["logprobs"])


def test_sglang_generate_gives_output_logprobs_whole_and_streamed(tandem_app):
    body = {
        "text": "The capital of France is", "sampling_params": {"max_new_tokens": 4, "temperature": 0},
        "return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    whole = httpx.post(tandem_app + "/generate", json=body, headers=headers, timeout=60).json()
    meta = whole["meta_info"]
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == meta["completion_tokens"]
    assert "".join(t for _, _, t in meta["output_token_logprobs"]).startswith(whole["text"])
    for (lp, token, text), top in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
        assert len(top) == 2 and top[0] == [lp, token, text]  # greedy: the top token
    with httpx.stream("POST", tandem_app + "/generate", json={**body, "stream": True}, headers=headers, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    import json

    last = json.loads(events[-1])["meta_info"]
    assert last["output_token_logprobs"] == meta["output_token_logprobs"]  # cumulative, as SGLang streams it
    bad = httpx.post(tandem_app + "/generate", json={**body, "logprob_start_len": 0}, headers=headers, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprob_start_len"
