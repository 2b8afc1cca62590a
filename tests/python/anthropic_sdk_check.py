"""Drive llmproxy with the official Anthropic Python SDK: messages, a stream, token counting,
the model list, and the proxy's own errors as the SDK's exception types.

Usage: python anthropic_sdk_check.py BASE_URL CLIENT_KEY
The proxy must require client keys, with CLIENT_KEY one of them. Prints one JSON line with the
usage the SDK saw; exits non-zero (with the reason) if the SDK cannot use the proxy as it would
use Anthropic.
"""
import json
import sys

import anthropic


def check(client: anthropic.Anthropic) -> dict:
    msg = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=64,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say hello"}],
    )
    assert msg.type == "message" and msg.content and msg.content[0].text, msg
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, msg.usage
    seen = {"input": msg.usage.input_tokens, "output": msg.usage.output_tokens}

    with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "Stream hello"}],
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert "message_start" in events and "message_stop" in events, events
    assert sum(1 for e in events if e == "content_block_delta") >= 2, events
    assert final.content and final.content[0].text, final
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0, final.usage
    seen["input"] += final.usage.input_tokens
    seen["output"] += final.usage.output_tokens

    counted = client.messages.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Count me"}]
    )
    assert counted.input_tokens > 0, counted

    models = client.models.list()
    assert any(m.id for m in models.data), models

    # The proxy's own refusal (a body over its limit), in Anthropic's shape: the SDK raises its
    # own type for it.
    try:
        client.with_options(max_retries=0).messages.create(
            model="claude-sonnet-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "x" * 40_000}],
        )
        raise AssertionError("a body over the proxy's limit was accepted")
    except anthropic.APIStatusError as e:
        assert e.status_code == 413, e
        body = e.body if isinstance(e.body, dict) else {}
        assert body.get("type") == "error", e.body
        assert body.get("error", {}).get("type") == "request_too_large", e.body
    return seen


def main(base_url: str, client_key: str) -> None:
    # max_retries=0: the proxy, not the SDK, must absorb rate limits. `api_key` goes as
    # x-api-key (as the 1.x SDKs send it), `auth_token` as a bearer token (as the 2.x SDKs do).
    by_header = anthropic.Anthropic(base_url=base_url, api_key=client_key, max_retries=0)
    by_bearer = anthropic.Anthropic(base_url=base_url, auth_token=client_key, api_key=None, max_retries=0)
    seen = check(by_header)
    bearer = check(by_bearer)
    seen = {k: seen[k] + bearer[k] for k in seen}

    wrong = anthropic.Anthropic(base_url=base_url, api_key="sk-wrong", max_retries=0)
    try:
        wrong.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        raise AssertionError("a wrong client key was accepted")
    except anthropic.AuthenticationError as e:
        assert e.body.get("error", {}).get("type") == "authentication_error", e.body  # type: ignore[union-attr]
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
