"""``tokenrelay chat``: stream one answer to the terminal through a running gateway."""

from __future__ import annotations

import sys

import aiohttp
import orjson

from tokenrelay.sse import SSEDecoder


async def chat_once(url: str, model: str | None, prompt: str, api_key: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body: dict[str, object] = {"messages": [{"role": "user", "content": prompt}]}
    if model:
        body["model"] = model
    decoder = SSEDecoder()
    async with aiohttp.ClientSession() as session, session.post(
        url.rstrip("/") + "/api/chat", data=orjson.dumps(body), headers=headers
    ) as resp:
        if resp.status != 200:
            print(f"error {resp.status}: {await resp.text()}", file=sys.stderr)
            return 1
        async for data in resp.content.iter_any():
            for event in decoder.decode(data):
                payload = orjson.loads(event.data)
                if event.event == "message":
                    sys.stdout.write(payload["content"])
                    sys.stdout.flush()
                elif event.event == "reasoning":
                    sys.stderr.write(payload["reasoning"])
                elif event.event == "retry":
                    print(f"\n[retrying in {payload['wait_ms']} ms: {payload['reason']}]",
                          file=sys.stderr)
                elif event.event == "done":
                    stats = payload["stats"]
                    print(f"\n\n[{payload['state']} · {payload['model']} · "
                          f"TTFT {stats['ttft_ms']} ms · {stats['tokens_per_s']} tok/s]",
                          file=sys.stderr)
                    return 0
                elif event.event == "error":
                    print(f"\n[error: {payload['error']['message']}]", file=sys.stderr)
                    return 1
    return 1
