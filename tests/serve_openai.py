"""`edgelm serve` through the official `openai` Python client (and raw HTTP where the client
cannot express the request). Run by tests/serve.rs:

    serve_openai.py BASE_URL API_KEY MODEL N_CTX SESSION_DIR

Exits non-zero if any check fails; prints one line per check.
"""

import base64
import http.client
import json
import math
import os
import struct
import sys
import threading
import time
import urllib.parse

import openai
from openai import OpenAI

from checks import check, main

BASE, KEY, MODEL, N_CTX = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SESSION_DIR = sys.argv[5]
URL = urllib.parse.urlparse(BASE)
# No retries: a 429 must reach the test, not be retried away.
client = OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=300)

def raw(method, path, body=None, headers=None, key=KEY):
    """One HTTP request on its own connection: (status, headers, body bytes)."""
    conn = http.client.HTTPConnection(URL.hostname, URL.port, timeout=300)
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    h.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def error_of(body):
    """The `error` object of an OpenAI-shaped error body (all four keys present)."""
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert isinstance(e["message"], str) and e["message"], e
    return e


def metrics():
    """`/metrics` as {name or name{labels}: value}."""
    status, _, body = raw("GET", "/metrics")
    assert status == 200, status
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_until_idle(timeout=60):
    """Poll /metrics until no sequence runs, none waits and no KV block is held."""
    deadline = time.time() + timeout
    while True:
        m = metrics()
        if (
            m["edgelm_sequences_running"] == 0
            and m["edgelm_requests_waiting"] == 0
            and m["edgelm_kv_blocks_used"] == 0
        ):
            return m
        assert time.time() < deadline, f"server still busy after {timeout}s: {m}"
        time.sleep(0.1)


def sse_events(path, body):
    """POST a streaming request; the parsed `data:` payloads, "[DONE]" kept as a string."""
    status, headers, data = raw("POST", path, json.dumps(body))
    assert status == 200, (status, data)
    assert headers["content-type"].startswith("text/event-stream"), headers
    events = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat(content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )


def expect_error(exc_type, status, code, fn):
    try:
        fn()
    except exc_type as e:
        assert e.status_code == status, (e.status_code, e)
        assert e.code == code, (e.code, e.body)
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


@check
def models_list():
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL], ids
    assert client.models.retrieve(MODEL).id == MODEL
    expect_error(openai.NotFoundError, 404, "model_not_found", lambda: client.models.retrieve("nope"))


@check
def chat_non_streaming():
    r = chat("Name a colour.")
    c = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert c.message.role == "assistant" and c.message.content, c
    assert c.finish_reason in ("stop", "length"), c.finish_reason
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, u
    assert 0 < u.completion_tokens <= 8, u
    # Content given as text parts renders as the same prompt.
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]
    r2 = chat(parts)
    assert r2.choices[0].message.content == c.message.content
    # The prompt's full blocks came from the prefix cache the second time.
    assert r2.usage.prompt_tokens == u.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens > 0, r2.usage


