"""The SGLang engine adapter (`sglang_engine.py`, `sglang_config.py`, `sglang_thread.py`), against the real
installed sglang (0.5.23) on CPU.

Config mapping and sampling are checked by SGLang's own `ServerArgs` / `SamplingParams`. Result dicts are
shaped as SGLang's TokenizerManager builds them (`_handle_batch_output`), with finish reasons as
`schedule_batch.FINISH_*.to_json()` returns them. The tests whose names say the SGLang core is replaced
swap only `sglang.Engine` (which needs a GPU) for a small in-test object; the adapter's own thread, loop,
pumps and clean-up are real. Only the `gpu`-marked test runs SGLang itself, and it skips without CUDA.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
from sglang.srt.managers.load_snapshot import LoadSnapshot
from sglang.srt.sampling.sampling_params import TOP_K_ALL
from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams
from sglang.srt.server_args import ServerArgs

from deployments.models.builtin import read_model_config
from deployments.engines.engine import EngineError, GenerationRequest, PromptTooLongError, SamplingParams
from deployments.engines.registry import engine_args_checker
from deployments.engines.sglang_config import build_server_args, check_engine_args, sampling_params
from deployments.engines.sglang_engine import ResultState, SGLangEngine, delta_from_result
from deployments.engines.sglang_thread import EngineThread, kill_process_trees
from deployments.engines.text import DeltaMapper


# -- SGLang's result shapes ----------------------------------------------------------------------


def stop_str(matched: str) -> dict:
    return {"type": "stop", "matched": matched}  # FINISH_MATCHED_STR


def stop_token(matched: int) -> dict:
    return {"type": "stop", "matched": matched}  # FINISH_MATCHED_TOKEN (EOS or a stop_token_ids entry)


def length(n: int) -> dict:
    return {"type": "length", "length": n}  # FINISH_LENGTH


def abort(message: str = "Aborted", status_code=None, err_type=None) -> dict:
    return {"type": "abort", "message": message, "status_code": status_code, "err_type": err_type}  # FINISH_ABORT


def result(text, output_ids, prompt_tokens, completion_tokens, finish=None, rid="r-1") -> dict:
    """One streamed result of `async_generate(stream=True)`."""
    return {
        "text": text,
        "output_ids": output_ids,
        "meta_info": {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": prompt_tokens,
            "weight_version": "default",
            "num_retractions": 0,
            "reasoning_tokens": 0,
            "completion_tokens": completion_tokens,
            "cached_tokens": 0,
        },
    }


def cumulative(results: list[dict]) -> list[dict]:
    """The same stream as SGLang sends it without incremental_streaming_output: text and ids so far."""
    out, text, ids = [], "", []
    for r in results:
        text, ids = text + r["text"], ids + r["output_ids"]
        out.append({**r, "text": text, "output_ids": list(ids)})
    return out


def deltas_of(tokenizer, results, incremental=True, prompt_ids=(1, 2, 3), **sampling):
    """The Deltas of a stream of result dicts; their text is Tandem's decoding of the output ids."""
    st = ResultState(DeltaMapper(tokenizer, SamplingParams(**sampling), list(prompt_ids)), incremental=incremental)
    return [d for r in results if (d := delta_from_result(r, st)) is not None], st


# -- config --------------------------------------------------------------------------------------


def test_server_args_from_tandem_engine_args(model_path):
    engine_args = {"mem_fraction_static": 0.55, "context_length": "1k", "max_running_requests": 8, "log_level": "info"}
    args = build_server_args(model_path, engine_args, 2)
    assert isinstance(args, ServerArgs)
    assert args.model_path == model_path
    assert args.tp_size == 2  # accelerator.count
    assert args.mem_fraction_static == 0.55
    assert args.context_length == 1000  # SGLang's own human-readable parser
    assert args.max_running_requests == 8
    assert args.log_level == "info"  # engine_args win over Tandem's defaults
    assert args.incremental_streaming_output is True and args.skip_tokenizer_init is False
    assert build_server_args(model_path, {}, 1).log_level == "warning"
    # The registry hands this checker to `python -m cluster check`.
    assert engine_args_checker("sglang") is check_engine_args


