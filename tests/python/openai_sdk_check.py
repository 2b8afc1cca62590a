"""Drive llmproxy with the official OpenAI Python SDK: a chat request and a streamed one.

Usage: python openai_sdk_check.py BASE_URL CLIENT_KEY
The proxy must require client keys, with CLIENT_KEY one of them. Exits non-zero (with the reason) if the SDK cannot use the proxy as it would use OpenAI.
"""
import sys

import openai


def main(base_url: str, client_key: str) -> None:
    # max_retries=0: the proxy, not the SDK, must absorb rate limits. The SDK sends its api_key
    # as a bearer token: the proxy's client key, never the upstream's.
    client = openai.OpenAI(base_url=base_url, api_key=client_key, max_retries=0)

    chat = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=8,
    )
    assert chat.choices[0].message.content, chat
    assert chat.usage is not None and chat.usage.total_tokens > 0, chat.usage

    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Stream hello"}],
        max_tokens=8,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces), pieces

    # Asked for usage explicitly: the SDK sees the usage chunk.
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Stream with usage"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage and usage[-1].total_tokens > 0, usage

    # The proxy caches (the test's LlmProxy has cache.ttl): a replayed stream parses the same.
    def cached_stream():
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Cache this stream"}],
            max_tokens=8,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        return raw.headers.get("x-llmproxy-cache"), text

    first, second = cached_stream(), cached_stream()
    assert first[0] == "miss" and second[0] == "hit", (first, second)
    assert first[1] and first[1] == second[1], (first, second)

    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2

    # The proxy's own errors parse as OpenAI errors.
    try:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "x" * 20000}])
    except openai.APIStatusError as e:
        assert e.status_code == 413, e
        assert "bytes" in e.message, e.message
    else:
        raise AssertionError("an oversized request was accepted")

    # A key the proxy does not know: the SDK's own AuthenticationError, streamed or not.
    stranger = openai.OpenAI(base_url=base_url, api_key="sk-not-a-client", max_retries=0)
    for stream in (False, True):
        try:
            stranger.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
        except openai.AuthenticationError as e:
            assert e.code == "invalid_api_key", e
            assert "sk-not-a-client" not in str(e.body), e.body
        else:
            raise AssertionError(f"an unknown client key was accepted (stream={stream})")
    print("openai sdk: ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