@check
def chat_streaming_without_usage():
    whole = chat("Count to five.", max_tokens=10).choices[0].message.content
    chunks = list(chat("Count to five.", max_tokens=10, stream=True))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert all(ch.usage is None and len(ch.choices) == 1 for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == whole, (text, whole)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Raw: no `usage` key at all, and the stream ends with [DONE].
    events = sse_events("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])


@check
def chat_streaming_with_usage():
    chunks = list(chat("Count to five.", max_tokens=10, stream=True,
                       stream_options={"include_usage": True}))
    *body, last = chunks
    assert all(ch.usage is None and len(ch.choices) == 1 for ch in body)
    assert last.choices == [] and last.usage is not None, last
    n = sum(1 for ch in body if ch.choices[0].delta.content)
    assert 0 < last.usage.completion_tokens <= 10
    assert n <= last.usage.completion_tokens, (n, last.usage)
    events = sse_events("/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert all("usage" in e and e["usage"] is None for e in events[:-2])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] > 0


@check
def several_choices():
    r = chat("Write a word.", n=2, temperature=1.0, seed=7, max_tokens=6)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.completion_tokens <= 12
    # The same seed gives the same choices.
    again = chat("Write a word.", n=2, temperature=1.0, seed=7, max_tokens=6)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    chunks = list(chat("Write a word.", n=2, temperature=1.0, seed=7, max_tokens=6, stream=True))
    finished = {ch.choices[0].index for ch in chunks if ch.choices[0].finish_reason}
    assert finished == {0, 1}, finished
    texts = ["", ""]
    for ch in chunks:
        texts[ch.choices[0].index] += ch.choices[0].delta.content or ""
    assert texts == [c.message.content for c in r.choices], texts


@check
def chat_logprobs():
    r = chat("Say hello.", max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
    for e in content:
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(t <= 0 for t in tops), tops
        # Greedy: the chosen token is the likeliest.
        assert e.token == e.top_logprobs[0].token and abs(e.logprob - tops[0]) < 1e-5, e
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    text = b"".join(bytes(e.bytes) for e in content).decode()
    assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
    chunks = list(chat("Say hello.", max_tokens=6, logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for ch in chunks if ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)


@check
def completion_echo_logprobs():
    prompt = "def fibonacci(n):"
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2,
                                  max_tokens=1, temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion"
    assert c.text.startswith(prompt) and len(c.text) > len(prompt), c.text
    lp = c.logprobs
    n = r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:]), lp.top_logprobs
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens) == c.text, (lp.tokens, c.text)
    assert c.finish_reason == "length"
    # Token-id prompts work too, and without echo only the completion comes back.
    ids = [750, 75698]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == 2 and r.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4


@check
def stop_strings_and_logit_bias():
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20,
                                  temperature=0, stop=[" 7", "\n\n"])
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text.startswith(" 5, 6,"), c
    assert "7" not in c.text, c.text
    # Token 15 is "0" in Qwen's byte-level vocabulary; +100 makes it the only choice.
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=1, temperature=0,
                                  logit_bias={"15": 100})
    assert r.choices[0].text == "0", r.choices[0].text


@check
def client_mistakes():
    expect_error(openai.NotFoundError, 404, "model_not_found",
                 lambda: client.chat.completions.create(
                     model="gpt-4o", messages=[{"role": "user", "content": "hi"}]))
    expect_error(openai.NotFoundError, 404, "model_not_found",
                 lambda: client.completions.create(model="gpt-4o", prompt="hi"))
    e = expect_error(openai.BadRequestError, 400, "context_length_exceeded",
                     lambda: chat("hello " * (N_CTX + 100)))
    numbers = [int(w) for w in e.message.replace(",", " ").split() if w.isdigit()]
    assert N_CTX in numbers and any(x > N_CTX for x in numbers), e.message
    e = expect_error(openai.BadRequestError, 400, "context_length_exceeded",
                     lambda: client.completions.create(model=MODEL, prompt=[1] * (N_CTX + 5)))
    # A prompt that fits, with more to generate than the context leaves: refused, not cut.
    e = expect_error(openai.BadRequestError, 400, "context_length_exceeded",
                     lambda: chat("hi", max_tokens=N_CTX))
    assert e.param == "max_tokens" and str(N_CTX) in e.message, e.body
    e = expect_error(openai.BadRequestError, 400, None, lambda: chat("hi", temperature="hot"))
    assert e.param == "temperature", e.body
    e = expect_error(openai.BadRequestError, 400, None, lambda: chat("hi", logit_bias={"x": 1}))
    assert e.param == "logit_bias", e.body
    e = expect_error(openai.BadRequestError, 400, None, lambda: client.chat.completions.create(
        model=MODEL, messages=[]))
    assert e.param == "messages"
    wrong = OpenAI(base_url=BASE + "/v1", api_key="wrong-key", max_retries=0)
    expect_error(openai.AuthenticationError, 401, "invalid_api_key", lambda: wrong.models.list())


@check
def raw_http_errors():
    status, _, body = raw("POST", "/v1/chat/completions", b"{not json")
    assert status == 400, status
    assert error_of(body)["type"] == "invalid_request_error"
    status, _, body = raw("POST", "/v1/completions", b'{"prompt": 5}')
    assert status == 400 and error_of(body)["param"] == "prompt"
    status, _, body = raw("POST", "/v1/completions", b"x" * (9 << 20))
    assert status == 413, status
    assert error_of(body)["code"] == "request_too_large"
    status, headers, body = raw("GET", "/v1/chat/completions")
    assert status == 405 and error_of(body)["code"] == "method_not_allowed", status
    assert headers.get("allow") == "POST", headers
    status, _, body = raw("GET", "/v1/nothing-here")
    assert status == 404 and error_of(body)["code"] == "not_found"
    status, _, body = raw("GET", "/v1/models", key=None)
    assert status == 401 and error_of(body)["code"] == "invalid_api_key"
    status, _, body = raw("GET", "/health", key=None)
    assert status == 200 and json.loads(body) == {"status": "ok"}


