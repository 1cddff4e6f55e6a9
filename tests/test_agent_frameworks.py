"""Agent frameworks pointed at the gateway, used as their own users use them: the OpenAI Agents SDK
(a chat-completions model, a function tool, one full Runner run) and LangChain (`bind_tools`, forced
and auto, and a round trip with the tool's result). The built-in model is trained on these tools'
renderings (deployments/models/corpus.py), so every answer is pinned."""

from __future__ import annotations


from deployments.models import corpus
from tests.conftest import API_KEY

RESULTS = {city: result for city, result, _ in corpus.WEATHER_CALLS}
ANSWERS = {city: answer for city, _, answer in corpus.WEATHER_CALLS}


def _weather_agent(base_url: str, calls: list[str]):
    """An Agents SDK agent on the gateway's chat completions, with a `get_weather` function tool
    that records the cities it is called for."""
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK would export traces to OpenAI's servers

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return RESULTS[city]

    model = OpenAIChatCompletionsModel(model="tiny-chat", openai_client=AsyncOpenAI(base_url=base_url, api_key=API_KEY))
    return Agent(name="weather", model=model, tools=[get_weather], model_settings=ModelSettings(temperature=0, max_tokens=64))


async def test_openai_agents_sdk_runs_a_tool_and_answers_from_it(base_url):
    from agents import Runner

    calls: list[str] = []
    result = await Runner.run(_weather_agent(base_url, calls), "What is the weather in Paris?", max_turns=3)
    assert calls == ["Paris"]
    assert result.final_output == ANSWERS["Paris"]


async def test_openai_agents_sdk_streamed_run(base_url):
    from agents import Runner

    calls: list[str] = []
    run = Runner.run_streamed(_weather_agent(base_url, calls), "What is the weather in Tokyo?", max_turns=3)
    kinds = [event.item.type async for event in run.stream_events() if event.type == "run_item_stream_event"]
    assert calls == ["Tokyo"]
    assert run.final_output == ANSWERS["Tokyo"]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


def _get_weather_tool():
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return RESULTS[city]

    return get_weather


def _llm(base_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="tiny-chat", base_url=base_url, api_key=API_KEY, temperature=0, max_tokens=64)


def test_langchain_bind_tools_auto_and_the_round_trip(base_url):
    from langchain_core.messages import HumanMessage, ToolMessage

    get_weather = _get_weather_tool()
    llm = _llm(base_url).bind_tools([get_weather])
    question = HumanMessage("What is the weather in Tokyo?")
    asked = llm.invoke([question])
    assert [(c["name"], c["args"]) for c in asked.tool_calls] == [("get_weather", {"city": "Tokyo"})]
    assert asked.response_metadata["finish_reason"] == "tool_calls"
    result = get_weather.invoke(asked.tool_calls[0])  # a ToolMessage, as LangChain's own loop makes it
    assert isinstance(result, ToolMessage) and result.content == RESULTS["Tokyo"]
    answer = llm.invoke([question, asked, result])
    assert (answer.content, answer.tool_calls) == (ANSWERS["Tokyo"], [])


def test_langchain_forced_tool(base_url):
    get_weather = _get_weather_tool()
    # "Hello!" gets a greeting when the tool is only offered, and a call when it is forced.
    offered = _llm(base_url).bind_tools([get_weather]).invoke("Hello!")
    assert (offered.content, offered.tool_calls) == ("Hello! How can I help you today?", [])
    for choice in ("get_weather", "any"):  # LangChain's names: a named function, OpenAI's "required"
        forced = _llm(base_url).bind_tools([get_weather], tool_choice=choice).invoke("Hello!")
        assert [(c["name"], c["args"]) for c in forced.tool_calls] == [("get_weather", {"city": "Tokyo"})]


def test_langchain_streams_tool_call_chunks(base_url):
    llm = _llm(base_url).bind_tools([_get_weather_tool()])
    merged = None
    for chunk in llm.stream("What is the weather in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_weather", {"city": "Paris"})]