@pytest.mark.parametrize(
    "engine_args, device_count, fragments",
    [
        ({"mem_fraction": 0.5}, 1, ["engine_args.mem_fraction", "did you mean mem_fraction_static"]),
        ({"mem_fraction_static": "lots"}, 1, ["engine_args.mem_fraction_static", "float", "'lots'"]),
        ({"mem_fraction_static": 1.5}, 1, ["engine_args.mem_fraction_static", "(0, 1)", "1.5"]),
        ({"context_length": 2.5}, 1, ["engine_args.context_length", "int", "2.5"]),
        ({"dtype": "fp64"}, 1, ["engine_args.dtype", "'bfloat16'", "'fp64'"]),
        ({"tp_size": 2}, 2, ["engine_args.tp_size", "accelerator.count"]),
        ({"model_path": "/models/x"}, 1, ["engine_args.model_path", "source"]),
        ({"skip_tokenizer_init": True}, 1, ["engine_args.skip_tokenizer_init"]),
        ({}, 0, ["accelerator.count", "0"]),
    ],
)
def test_bad_engine_args_raise_clear_errors(engine_args, device_count, fragments):
    with pytest.raises(ValueError) as info:
        check_engine_args(engine_args, device_count, None)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_tensor_parallel_size_checked_against_model_heads():
    tiny = read_model_config("builtin:tiny-chat")  # Qwen2: 2 attention heads, 1 KV head
    check_engine_args({}, 2, tiny)
    with pytest.raises(ValueError, match=r"accelerator.count 4 .* num_attention_heads \(2\); allowed: \[1, 2\]"):
        check_engine_args({}, 4, tiny)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(4\)"):
        check_engine_args({}, 6, {"num_attention_heads": 12, "num_key_value_heads": 4})
    with pytest.raises(ValueError, match=r"context_length 9000 exceeds .* \(2048\)"):
        check_engine_args({"context_length": 9000}, 1, tiny)


# -- sampling ------------------------------------------------------------------------------------


def test_greedy_and_disabled_top_k_map_to_sglang():
    greedy = sampling_params(SamplingParams(max_tokens=5, temperature=0, top_k=0))
    assert greedy["max_new_tokens"] == 5 and greedy["top_k"] == -1
    sgl = SGLangSamplingParams(**greedy)
    assert sgl.top_k == 1  # SGLang's own encoding of greedy decoding
    sampled = SGLangSamplingParams(**sampling_params(SamplingParams(temperature=0.7, top_p=0.9, top_k=0)))
    assert (sgl.max_new_tokens, sampled.temperature, sampled.top_p, sampled.top_k) == (5, 0.7, 0.9, TOP_K_ALL)
    assert SGLangSamplingParams(**sampling_params(SamplingParams(top_k=20))).top_k == 20


def test_seed_stops_and_constraints_are_accepted_by_sglang(tokenizer):
    params = sampling_params(
        SamplingParams(temperature=0.8, seed=1234, stop=["END", "\n\n"], stop_token_ids=[7], ignore_eos=True),
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
    )
    assert params["sampling_seed"] == 1234
    assert params["stop"] == ["END", "\n\n"] and params["no_stop_trim"] is True
    assert params["stop_token_ids"] == [7] and params["ignore_eos"] is True
    sgl = SGLangSamplingParams(**params)
    sgl.verify(len(tokenizer))
    sgl.normalize(tokenizer)
    assert sgl.stop_strs == ["END", "\n\n"] and sgl.stop_token_ids == {7} and sgl.stop_str_max_len >= 1

    regex = sampling_params(SamplingParams(regex=r"(yes|no)"))
    assert SGLangSamplingParams(**regex).regex == "(yes|no)" and "no_stop_trim" not in regex
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    assert SGLangSamplingParams(**sampling_params(SamplingParams(json_schema=schema))).json_schema == schema


@pytest.mark.parametrize(
    "sampling, message",
    [
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
        (SamplingParams(regex="a+", json_schema="{}"), "at most one"),
        (SamplingParams(json_schema="{not json"), "json_schema"),
    ],
)
def test_bad_sampling_is_rejected(sampling, message):
    with pytest.raises(ValueError, match=message):
        sampling_params(sampling, vocab_size=1000)


