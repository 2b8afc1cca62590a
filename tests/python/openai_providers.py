"""Drive llmproxy with the official OpenAI Python SDK as Azure OpenAI and Gemini users do.

Usage:
  python openai_providers.py azure-check BASE_URL CLIENT_KEY
      AzureOpenAI(azure_endpoint=BASE_URL): chat, a stream and embeddings on deployment paths.
  python openai_providers.py load BASE_URL CLIENT_KEY REQUESTS CLIENTS MODEL [azure]
      REQUESTS chat completions from CLIENTS threads, each with its own SDK client
      (max_retries=0: no retries of its own), as AzureOpenAI when `azure` is given, else the
      plain OpenAI client with base_url BASE_URL/v1.
Prints one JSON line; exits non-zero (with the reason) if the SDK cannot use the proxy.
"""
import concurrent.futures
import json
import sys
import threading
import time

import openai

API_VERSION = "2024-10-21"


def azure(base_url: str, key: str) -> openai.AzureOpenAI:
    # The SDK sends api_key as the `api-key` header: the proxy's client key, never Azure's.
    return openai.AzureOpenAI(azure_endpoint=base_url, api_key=key, api_version=API_VERSION, max_retries=0, timeout=120)


def azure_check(base_url: str, key: str) -> None:
    client = azure(base_url, key)
    chat = client.chat.completions.create(
        model="gpt-4o-prod", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
    )
    assert chat.choices[0].message.content, chat
    assert chat.usage is not None and chat.usage.total_tokens > 0, chat.usage
    stream = client.chat.completions.create(
        model="gpt-4o-prod", messages=[{"role": "user", "content": "Stream hello"}], max_tokens=8, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces), pieces
    emb = client.embeddings.create(model="embed-prod", input=["one", "two"])
    assert len(emb.data) == 2 and emb.data[0].embedding, emb
    print(json.dumps({"chat_tokens": chat.usage.total_tokens, "stream": "".join(pieces), "embeddings": len(emb.data)}))


def load(base_url: str, key: str, requests: int, clients: int, model: str, as_azure: bool) -> None:
    local = threading.local()
    counts: dict = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = (
                azure(base_url, key)
                if as_azure
                else openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)
            )
        try:
            local.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=16
            )
            status = 200
        except openai.APIStatusError as e:
            status = e.status_code
        except openai.APIConnectionError:
            status = 0
        with lock:
            counts[status] = counts.get(status, 0) + 1

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.monotonic() - start
    print(json.dumps({"statuses": {str(k): v for k, v in counts.items()}, "wall": wall}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "azure-check":
        azure_check(sys.argv[2], sys.argv[3])
    else:
        load(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], len(sys.argv) > 7)
