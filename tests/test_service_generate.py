"""OpenAI-compatible generation (/v1/completions, /v1/chat/completions) over a real uvicorn server on
127.0.0.1, from tiny random-weight causal LMs in the store: the encoder and LM slots, greedy output
equal to the in-process decode loop, streaming equal to non-streaming, seeds, stop strings, the chat
template, every limit (422 / 429), cancellation on disconnect, /metrics, and no 500 for bad input."""

from __future__ import annotations

import json
import time

import httpx
import pytest

import lowbit
from lowbit.service.generate import SamplingParams, chat_prompt, encode_prompt, generate
from lowbit.service.limits import Limits

from _tiny_hf import tiny_folder
from service_support import AUTH, running_service

pytestmark = pytest.mark.usefixtures("one_thread")

LIMITS = Limits(max_tokens=48, max_prompt_tokens=40, max_generations=1)
LM_ID, CHAT_ID = "tiny-lm", "tiny-chat"
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}<s>assistant"
WAIT_S = 30.0  # generous deadline for a server-side event on a loaded machine (not a speed assert)
SLOW_STEP_S = 0.05  # a forward hook sleeps this long per token, so a generation outlives a disconnect


def _words(tokenizer, n: int) -> list[str]:
    """``n`` real words of the tiny word-level vocabulary (special tokens excluded)."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha())
    return vocab[:n]


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory):
    from lowbit.models.hf import load_hf

    root = tmp_path_factory.mktemp("gen")
    model = load_hf(str(tiny_folder("llama", root / "hf")))
    store = root / "store"
    lowbit.save(model, store / LM_ID)
    model.tokenizer.chat_template = CHAT_TEMPLATE
    lowbit.save(model, store / CHAT_ID)
    model.tokenizer.chat_template = None
    with running_service(store, limits=LIMITS, register_default=False) as (service, url):
        with httpx.Client(base_url=url, timeout=120) as client:
            yield service, client, model


@pytest.fixture()
def lm_active(lm_server):
    service, client, model = lm_server
    cur = service.active_lm.current()
    if cur is None or cur.model_id != LM_ID:
        assert client.post(f"/models/{LM_ID}/activate", headers=AUTH).status_code == 200
    return lm_server


def _complete(client, **body):
    return client.post("/v1/completions", json={"temperature": 0, **body})


def _sse(client, path: str, body: dict) -> list[dict | str]:
    out = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- slots --------------------------------------------------------------------------------------

def test_no_active_lm_is_a_503_with_a_message(lm_server):
    service, client, _ = lm_server
    assert service.active_lm.current() is None
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = client.post(path, json=body)
        assert r.status_code == 503 and "no causal LM is active" in r.json()["detail"]


def test_lm_activates_into_its_own_slot_and_is_recorded(lm_server):
    service, client, _ = lm_server
    r = client.post(f"/models/{LM_ID}/activate", headers=AUTH)
    assert r.status_code == 200
    active = client.get("/models/active").json()
    assert active["lm"]["id"] == LM_ID and active["lm"]["task"] == "causal-lm"
    assert active["lm"]["kv_cache"] == "int8"  # the quantized KV cache runs on a Llama
    assert active["id"] is None  # no encoder in this store: the encoder slot stays empty
    assert json.loads((service.store.root / ".active.json").read_text()) == {"lm": LM_ID}
    listed = {m["id"]: m["active"] for m in client.get("/models").json()["models"]}
    assert listed == {LM_ID: True, CHAT_ID: False}
    assert client.post(f"/models/{LM_ID}/activate").status_code == 401  # same key rule as every swap
    # a quantize job may not overwrite the served LM
    r = client.post(f"/models/{CHAT_ID}/quantize", headers=AUTH,
                    json={"scheme": "w8a8-dynamic", "target_id": LM_ID, "overwrite": True})
    assert r.status_code == 409 and "active" in r.json()["detail"]


# ---- what is generated --------------------------------------------------------------------------

def test_greedy_completion_equals_the_in_process_decode_loop(lm_active):
    service, client, model = lm_active
    prompt = " ".join(_words(model.tokenizer, 5))
    r = _complete(client, prompt=prompt, max_tokens=12)
    assert r.status_code == 200, r.text
    body = r.json()
    ids = encode_prompt(model.tokenizer, prompt, False)
    want = generate(model, ids, SamplingParams(max_tokens=12), "int8")
    assert body["object"] == "text_completion" and body["model"] == LM_ID
    assert body["choices"][0]["text"] == want.text and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12, "total_tokens": len(ids) + 12}


def test_every_kv_choice_generates_and_the_cli_offers_each(lm_active):
    """The rotated KV caches (-rot) serve generations like the others, and `lowbit serve --kv-cache`
    offers exactly the service's choices."""
    from lowbit.cli.serve import KVCache
    from lowbit.service.generate import KV_CHOICES

    _, _, model = lm_active
    assert {k.value for k in KVCache} == set(KV_CHOICES)
    assert {"int8-rot", "int4-rot", "int2-rot"} <= set(KV_CHOICES)  # ModelService validates against these
    ids = encode_prompt(model.tokenizer, " ".join(_words(model.tokenizer, 5)), False)
    for kv in ("int8-rot", "int4-rot"):
        got = generate(model, ids, SamplingParams(max_tokens=6), kv)
        assert got.completion_tokens == 6 and got.finish_reason == "length", kv