@check
def openapi_matches_routes():
    status, _, body = raw("GET", "/openapi.json")
    assert status == 200
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.")
    for path, ops in doc["paths"].items():
        for method in ops:
            status, _, _ = raw(method.upper(), path.replace("{model}", MODEL),
                               b"{}" if method == "post" else None)
            # Every described route exists; an empty body is the client's mistake.
            assert status == (400 if method == "post" else 200), (method, path, status)


@check
def disconnect_frees_blocks():
    wait_until_idle()
    stream = chat("Write a long story about a lighthouse.", max_tokens=900, stream=True,
                  extra_body={"ignore_eos": True})
    got = 0
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            got += 1
            if got == 3:
                break
    m = metrics()
    assert m["edgelm_sequences_running"] == 1 and m["edgelm_kv_blocks_used"] > 0, m
    stream.close()
    m = wait_until_idle(timeout=30)
    assert m["edgelm_kv_blocks_free"] == m["edgelm_kv_blocks_total"], m


@check
def queue_full_is_429():
    """4 running and 16 waiting streams fill the server; the next request is refused with
    429 and Retry-After; closing the streams cancels them all."""
    wait_until_idle()
    # ignore_eos (an extension) keeps every stream going until it is closed.
    streams = [chat(f"Tell story number {i}.", max_tokens=900, stream=True,
                    extra_body={"ignore_eos": True}) for i in range(20)]
    try:
        # The engine publishes its figures after each step, so they may lag one step.
        deadline = time.time() + 30
        while True:
            m = metrics()
            running, waiting = m["edgelm_sequences_running"], m["edgelm_requests_waiting"]
            if (running, waiting) == (4, 16):
                break
            assert running <= 4 and waiting <= 16, m
            assert time.time() < deadline, m
            time.sleep(0.05)
        e = expect_error(openai.RateLimitError, 429, "queue_full", lambda: chat("one more"))
        assert e.response.headers.get("retry-after") == "1", e.response.headers
    finally:
        for s in streams:
            s.close()
    wait_until_idle(timeout=60)