# -- result dicts -> deltas ----------------------------------------------------------------------


def test_stop_string_is_cut_even_where_sglang_streamed_its_start(tokenizer):
    # With no_stop_trim SGLang streams "Hello E" and then "ND" on the token that completes "END".
    hello, nd = tokenizer.encode("Hello E"), tokenizer.encode("ND")
    stream = [result("Hello E", hello, 3, len(hello)), result("ND", nd, 3, len(hello + nd), stop_str("END"))]
    for results, incremental in ((stream, True), (cumulative(stream), False)):
        deltas, state = deltas_of(tokenizer, results, incremental=incremental, stop=["END"])
        assert [d.text for d in deltas] == ["Hello ", ""]
        assert [d.token_ids for d in deltas] == [hello, nd]
        last = deltas[-1]
        assert (last.finish_reason, last.stop_reason) == ("stop", "END")
        assert (last.prompt_tokens, last.completion_tokens) == (3, len(hello + nd))
        assert state.finished and state.engine_finished


def test_stop_string_matched_before_sglang_finishes_leaves_abort_to_the_caller(tokenizer):
    ids = tokenizer.encode("x STOP y")
    deltas, state = deltas_of(tokenizer, [result("x STOP y", ids, 3, len(ids))], stop=["STOP"])
    assert [(d.text, d.finish_reason, d.stop_reason) for d in deltas] == [("x ", "stop", "STOP")]
    assert state.finished and not state.engine_finished


def test_stop_token_eos_length_and_usage(tokenizer):
    hi, there, stop_id = tokenizer.encode("Hi"), tokenizer.encode(" there"), 7
    stream = [result("Hi", hi, 3, 2), result(" there", there, 3, 5), result("", [stop_id], 3, 6, stop_token(stop_id))]
    deltas, _ = deltas_of(tokenizer, stream, stop_token_ids=[stop_id])
    assert "".join(d.text for d in deltas) == "Hi there"
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason, deltas[-1].token_ids, deltas[-1].completion_tokens) == (
        "stop", 7, [7], 6,
    )
    eos = tokenizer.eos_token_id
    ended, _ = deltas_of(tokenizer, [result("Hi", hi + [eos], 3, 3, stop_token(eos))], stop_token_ids=[7])
    assert [(d.text, d.finish_reason, d.stop_reason) for d in ended] == [("Hi", "stop", None)]  # EOS: not a requested stop
    a, b = tokenizer.encode("a"), tokenizer.encode("b")
    capped, _ = deltas_of(tokenizer, cumulative([result("a", a, 3, 1), result("b", b, 3, 2, length(2))]), incremental=False)
    assert [(d.text, d.token_ids, d.finish_reason, d.completion_tokens) for d in capped] == [
        ("a", a, None, 1), ("b", b, "length", 2),
    ]
    # The stop token's text is never part of the text (SGLang's no_stop_trim, sent with stop strings, keeps it).
    dot = tokenizer.encode(".")[0]
    fine = tokenizer.encode("fine") + [dot]
    kept, _ = deltas_of(tokenizer, [result("fine.", fine, 3, len(fine), stop_token(dot))], stop=["zz"], stop_token_ids=[dot])
    assert (kept[-1].text, kept[-1].stop_reason, kept[-1].completion_tokens) == ("fine", dot, len(fine))


def test_aborts_map_to_finish_reason_or_errors(tokenizer):
    par = tokenizer.encode("par")
    plain, _ = deltas_of(tokenizer, [result("par", par, 3, 2), result("", [], 3, 2, abort())])
    assert [(d.text, d.finish_reason) for d in plain] == [("par", None), ("", "abort")]
    too_long = "The input (300 tokens) is longer than the model's context length (256 tokens)."
    with pytest.raises(PromptTooLongError) as info:
        deltas_of(tokenizer, [result("", [], 300, 0, abort(too_long, 400, "BadRequestError"))])
    assert (info.value.prompt_tokens, info.value.max_model_len) == (300, 256)
    with pytest.raises(ValueError, match="grammar"):
        deltas_of(tokenizer, [result("", [], 3, 0, abort("Failed to compile the grammar", 400, "BadRequestError"))])
    with pytest.raises(EngineError, match="out of memory"):
        deltas_of(tokenizer, [result("", [], 3, 0, abort("out of memory", 500, "InternalServerError"))])
    state = ResultState(DeltaMapper(tokenizer, SamplingParams(), [1]))
    delta_from_result(result("x", [90], 3, 1, length(1)), state)
    with pytest.raises(EngineError):
        delta_from_result(result("y", [91], 3, 2), state)


