"""A live ``qwen3c serve`` on 127.0.0.1, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
from conftest import live_server

import qwen3c

API_KEY = "test-key"


@pytest.fixture(scope="module")
def artifact(make_artifact, tiny_checkpoint):
    return make_artifact(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(artifact):
    with live_server(artifact, "--api-key", API_KEY, "--max-batch", "8") as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def local_model(artifact):
    """The same artifact in this process: what each request must give when run alone."""
    return qwen3c.load(artifact)


def metrics(server: str) -> dict[str, float]:
    text = httpx.get(f"{server}/metrics", timeout=5).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["qwen3c"]


def test_completion_equals_local_greedy(client, local_model):
    out = client.completions.create(model="qwen3c", prompt="def load(path):", max_tokens=12,
                                    temperature=0)
    expected = local_model.generate("def load(path):", max_new_tokens=12)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(expected.prompt_ids)
    assert out.usage.completion_tokens == 12


def test_chat_stream_equals_non_stream_for_a_seed(client):
    messages = [{"role": "user", "content": "Say something."}]
    kwargs = dict(model="qwen3c", messages=messages, max_tokens=16, temperature=0.9, seed=7)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    again = client.chat.completions.create(**kwargs)
    assert again.choices[0].message.content == whole.choices[0].message.content


def test_completion_stream_ends_with_done(server):
    body = {"model": "qwen3c", "prompt": "x = ", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])


def test_stop_string(client, local_model):
    free = local_model.generate("def run(", max_new_tokens=16).text
    stop = free[3:5]
    out = client.completions.create(model="qwen3c", prompt="def run(", max_tokens=16,
                                    temperature=0, stop=[stop])
    assert out.choices[0].text == free[: free.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_stop_token_ids(client, local_model):
    free = local_model.generate("def run(", max_new_tokens=10)
    stop_token = free.token_ids[4]
    out = client.completions.create(model="qwen3c", prompt="def run(", max_tokens=10,
                                    temperature=0, extra_body={"stop_token_ids": [stop_token]})
    first = free.token_ids.index(stop_token)
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == first
    assert out.choices[0].text == local_model.tokenizer.decode(free.token_ids[:first])


def test_n_choices_and_seeds(client):
    out = client.completions.create(model="qwen3c", prompt="import", max_tokens=10,
                                    temperature=1.0, n=2, seed=3)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text != out.choices[1].text
    again = client.completions.create(model="qwen3c", prompt="import", max_tokens=10,
                                      temperature=1.0, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_logprobs(client, local_model):
    out = client.chat.completions.create(model="qwen3c", messages=[{"role": "user",
                                                                    "content": "hi"}],
                                         max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0


def test_concurrent_clients_get_their_alone_results(client, local_model):
    prompts = [f"def f{i}(x):" + " y" * (i % 5) for i in range(16)]
    expected = [local_model.generate(p, max_new_tokens=8).text for p in prompts]

    def ask(prompt: str) -> str:
        out = client.completions.create(model="qwen3c", prompt=prompt, max_tokens=8,
                                        temperature=0)
        return out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts, timeout=120))
    assert answers == expected


def test_prefix_reuse_prefills_only_the_new_part(server, client, local_model):
    shared = "def prefix_reuse(model, tokens, cache):" * 3
    first = client.completions.create(model="qwen3c", prompt=shared + " one", max_tokens=4,
                                      temperature=0)
    before = metrics(server)
    prompt = shared + " two more"
    out = client.completions.create(model="qwen3c", prompt=prompt, max_tokens=4, temperature=0)
    after = metrics(server)
    prompt_len = len(local_model.encode(prompt))
    reused = after["qwen3c_prefix_reused_tokens_total"] - before[
        "qwen3c_prefix_reused_tokens_total"]
    computed = after["qwen3c_prefilled_tokens_total"] - before["qwen3c_prefilled_tokens_total"]
    assert reused >= len(local_model.encode(shared)) - 1
    assert computed == prompt_len - reused
    assert out.choices[0].text == local_model.generate(prompt, max_new_tokens=4).text
    assert first.choices[0].text == local_model.generate(shared + " one", max_new_tokens=4).text


def test_client_disconnect_cancels_the_request(server):
    body = {"model": "qwen3c", "prompt": "loop", "max_tokens": 400, "stream": True,
            "temperature": 1.0}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 20
    while metrics(server)["qwen3c_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metrics(server)["qwen3c_requests_running"] == 0


@pytest.mark.parametrize("body, status, fragment", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "qwen3c", "prompt": 5}, 400, "prompt"),
    ({"model": "qwen3c", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "does not exist"),
    ({"model": "qwen3c", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "qwen3c", "prompt": "a", "max_tokens": 100000}, 400, "context length"),
    ({"model": "qwen3c", "prompt": "word " * 2000}, 400, "context length"),
    ({"model": "qwen3c", "prompt": "a", "n": 50}, 400, "n"),
])
def test_bad_requests(server, body, status, fragment):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server}/v1/completions", content=content, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200


def test_oversized_body_and_bad_key(server):
    big = json.dumps({"model": "qwen3c", "prompt": "a" * (2 << 20)})
    response = httpx.post(f"{server}/v1/completions", content=big, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 413
    response = httpx.post(f"{server}/v1/completions", json={"model": "qwen3c", "prompt": "a"},
                          headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200