def test_streaming_gives_the_same_text_as_json(lm_active):
    _, client, model = lm_active
    prompt = " ".join(_words(model.tokenizer, 4))
    whole = _complete(client, prompt=prompt, max_tokens=10).json()["choices"][0]["text"]
    events = _sse(client, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True,
                                              "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert events[-2]["usage"]["completion_tokens"] == 10
    chat = _sse(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                                                 "temperature": 0, "stream": True})
    assert chat[0]["choices"][0]["delta"]["role"] == "assistant" and chat[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in chat[:-1])
    assert text == client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                             "max_tokens": 6, "temperature": 0}
                               ).json()["choices"][0]["message"]["content"]


def test_sampling_is_reproducible_with_a_seed(lm_active):
    _, client, model = lm_active
    prompt = " ".join(_words(model.tokenizer, 3))
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 1.5, "top_p": 0.95}
    a = _complete(client, **body, seed=7).json()["choices"][0]["text"]
    assert a == _complete(client, **body, seed=7).json()["choices"][0]["text"]
    others = {_complete(client, **body, seed=s).json()["choices"][0]["text"] for s in (8, 9, 10)}
    assert others - {a}, "three other seeds all reproduced seed 7's sample"


def test_stop_string_ends_the_generation_before_it(lm_active):
    _, client, model = lm_active
    prompt = " ".join(_words(model.tokenizer, 5))
    full = _complete(client, prompt=prompt, max_tokens=12).json()["choices"][0]["text"]
    stop = full.split()[2]
    cut = _complete(client, prompt=prompt, max_tokens=12, stop=[stop]).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(stop)]
    streamed = _sse(client, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                "stop": stop, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == cut["text"]


def test_chat_uses_the_template_when_the_tokenizer_has_one(lm_server):
    service, client, model = lm_server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": _words(model.tokenizer, 1)[0]}]
    body = {"messages": messages, "max_tokens": 2, "temperature": 0}
    assert client.post(f"/models/{LM_ID}/activate", headers=AUTH).status_code == 200
    plain = client.post("/v1/chat/completions", json=body).json()
    text, templated = chat_prompt(model.tokenizer, messages)  # this tokenizer has no template
    assert not templated and text == "system: be brief\nuser: " + messages[1]["content"] + "\nassistant:"
    assert plain["usage"]["prompt_tokens"] == len(encode_prompt(model.tokenizer, text, False))
    assert client.post(f"/models/{CHAT_ID}/activate", headers=AUTH).status_code == 200
    chat_model = service.active_lm.current().model
    text, templated = chat_prompt(chat_model.tokenizer, messages)
    assert templated and text.startswith("<s>system be brief</s>")
    templ = client.post("/v1/chat/completions", json=body).json()
    assert templ["model"] == CHAT_ID
    assert templ["usage"]["prompt_tokens"] == len(encode_prompt(chat_model.tokenizer, text, True))
    assert client.post(f"/models/{LM_ID}/activate", headers=AUTH).status_code == 200


# ---- limits -------------------------------------------------------------------------------------

def test_token_limits_at_their_boundary(lm_active):
    _, client, model = lm_active
    words = _words(model.tokenizer, 200)
    assert _complete(client, prompt="a", max_tokens=LIMITS.max_tokens).status_code == 200
    r = _complete(client, prompt="a", max_tokens=LIMITS.max_tokens + 1)
    assert r.status_code == 422 and f"limit of {LIMITS.max_tokens}" in r.json()["detail"]
    specials = len(encode_prompt(model.tokenizer, words[0], False)) - 1  # tokens the tokenizer adds (BOS)
    ok = " ".join(words[: LIMITS.max_prompt_tokens - specials])  # one token per word
    n = len(encode_prompt(model.tokenizer, ok, False))
    assert n == LIMITS.max_prompt_tokens
    assert _complete(client, prompt=ok, max_tokens=1).status_code == 200
    r = _complete(client, prompt=ok + " " + words[-1], max_tokens=1)
    assert r.status_code == 422 and f"limit is {LIMITS.max_prompt_tokens} tokens" in r.json()["detail"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": " ".join(words)}]})
    assert r.status_code == 422 and "prompt has" in r.json()["detail"]


def test_concurrent_generations_over_the_limit_get_429_and_disconnect_frees_the_slot(lm_active):
    service, client, model = lm_active
    hook = service.active_lm.current().model.lm.register_forward_hook(lambda *a: time.sleep(SLOW_STEP_S))
    try:
        before = service.metrics.generations.value(endpoint="completions", finish_reason="cancelled")
        with httpx.Client(base_url=str(client.base_url), timeout=WAIT_S) as other:
            with other.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": LIMITS.max_tokens,
                                                               "stream": True}) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first token arrived: the generation holds the only slot
                busy = _complete(client, prompt="a", max_tokens=1)
                assert busy.status_code == 429 and "limit 1" in busy.json()["detail"]
                assert busy.headers["retry-after"] == "1"
            # the stream is closed after one token of 48: the loop stops, the slot is freed
        end = time.monotonic() + WAIT_S
        while service.generations.active and time.monotonic() < end:
            time.sleep(0.02)
        assert service.generations.active == 0
        assert service.metrics.generations.value(endpoint="completions", finish_reason="cancelled") == before + 1
        # a non-streaming client that gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{client.base_url}/v1/completions", json={"prompt": "a", "max_tokens": LIMITS.max_tokens},
                       timeout=SLOW_STEP_S * 5)
        end = time.monotonic() + WAIT_S
        while service.metrics.generations.value(endpoint="completions", finish_reason="cancelled") < before + 2:
            assert time.monotonic() < end, "the abandoned generation was not cancelled"
            time.sleep(0.02)
    finally:
        hook.remove()
    assert _complete(client, prompt="a", max_tokens=1).status_code == 200