# -- the adapter with the SGLang core replaced ---------------------------------------------------


class ReplacedTokenizerManager:
    """The parts of SGLang's TokenizerManager the adapter uses."""

    def __init__(self, context_len: int, vocab_size: int, loads):
        self.context_len = context_len
        self.model_config = SimpleNamespace(vocab_size=vocab_size)
        self.tokenizer = None
        self.loads = list(loads)
        self.aborted: list[tuple[str, str]] = []  # (rid, thread name)

    def abort_request(self, rid: str = "", abort_all: bool = False):
        self.aborted.append((rid, threading.current_thread().name))

    async def get_loads(self, include=None, dp_rank=None):
        return self.loads


class ReplacedSGLangCore:
    """Stands in for the GPU-bound `sglang.Engine`: streams `script` as SGLang's result dicts, then stays
    open like a request still decoding; answers prefill-only logprob requests with -0.5 per token."""

    def __init__(self, script=(), context_len=256, vocab_size=1000, loads=()):
        self.script = list(script)
        self.tokenizer_manager = ReplacedTokenizerManager(context_len, vocab_size, loads)
        self.requests: list[dict] = []
        self.stream_closed = threading.Event()
        self.shutdown_thread: str | None = None

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             logprob_start_len=None, stream=False, rid=None):
        self.requests.append({
            "prompt": prompt, "input_ids": input_ids, "sampling_params": sampling_params, "stream": stream, "rid": rid,
            "return_logprob": return_logprob, "logprob_start_len": logprob_start_len,
            "thread": threading.current_thread().name,
        })
        if stream:
            return self._stream(len(input_ids), rid)
        return [
            {"text": "", "output_ids": [], "meta_info": {
                "id": f"lp-{i}", "finish_reason": length(0), "prompt_tokens": len(ids), "completion_tokens": 0,
                "input_token_logprobs": [(None if j == 0 else -0.5, t, None) for j, t in enumerate(ids)],
            }}
            for i, ids in enumerate(input_ids)
        ]

    async def _stream(self, prompt_tokens: int, rid: str):
        completion = 0
        try:
            for text, ids, finish in self.script:
                await asyncio.sleep(0)
                completion += len(ids)
                yield result(text, ids, prompt_tokens, completion, finish, rid)
                if finish is not None:
                    return
            await asyncio.Event().wait()  # only an abort / cancellation ends it
        finally:
            self.stream_closed.set()

    def get_all_child_pids(self):
        return []

    def shutdown(self):
        self.shutdown_thread = threading.current_thread().name


def engine_with_replaced_core(model_path, tokenizer, core, engine_args=None, launched=None) -> SGLangEngine:
    engine = SGLangEngine(model_path, engine_args or {}, tokenizer=tokenizer, device_count=1)

    def create_core(server_args):  # replaces only `sglang.Engine(server_args=...)`
        if launched is not None:
            launched.append((server_args, threading.current_thread().name))
        return core

    engine._create_core = create_core
    return engine


async def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def request(request_id="req-1", prompt=None, ids=None, **sampling) -> GenerationRequest:
    return GenerationRequest(request_id, SamplingParams(**sampling), prompt=prompt, prompt_token_ids=ids)


