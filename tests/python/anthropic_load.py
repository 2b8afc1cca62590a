"""Send messages with the official Anthropic Python SDK from many clients at once.

Usage: python anthropic_load.py BASE_URL REQUESTS CLIENTS MAX_TOKENS
Each client is a thread with its own SDK client (max_retries=0: no retries of its own). Prints
one JSON line: answers by status, the output tokens the answers reported, the wall time.
"""
import concurrent.futures
import json
import sys
import threading
import time

import anthropic


def main(base_url: str, requests: int, clients: int, max_tokens: int) -> None:
    local = threading.local()
    counts: dict = {}
    output = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal output
        if not hasattr(local, "client"):
            local.client = anthropic.Anthropic(base_url=base_url, api_key="sk-load", max_retries=0, timeout=120)
        try:
            msg = local.client.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=max_tokens,
                messages=[{"role": "user", "content": f"request {i}: tell me something"}],
            )
            status, used = 200, msg.usage.output_tokens
        except anthropic.APIStatusError as e:
            status, used = e.status_code, 0
        except anthropic.APIConnectionError:
            status, used = 0, 0
        with lock:
            counts[status] = counts.get(status, 0) + 1
            output += used

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one, range(requests)))
    wall = time.monotonic() - start
    print(json.dumps({"statuses": {str(k): v for k, v in counts.items()}, "output": output, "wall": wall}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