@check
def concurrent_greedy_streams_match_alone():
    prompts = [f"List {k} fruits." for k in range(2, 10)]

    def run(p):
        chunks = chat(p, max_tokens=12, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    alone = [run(p) for p in prompts]
    together = [None] * len(prompts)

    def worker(i):
        together[i] = run(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p, a, t in zip(prompts, alone, together):
        assert a == t, f"{p!r}: alone {a!r}, concurrent {t!r}"


@check
def multi_turn_prefills_only_new_tokens():
    """Six turns of one conversation: each prefills its new message plus at most one block of
    the conversation so far (16 positions); the rest is reused, as usage and /metrics say."""
    system = {"role": "system", "content": "You are terse. Answer in at most five words."}
    messages = [system]
    questions = ["Name a fruit.", "Name a city.", "Name a tree.", "Name a metal.",
                 "Name a river.", "Say goodbye."]
    before = metrics()["edgelm_reused_tokens_total"]
    prev_total, reused_sum = None, 0
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                           max_tokens=12)
        u = r.usage
        cached = u.prompt_tokens_details.cached_tokens
        if prev_total is not None:
            new = u.prompt_tokens - prev_total
            assert u.prompt_tokens - cached <= new + 16, (i, u, new)
        reused_sum += cached
        prev_total = u.prompt_tokens + u.completion_tokens
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    after = metrics()["edgelm_reused_tokens_total"]
    assert after - before == reused_sum, (before, after, reused_sum)


EMBED_TEXTS = ["The cat sat on the mat.", "A cat was sitting on the mat.",
               "Quarterly revenue rose 5% on strong sales."]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


@check
def embeddings_vectors():
    """Three texts: unit vectors of the model's width, similar sentences closer than unrelated;
    the client's default (base64, decoded by the client), explicit floats, explicit base64 and a
    single string all give the same vectors."""
    r = client.embeddings.create(model=MODEL, input=EMBED_TEXTS)
    assert r.object == "list" and r.model == MODEL, r
    assert [d.index for d in r.data] == [0, 1, 2] and all(d.object == "embedding" for d in r.data)
    vs = [d.embedding for d in r.data]
    assert [len(v) for v in vs] == [896] * 3, [len(v) for v in vs]
    for v in vs:
        assert abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4, v[:4]
    similar, unrelated = cosine(vs[0], vs[1]), cosine(vs[0], vs[2])
    print(f"     embeddings: cosine similar {similar:.4f}, unrelated {unrelated:.4f}")
    assert similar > unrelated + 0.05, (similar, unrelated)
    assert 0 < r.usage.prompt_tokens == r.usage.total_tokens, r.usage

    floats = client.embeddings.create(model=MODEL, input=EMBED_TEXTS, encoding_format="float")
    for a, b in zip(floats.data, vs):
        assert isinstance(a.embedding, list) and max_diff(a.embedding, b) < 1e-5
    b64 = client.embeddings.create(model=MODEL, input=EMBED_TEXTS, encoding_format="base64")
    for a, b in zip(b64.data, floats.data):
        assert isinstance(a.embedding, str), type(a.embedding)
        raw_bytes = base64.b64decode(a.embedding)
        decoded = struct.unpack(f"<{len(raw_bytes) // 4}f", raw_bytes)
        assert len(decoded) == 896 and max_diff(decoded, b.embedding) < 1e-5
    one = client.embeddings.create(model=MODEL, input=EMBED_TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and max_diff(one.data[0].embedding, vs[0]) < 1e-5
    ids = client.embeddings.create(model=MODEL, input=[[785, 8251], [785]],
                                   encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 3, ids.usage


@check
def embeddings_mistakes():
    e = expect_error(openai.BadRequestError, 400, None,
                     lambda: client.embeddings.create(model=MODEL, input=[]))
    assert e.param == "input", e.body
    e = expect_error(openai.BadRequestError, 400, None,
                     lambda: client.embeddings.create(model=MODEL, input=["a", ""]))
    assert e.param == "input", e.body
    e = expect_error(openai.BadRequestError, 400, None,
                     lambda: client.embeddings.create(model=MODEL, input="x", dimensions=64))
    assert e.param == "dimensions", e.body
    expect_error(openai.BadRequestError, 400, "context_length_exceeded",
                 lambda: client.embeddings.create(model=MODEL, input="hello " * (N_CTX + 100)))
    expect_error(openai.NotFoundError, 404, "model_not_found",
                 lambda: client.embeddings.create(model="text-embedding-3-small", input="x"))


@check
def sessions_save_and_restore():
    conv = [{"role": "system", "content": "You are a patient teacher of programming. " * 12},
            {"role": "user", "content": "Explain recursion in one sentence."}]
    r = client.chat.completions.create(model=MODEL, messages=conv, max_tokens=8, temperature=0)
    conv.append({"role": "assistant", "content": r.choices[0].message.content})
    st, _, body = raw("POST", "/v1/sessions/teacher?action=save", json.dumps({"messages": conv}))
    assert st == 200, body
    saved = json.loads(body)
    assert saved["action"] == "save" and saved["tokens"] >= r.usage.prompt_tokens - 16, saved
    path = os.path.join(SESSION_DIR, "teacher.kv")
    assert os.path.getsize(path) > 0
    st, _, body = raw("POST", "/v1/sessions/teacher?action=restore")
    assert st == 200 and json.loads(body)["tokens"] == saved["tokens"], body
    # Mistakes and bad files: 4xx in OpenAI's shape, and a refused file is left as it was.
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x20
    with open(os.path.join(SESSION_DIR, "damaged.kv"), "wb") as f:
        f.write(data)
    for path_q, body, status, needle in [
        ("/v1/sessions/nobody?action=restore", None, 404, "no session"),
        ("/v1/sessions/damaged?action=restore", None, 400, "damaged"),
        ("/v1/sessions/teacher?action=fly", "{}", 400, "action"),
        ("/v1/sessions/teacher", "{}", 400, "action"),
        ("/v1/sessions/.hidden?action=save", json.dumps({"prompt": "x"}), 400, "name"),
        ("/v1/sessions/teacher?action=save", "{}", 400, "messages"),
        ("/v1/sessions/teacher?action=save", "not json", 400, ""),
    ]:
        st, _, b = raw("POST", path_q, body)
        assert st == status, (path_q, st, b)
        assert needle in error_of(b)["message"], (path_q, b)
    with open(os.path.join(SESSION_DIR, "damaged.kv"), "rb") as f:
        assert f.read() == bytes(data)


if __name__ == "__main__":
    main()