async def test_generate_streams_deltas_with_replaced_sglang_core(model_path, tokenizer):
    loads = [LoadSnapshot(num_running_reqs=2, num_waiting_reqs=1, token_usage=0.25, gen_throughput=12.5)]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    hi, there = tokenizer.encode("Hi"), tokenizer.encode(" there")
    core = ReplacedSGLangCore([("Hi", hi, None), (" there", there, None), ("", [eos], stop_token(eos))], loads=loads)
    launched = []
    engine = engine_with_replaced_core(model_path, tokenizer, core, {"mem_fraction_static": 0.5}, launched)
    await engine.start()
    try:
        (server_args, build_thread), = launched
        assert server_args.mem_fraction_static == 0.5 and server_args.tp_size == 1
        assert build_thread.startswith("sglang-engine") and build_thread != threading.current_thread().name

        deltas = [d async for d in engine.generate(request(prompt="Hello", max_tokens=8, temperature=0))]
        assert "".join(d.text for d in deltas) == "Hi there"
        prompt_ids = tokenizer("Hello")["input_ids"]
        assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", None)
        assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (len(prompt_ids), len(hi + there) + 1)
        sent = core.requests[0]
        assert sent["input_ids"] == prompt_ids and sent["stream"] and sent["rid"].startswith("req-1-")
        assert sent["sampling_params"]["max_new_tokens"] == 8 and sent["thread"] == build_thread
        assert core.tokenizer_manager.aborted == []  # SGLang finished the request itself

        with pytest.raises(PromptTooLongError):
            [d async for d in engine.generate(request(ids=[1] * 250, max_tokens=10))]
        assert len(core.requests) == 1  # refused before reaching SGLang

        await wait_for(lambda: engine.stats().running == 2)
        assert engine.stats().to_dict() == {
            "running": 2, "waiting": 1, "kv_cache_usage": 0.25, "tokens_per_s": 12.5, "healthy": True,
            # From the finished request's meta_info (SGLang's radix cache served none of it).
            "prompt_tokens": len(prompt_ids), "cached_prompt_tokens": 0,
        }
        engine.check_health()
        assert engine.max_model_len == 256
    finally:
        await engine.shutdown()
    assert core.shutdown_thread == build_thread  # torn down on the thread that built it
    with pytest.raises(EngineError, match="not started"):
        engine.check_health()


async def test_cancel_aborts_request_with_replaced_sglang_core(model_path, tokenizer):
    core = ReplacedSGLangCore([("a", tokenizer.encode("a"), None), ("b", tokenizer.encode("b"), None)])
    engine = engine_with_replaced_core(model_path, tokenizer, core)
    await engine.start()
    try:
        stream = engine.generate(request("cancel-me", ids=[1, 2, 3], max_tokens=100))
        assert (await stream.__anext__()).text == "a"
        assert (await stream.__anext__()).text == "b"
        await stream.aclose()  # the client went away mid-generation
        await wait_for(lambda: core.tokenizer_manager.aborted and core.stream_closed.is_set())
        (rid, abort_thread), = core.tokenizer_manager.aborted
        assert rid == core.requests[0]["rid"] and rid.startswith("cancel-me-")
        assert abort_thread == core.requests[0]["thread"]  # on the engine thread that owns SGLang's sockets

        # A stop string matched here, before SGLang finishes: the request is aborted there too.
        core.script, core.stream_closed = [("x STOP y", tokenizer.encode("x STOP y"), None)], threading.Event()
        deltas = [d async for d in engine.generate(request("stopped", ids=[1, 2], stop=["STOP"]))]
        assert [(d.text, d.finish_reason, d.stop_reason) for d in deltas] == [("x ", "stop", "STOP")]
        await wait_for(lambda: len(core.tokenizer_manager.aborted) == 2 and core.stream_closed.is_set())
        assert core.tokenizer_manager.aborted[1][0].startswith("stopped-")
        assert engine.stats().running == 0
    finally:
        await engine.shutdown()