def test_metrics_count_generated_tokens_with_bounded_labels(lm_active):
    _, client, _ = lm_active
    _complete(client, prompt="a", max_tokens=3)
    text = client.get("/metrics").text
    lines = [ln for ln in text.splitlines() if ln.startswith("lowbit_generated_tokens_total")]
    assert lines and all('endpoint="completions"' in ln or 'endpoint="chat"' in ln for ln in lines)
    assert "lowbit_generation_tokens_per_second_count" in text and 'lowbit_active_lm_info{id="tiny-lm"' in text


BAD_BODIES = [
    ("/v1/completions", b"not json"),
    ("/v1/completions", {"prompt": 5}),
    ("/v1/completions", {"prompt": ["a", "b"]}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}),
    ("/v1/completions", {"prompt": "a", "max_tokens": "many"}),
    ("/v1/completions", {"prompt": "a", "temperature": -1}),
    ("/v1/completions", b'{"prompt": "a", "temperature": 1e309}'),
    ("/v1/completions", b'{"prompt": "a", "temperature": NaN}'),
    ("/v1/completions", {"prompt": "a", "top_p": 0}),
    ("/v1/completions", {"prompt": "a", "seed": -1}),
    ("/v1/completions", {"prompt": "a", "seed": 2**80}),
    ("/v1/completions", {"prompt": "a", "n": 2}),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"prompt": "a", "stop": ""}),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"1": 5}}),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 1.0}),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True, "x": 1}}),
    ("/v1/completions", b'{"prompt": "\\ud800"}'),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 10**6}),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
]


@pytest.mark.parametrize("path,body", BAD_BODIES, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _) in enumerate(BAD_BODIES)])
def test_bad_generation_input_is_a_4xx_with_a_message(lm_active, path, body):
    _, client, _ = lm_active
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["detail"]


def test_activating_an_unknown_id_is_a_404(lm_server):
    _, client, _ = lm_server
    r = client.post("/models/no-such-lm/activate", headers=AUTH)
    assert r.status_code == 404 and "no model 'no-such-lm'" in r.json()["detail"]


FUZZ_EXAMPLES = 10  # per generation operation and mode: 40 requests to a tiny model, bounded time


