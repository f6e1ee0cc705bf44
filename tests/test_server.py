"""The OpenAI-compatible server end to end: the official `openai` client against a server this module
starts on loopback, serving the bundled nano model greedily. One server (one compile) for the module;
every request loop is bounded in count and time."""

import asyncio
import http.client
import json
import re
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from served import MODEL, client_for, metrics, nano_server

from kimi_jax import serve
from kimi_jax.sampling import SamplingParams
from kimi_jax.server.app import create_app
from kimi_jax.server.requests import parse_chat
from kimi_jax.server.service import Service, Settings
from kimi_jax.tools import builtin_tools

TOOLS = builtin_tools().specs()
ASK_CALC = [{"role": "user", "content": "What is 17*23?"}]
HELLO = [{"role": "user", "content": "Hello, how are you?"}]
MARKERS = ("<|", "|>", "<think>", "</think>", "[EOS]")


@pytest.fixture(scope="module")
def server():
    with nano_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return client_for(server, timeout=120)


def post(server, path, body: bytes, headers=None):
    """(status, parsed JSON) of a raw POST: for bodies the openai client would never send."""
    request = urllib.request.Request(server.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def as_dict(message) -> dict:
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()]
    return {"content": message.content or "", "reasoning_content": getattr(message, "reasoning_content", None),
            "tool_calls": calls}


def reassemble(stream) -> tuple[dict, str, object]:
    """(message, finish_reason, usage) from streamed chunks, as a client accumulates them."""
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for part in delta.tool_calls or ():
                slot = calls.setdefault(part.index, {"id": None, "name": None, "arguments": ""})
                slot["id"] = part.id or slot["id"]
                slot["name"] = (part.function.name if part.function else None) or slot["name"]
                slot["arguments"] += (part.function.arguments if part.function else None) or ""
            finish = choice.finish_reason or finish
    message = {"content": content, "reasoning_content": reasoning or None, "tool_calls": [calls[i] for i in sorted(calls)]}
    return message, finish, usage


def assert_clean(message: dict):
    for text in (message["content"], message["reasoning_content"] or ""):
        assert not [m for m in MARKERS if m in text], text


# ---- endpoints ------------------------------------------------------------------------------------

def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "# TYPE kimi_jax_slots_busy gauge" in text and "kimi_jax_prefix_cache_hit_rate " in text
    types = dict(re.findall(r"^# TYPE kimi_jax_(\w+) (\w+)$", text, re.MULTILINE))
    assert types["requests_finished"] == types["generated_tokens"] == "counter"
    assert set(types) == set(metrics(server)) and "untyped" not in types.values(), types
    assert {"slots_busy", "slots_total", "queue_len", "pages_used", "pages_total", "prefix_cache_hit_rate",
            "tokens_per_second"} <= set(metrics(server))


def test_chat_returns_reasoning_and_a_call_with_a_k2_id(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_CALC, tools=TOOLS, max_tokens=80)
    message = as_dict(r.choices[0].message)
    assert r.choices[0].finish_reason == "tool_calls"
    assert [(c["id"], c["name"]) for c in message["tool_calls"]] == [("functions.calculator:0", "calculator")]
    assert json.loads(message["tool_calls"][0]["arguments"]) == {"expression": "17*23"}
    assert message["reasoning_content"] and r.choices[0].message.content is None
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens_details.cached_tokens >= 0
    assert_clean(message)


@pytest.mark.parametrize("messages, tool_choice", [
    (ASK_CALC, "auto"), (HELLO, "auto"), (HELLO, {"type": "function", "function": {"name": "kv_list"}}),
])
def test_streamed_chat_reassembled_by_the_client_equals_the_whole_response(client, messages, tool_choice):
    kw = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice, max_tokens=80)
    whole = client.chat.completions.create(**kw)
    streamed, finish, usage = reassemble(client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}))
    assert streamed == as_dict(whole.choices[0].message)
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert_clean(streamed)


