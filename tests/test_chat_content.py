"""Chat content the text-only models cannot take, or that OpenAI would refuse, is a clean 400 in
OpenAI's error shape naming the part at fault (`messages[1].content[0].type`), over real HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import API_KEY

MODEL = "tiny-chat"
FIRST = {"role": "user", "content": "What is the capital of France?"}
TEXT_ONLY = "takes text only, and '{at}' is a content part of type '{kind}'"


def _post(base_url: str, messages: list) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}
    return httpx.post(base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


@pytest.mark.parametrize(
    "content, param, code, message",
    [
        ([{"type": "video", "video": "x"}], "messages[1].content[0].type", "invalid_value", "Invalid value: 'video'. Supported values are: 'text', "),
        ([{"text": "hi"}], "messages[1].content[0].type", "missing_required_parameter", "Missing required parameter: 'messages[1].content[0].type'."),
        ([{"type": 7}], "messages[1].content[0].type", "invalid_type", "Invalid type for 'messages[1].content[0].type': expected a string, but got an integer instead."),
        ([{"type": "text"}], "messages[1].content[0].text", "missing_required_parameter", "Missing required parameter: 'messages[1].content[0].text'."),
        ([{"type": "text", "text": 5}], "messages[1].content[0].text", "invalid_type", "Invalid type for 'messages[1].content[0].text': expected a string, but got an integer instead."),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": None}], "messages[1].content[1].text", "invalid_type", "got null instead"),
        ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], "messages[1].content[1]", "unsupported_content", TEXT_ONLY.format(at="messages[1].content[1]", kind="image_url")),
        ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], "messages[1].content[0]", "unsupported_content", TEXT_ONLY.format(at="messages[1].content[0]", kind="input_audio")),
        ([{"type": "file", "file": {"file_id": "file-1"}}], "messages[1].content[0]", "unsupported_content", TEXT_ONLY.format(at="messages[1].content[0]", kind="file")),
        (["hi"], "messages[1].content[0]", "invalid_type", "Invalid type for 'messages[1].content[0]': expected an object, but got a string instead."),
        (42, "messages[1].content", "invalid_type", "Invalid type for 'messages[1].content': expected a string or an array of content parts, but got an integer instead."),
        ({"type": "text", "text": "hi"}, "messages[1].content", "invalid_type", "but got an object instead."),
        (True, "messages[1].content", "invalid_type", "but got a boolean instead."),
        ([], "messages[1].content", "empty_array", "Invalid 'messages[1].content': empty array."),
    ],
    ids=[
        "unknown-type", "no-type", "type-not-string", "text-missing", "text-not-string", "second-part-text-null",
        "image_url", "input_audio", "file", "part-not-object", "content-int", "content-object", "content-bool", "content-empty",
    ],
)
def test_invalid_content_is_400_naming_the_part(base_url, content, param, code, message):
    r = _post(base_url, [FIRST, {"role": "user", "content": content}])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error
    assert message in error["message"], error["message"]


def test_text_only_error_names_the_model(base_url):
    r = _post(base_url, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        f"The model '{MODEL}' takes text only, and 'messages[0].content[0]' is a content part of type 'image_url'. "
        'Send the content as a string or as text parts ({"type": "text", "text": "..."}).'
    )


def test_openai_client_gets_bad_request_for_an_image(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
        )
    assert e.value.status_code == 400 and e.value.body["param"] == "messages[0].content[1]"


def test_text_parts_are_joined_as_the_string_would_be(client):
    as_string = client.chat.completions.create(model=MODEL, messages=[FIRST], temperature=0, max_tokens=8)
    as_parts = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]}],
        temperature=0, max_tokens=8,
    )
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


async def test_a_template_that_refuses_the_messages_is_a_value_error_naming_the_model(engine, tokenizer):
    """A model's own template may refuse messages (Qwen's raise_exception); that is the client's 400,
    with the template's words, not an internal error."""
    import copy
    from types import SimpleNamespace

    from deployments.base_model import BaseModelServer

    strict = copy.copy(tokenizer)
    strict.chat_template = (
        "{%- if messages[0]['role'] != 'system' %}{{ raise_exception('System message must be at the beginning.') }}{%- endif %}"
        "{{- messages[0]['content'] }}"
    )
    # What render_chat reads of a replica: its model name, the real tokenizer and engine (no replica
    # object: its async __del__ would shut the shared engine down).
    replica = SimpleNamespace(model_name="strict", tokenizer=strict, engine=engine)
    with pytest.raises(ValueError) as e:
        BaseModelServer.render_chat(replica, [{"role": "user", "content": "Hi"}])
    assert str(e.value) == "the chat template of model 'strict' cannot render these messages: System message must be at the beginning."
    assert BaseModelServer.render_chat(replica, [{"role": "system", "content": "Be brief."}]) == "Be brief."