def test_schemathesis_generation_never_5xx(lm_active):
    """Positive and negative cases for the two generation operations of /openapi.json: no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    service, client, _ = lm_active
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
    base_url = str(client.base_url).rstrip("/")
    failures, statuses = [], set()
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if op.path in ("/v1/completions", "/v1/chat/completions")]
    assert len(ops) == 2
    for op in ops:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                r = case.call(base_url=base_url, timeout=120)
                statuses.add(r.status_code)
                if r.status_code >= 500:
                    failures.append((op.label, mode.value, r.status_code, r.text[:300]))

            run()
    assert failures == [], failures[:5]
    assert 200 in statuses and 422 in statuses, statuses
    assert service.metrics.unexpected.value(type="RuntimeError") == 0


def test_sampling_edges_tiny_temperature_and_top_p_fall_back_to_the_argmax():
    import torch

    from lowbit.service.generate import next_token

    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    g = torch.Generator().manual_seed(0)
    for t in (1e-300, 5e-324, 1e-6):  # logits / t overflowed to inf/inf = nan before the max was subtracted
        assert next_token(logits, SamplingParams(max_tokens=1, temperature=t), g) == 1
    assert {next_token(logits, SamplingParams(max_tokens=1, temperature=2.0, top_p=1e-9), g) for _ in range(20)} == {1}
    seen = {next_token(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9), g) for _ in range(200)}
    assert seen == {1, 3}  # p(1) = 0.499 < 0.9 <= p(1) + p(3) = 0.950: the nucleus is those two


def test_decode_loop_equals_transformers_greedy_generate(lm_server):
    """The hand loop (prefill + one token at a time through a plain cache) picks the same tokens as
    transformers' own greedy ``generate`` on the same model."""
    import torch

    _, _, model = lm_server
    ids = encode_prompt(model.tokenizer, " ".join(_words(model.tokenizer, 6)), False)
    with torch.inference_mode():
        out = model.lm.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                pad_token_id=model.tokenizer.pad_token_id)  # (1, T + new)
    want = model.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    got = generate(model, ids, SamplingParams(max_tokens=12), "none")
    assert got.text == want and got.completion_tokens == out.shape[1] - len(ids)


def test_per_layer_error_of_a_quantized_lm_orders_bit_widths(lm_server):
    """The quantize job's per-layer record (the operator page's chart): every quantized layer of a causal
    LM, 8-bit weights closer to the source than 4-bit ones at every layer."""
    import copy

    from lowbit.config import build_config
    from lowbit.service.quantize_job import layer_errors

    _, _, model = lm_server
    db = {}
    for bits in (4, 8):
        q = copy.deepcopy(model)
        lowbit.quantize(q, build_config("rtn", {"bits": bits, "group_size": 32}))
        db[bits] = layer_errors(q, model)
    assert db[4] and db[4].keys() == db[8].keys()
    assert all(db[8][k] > db[4][k] > 0 for k in db[4]), (db[4], db[8])
    assert layer_errors(copy.deepcopy(model), model) == {}  # nothing quantized: nothing to chart


def _w4(model):
    import copy

    from lowbit.algorithms.rtn import WeightOnlyConfig

    return lowbit.quantize(copy.deepcopy(model), WeightOnlyConfig(bits=4, group_size=32, kernel="reference"))


def test_fast_decoder_generates_what_the_forward_loop_does(lm_server):
    """--kv-cache fast: the same greedy text as the model's own forward loop; concurrent generations
    each decode on their own fork (same seeded text as one alone)."""
    import threading

    from lowbit.service.generate import build_fast_decoder

    q = _w4(lm_server[2])
    build_fast_decoder(q)
    ids = encode_prompt(q.tokenizer, " ".join(_words(q.tokenizer, 6)), False)
    want = generate(q, ids, SamplingParams(max_tokens=12), "none")
    got = generate(q, ids, SamplingParams(max_tokens=12), "fast")
    assert got.text == want.text and got.completion_tokens == want.completion_tokens
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    alone = generate(q, ids, sampled, "fast").text
    texts = [None, None]

    def run(i: int) -> None:
        texts[i] = generate(q, ids, sampled, "fast").text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT_S)
    assert texts == [alone, alone]


def test_served_with_the_fast_decoder(lm_server, tmp_path):
    q = _w4(lm_server[2])
    lowbit.save(q, tmp_path / "store" / "tiny-w4")
    prompt = " ".join(_words(q.tokenizer, 5))
    want = generate(q, encode_prompt(q.tokenizer, prompt, False), SamplingParams(max_tokens=12), "none")
    with running_service(tmp_path / "store", limits=LIMITS, register_default=False, kv_cache="fast",
                         lm="tiny-w4") as (service, url):
        with httpx.Client(base_url=url, timeout=120) as client:
            assert client.get("/models/active").json()["lm"]["kv_cache"] == "fast"
            r = _complete(client, prompt=prompt, max_tokens=12)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want.text