def test_multi_turn_tool_exchange_keeps_reasoning_so_the_next_prompt_extends_the_last(server, client):
    service, engine = server.service, server.engine
    first = client.chat.completions.create(model=MODEL, messages=ASK_CALC, tools=TOOLS, max_tokens=80)
    reply = first.choices[0].message
    call = reply.tool_calls[0]
    history = ASK_CALC + [reply.model_dump(exclude_none=True),  # reasoning_content travels back as is
                          {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": 391})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=60)
    assert second.choices[0].finish_reason in ("stop", "tool_calls", "length")
    assert_clean(as_dict(second.choices[0].message))

    # The second prompt is the first prompt plus exactly the tokens generated for it, then the
    # tool result: nothing of the reasoning is lost, so a prefix cache serves all of it.
    prompt_of = lambda messages: service.chat(parse_chat({"messages": messages, "tools": TOOLS})).prompt_ids  # noqa: E731
    done = threading.Event()
    sampling = SamplingParams(max_new_tokens=80, stop_ids=service.stop_ids)
    request = engine.submit(prompt_of(ASK_CALC), sampling, lambda *a: a[2] and done.set())
    assert done.wait(60)
    turn = prompt_of(ASK_CALC) + request.tokens
    assert prompt_of(history)[:len(turn)] == turn
    # A later call in the conversation is numbered after the first.
    third = client.chat.completions.create(model=MODEL, tools=TOOLS, max_tokens=80, tool_choice={
        "type": "function", "function": {"name": "calculator"}}, messages=history)
    assert third.choices[0].message.tool_calls[0].id == "functions.calculator:1"


def test_a_second_request_sharing_the_system_and_tools_prefix_reports_it_cached(server, client):
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    before = metrics(server)
    a = client.chat.completions.create(model=MODEL, messages=[system, *ASK_CALC], tools=TOOLS, max_tokens=4)
    b = client.chat.completions.create(model=MODEL, messages=[system, *HELLO], tools=TOOLS, max_tokens=4)
    service = server.service
    ids = [service.chat(parse_chat({"messages": [system, m], "tools": TOOLS})).prompt_ids for m in (ASK_CALC[0], HELLO[0])]
    shared = next(i for i, (x, y) in enumerate(zip(*ids)) if x != y)
    page = server.service.engine.page_size
    assert b.usage.prompt_tokens_details.cached_tokens >= shared // page * page > 0
    after = metrics(server)
    # only the rest of the second prompt was prefilled
    assert after["cached_tokens"] - before["cached_tokens"] >= b.usage.prompt_tokens_details.cached_tokens
    assert a.usage.prompt_tokens == len(ids[0])


def _questions(n):
    return [[{"role": "user", "content": f"What is {3 + i}*{11 + 2 * i}?"}] for i in range(n)]


async def _stream_all(server, requests, watch=None):
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(messages):
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True)
        text, finish = "", None
        async for chunk in stream:
            for choice in chunk.choices:
                text += (choice.delta.content or "") + (getattr(choice.delta, "reasoning_content", None) or "")
                finish = choice.finish_reason or finish
        return text, finish

    tasks = [asyncio.ensure_future(one(m)) for m in requests]
    watcher = asyncio.ensure_future(watch(tasks)) if watch is not None else None
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    if watcher is not None:
        await watcher
    await client.close()
    return results


@pytest.mark.slow
def test_32_concurrent_streaming_clients_all_finish_with_their_solo_outputs(server, client):
    questions = _questions(16)
    solo = []
    for messages in questions:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
        m = r.choices[0].message
        solo.append(((getattr(m, "reasoning_content", None) or "") + (m.content or ""), r.choices[0].finish_reason))
    together = asyncio.run(_stream_all(server, questions + questions))  # 32 clients, each question twice
    assert together == solo + solo
    assert metrics(server)["slots_busy"] == 0 and metrics(server)["queue_len"] == 0


def test_concurrent_streams_are_decoded_together(server):
    questions = _questions(16)
    peak = {"busy": 0}

    async def watch(tasks):
        while not all(t.done() for t in tasks):
            peak["busy"] = max(peak["busy"], (await asyncio.to_thread(metrics, server))["slots_busy"])
            await asyncio.sleep(0.05)

    t0 = time.perf_counter()
    asyncio.run(_stream_all(server, questions[:1]))
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    asyncio.run(_stream_all(server, questions, watch))
    many = time.perf_counter() - t0
    assert peak["busy"] >= 2
    assert many < len(questions) * one / 1.5  # aggregate throughput at least 1.5x one stream's


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    before = metrics(server)
    # The nano model writes digits after these until max_tokens: the request would run for a long time.
    stream = client.completions.create(model=MODEL, prompt="12345678901234567890", max_tokens=900, stream=True)
    for n, _ in enumerate(stream):
        if n == 3:
            break
    assert metrics(server)["slots_busy"] == 1
    stream.close()
    deadline = time.monotonic() + 20
    while (m := metrics(server))["slots_busy"] or m["queue_len"]:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["requests_cancelled"] == before["requests_cancelled"] + 1
    assert m["generated_tokens"] - before["generated_tokens"] < 900


# ---- the other request fields --------------------------------------------------------------------

def test_tool_choice_none_answers_without_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK_CALC, tools=TOOLS, tool_choice="none", max_tokens=80)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"


def test_named_tool_choice_calls_exactly_that_function(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "kv_list"}})
    calls = r.choices[0].message.tool_calls
    assert [(c.id, c.function.name) for c in calls] == [("functions.kv_list:0", "kv_list")]
    assert r.choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_returns_only_declared_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, tools=TOOLS, tool_choice="required", max_tokens=80)
    names = [c.function.name for c in r.choices[0].message.tool_calls or ()]
    declared = {t["function"]["name"] for t in TOOLS}
    assert set(names) <= declared
    assert r.choices[0].finish_reason == ("tool_calls" if names else "stop")
    assert "functions." not in (r.choices[0].message.content or "")