async def test_prompt_logprobs_and_score_with_replaced_sglang_core(model_path, tokenizer):
    core = ReplacedSGLangCore()
    engine = engine_with_replaced_core(model_path, tokenizer, core)
    await engine.start()
    try:
        assert await engine.prompt_logprobs([[1, 2, 3], [4], []]) == [[None, -0.5, -0.5], [None], []]
        sent = core.requests[-1]
        assert sent["input_ids"] == [[1, 2, 3]] and sent["return_logprob"] and sent["logprob_start_len"] == 0
        assert sent["sampling_params"] == {"max_new_tokens": 0}
        continuation = tokenizer(" world", add_special_tokens=False)["input_ids"]
        assert await engine.score("Hello", [" world"]) == pytest.approx([-0.5 * len(continuation)])
        with pytest.raises(PromptTooLongError):
            await engine.prompt_logprobs([[1] * 256])
    finally:
        await engine.shutdown()


def _spawn_sleeper_tree() -> tuple[subprocess.Popen, int]:
    """A child process that starts a grandchild, like SGLang's scheduler starting its own helpers."""
    script = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(g.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    return child, int(child.stdout.readline())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_engine_thread_builds_off_main_thread_and_reaps_child_tree():
    built_on = {}

    def build():
        built_on["thread"] = threading.current_thread()
        # What sglang.Engine's `_ensure_event_loop` does off the main thread: it needs a loop set there.
        built_on["loop"] = asyncio.get_event_loop()
        return _spawn_sleeper_tree()

    torn_down_on = []

    def teardown(tree):
        torn_down_on.append(threading.current_thread().name)
        kill_process_trees([tree[0].pid], wait_timeout=20)

    thread = EngineThread("engine-under-test")
    child, grandchild = await thread.start(build, teardown)
    try:
        assert built_on["thread"] is not threading.main_thread() and built_on["loop"] is thread.loop
        assert not _gone(child.pid) and not _gone(grandchild)

        async def where():
            return threading.current_thread().name, asyncio.get_running_loop()

        assert await thread.run(where()) == ("engine-under-test", thread.loop)
        assert thread.is_alive()
    finally:
        await thread.stop()
    assert torn_down_on == ["engine-under-test"] and not thread.is_alive()
    assert child.wait(timeout=10) == -9
    await wait_for(lambda: _gone(grandchild))


async def test_failed_start_kills_launched_children_with_replaced_sglang_core(model_path, tokenizer):
    spawned = []

    def create_core(server_args):  # a launch whose scheduler "dies" after the helpers started
        spawned.append(_spawn_sleeper_tree())
        raise RuntimeError("Rank 0 scheduler died during initialization")

    engine = SGLangEngine(model_path, {}, tokenizer=tokenizer, device_count=1)
    engine._create_core = create_core
    with pytest.raises(RuntimeError, match="scheduler died"):
        await engine.start()
    (child, grandchild), = spawned
    assert child.wait(timeout=10) == -9
    await wait_for(lambda: _gone(grandchild))
    with pytest.raises(EngineError, match="not started"):
        engine.check_health()


# -- on a GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
async def test_sglang_engine_generates_greedy_tokens_on_gpu(model_path, tokenizer):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        from deployments.engines.sglang_engine import _import_sglang_engine

        _import_sglang_engine()
    except Exception as e:  # noqa: BLE001 - e.g. no torchvision / sgl-kernel in a CPU environment
        pytest.skip(f"sglang.Engine is not importable here: {e!r}")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    engine = SGLangEngine(model_path, {"mem_fraction_static": 0.3, "context_length": 512}, tokenizer=tokenizer)
    await engine.start()
    try:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
        )
        deltas = [d async for d in engine.generate(request("gpu", prompt=prompt, max_tokens=8, temperature=0))]
        assert deltas[-1].finish_reason in ("stop", "length") and 1 <= deltas[-1].completion_tokens <= 8
        assert sum(len(d.token_ids) for d in deltas) == deltas[-1].completion_tokens
        again = [d async for d in engine.generate(request("gpu-2", prompt=prompt, max_tokens=8, temperature=0))]
        assert "".join(d.text for d in again) == "".join(d.text for d in deltas)  # greedy is deterministic
        logprobs = (await engine.prompt_logprobs([tokenizer(prompt)["input_ids"]]))[0]
        assert logprobs[0] is None and all(lp <= 0 for lp in logprobs[1:])
        engine.check_health()
    finally:
        await engine.shutdown()
    leftover = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert all(_gone(pid) for pid in leftover)