def test_stop_strings_cut_the_text_and_the_token_count(client):
    kw = dict(model=MODEL, messages=ASK_CALC, tools=TOOLS, max_tokens=80)
    full = client.chat.completions.create(**kw)
    cut = client.chat.completions.create(**kw, stop=["calc", "never"])
    reasoning = full.choices[0].message.reasoning_content
    assert cut.choices[0].message.reasoning_content == reasoning[:reasoning.index("calc")]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.tool_calls is None
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    streamed, finish, _ = reassemble(client.chat.completions.create(**kw, stop=["calc"], stream=True))
    assert streamed == as_dict(cut.choices[0].message) and finish == "stop"


def test_max_tokens_and_max_completion_tokens_end_with_length(client):
    for kw in ({"max_tokens": 5}, {"max_completion_tokens": 5, "max_tokens": 50}):
        r = client.chat.completions.create(model=MODEL, messages=ASK_CALC, **kw)
        assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5)


def test_a_seed_repeats_a_sampled_answer(client):
    kw = dict(model=MODEL, messages=HELLO, temperature=1.0, top_p=0.9, seed=11, max_tokens=20)
    a, b = (client.chat.completions.create(**kw).choices[0].message for _ in range(2))
    assert as_dict(a) == as_dict(b)


def test_completions_stream_and_whole_agree_and_echo(server, client):
    kw = dict(model=MODEL, prompt="kelvin kelvin", max_tokens=6)
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == whole.choices[0].text and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(server.service.tokenizer.encode("kelvin kelvin"))
    echoed = client.completions.create(**kw, echo=True).choices[0].text
    assert echoed == "kelvin kelvin" + whole.choices[0].text


# ---- errors ---------------------------------------------------------------------------------------

GOOD = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
BAD = [
    ("missing_messages", {"model": MODEL}, 400, "messages"),
    ("empty_messages", {**GOOD, "messages": []}, 400, "messages"),
    ("unknown_role", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("max_tokens_zero", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("negative_temperature", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    ("top_p_above_one", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("prompt_longer_than_context", {**GOOD, "messages": [{"role": "user", "content": "x y " * 1500}]}, 400, None),
    ("unknown_tool_in_tool_choice", {**GOOD, "tools": TOOLS,
                                     "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}}, 400,
     "tool_choice"),
    ("n_above_one", {**GOOD, "n": 2}, 400, "n"),
    ("five_stop_strings", {**GOOD, "stop": list("abcde")}, 400, "stop"),
    ("image_input", {**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "messages[0].content[0].type"),
    ("max_tokens_over_the_cap", {**GOOD, "max_tokens": 5000}, 400, "max_tokens"),
    ("unknown_model", {**GOOD, "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_chat_requests_get_openai_errors(server, body, status, param):
    got, answer = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["param"] == param


def test_bodies_that_are_not_json_or_too_large_are_refused(server):
    status, answer = post(server, "/v1/chat/completions", b'{"messages": [')
    assert (status, answer["error"]["code"]) == (400, "invalid_json")
    # The size is refused from the header, before a byte of the body is read.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Length", str(9 << 20))
    conn.endheaders()
    response = conn.getresponse()
    assert (response.status, json.loads(response.read())["error"]["code"]) == (413, "request_too_large")
    conn.close()
    status, answer = post(server, "/v1/completions", json.dumps({"prompt": [1, 10 ** 9]}).encode())
    assert (status, answer["error"]["param"]) == (400, "prompt")
    status, answer = post(server, "/v1/completions", json.dumps({"prompt": [1] * 1024}).encode())
    assert (status, answer["error"]["code"]) == (400, "context_length_exceeded")  # --max-len 1024
    status, answer = post(server, "/v1/nothing", b"{}")
    assert status == 404 and answer["error"]["code"] == "not_found"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url + "/v1/chat/completions", timeout=10)  # a GET
    assert e.value.code == 405 and "GET is not allowed" in json.loads(e.value.read())["error"]["message"]


def test_the_client_sees_errors_as_its_own_exceptions_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    r = client.chat.completions.create(**GOOD)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_with_an_api_key_every_request_needs_the_bearer_token(server):
    service = server.service
    keyed = Service(service.runtime, server.engine, Settings(model_name=MODEL, max_tokens=64, api_key="s3cret"))
    with serve.BackgroundServer(create_app(keyed)) as srv:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            status, answer = post(srv, "/v1/chat/completions", json.dumps(GOOD).encode(), headers)
            assert (status, answer["error"]["code"]) == (401, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(**GOOD).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent"], "checkpoint directory '/nonexistent' not found"),
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
])
def test_the_command_line_reports_bad_flags_in_one_line(capsys, argv, message):
    assert serve.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
