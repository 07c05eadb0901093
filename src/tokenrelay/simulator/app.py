"""The simulator's ASGI app: ``GET /v1/models`` and ``POST /v1/chat/completions``.

A raw ASGI app (no framework on the per-token path) that answers streaming and not
exactly like OpenAI. It reads the body, has :mod:`~tokenrelay.simulator.plan` decide the
whole answer, and sends it: a JSON body, or chunks (:mod:`~tokenrelay.simulator.framing`)
at the plan's pace (:mod:`~tokenrelay.simulator.pacing`), with the model's fault on
purpose (429 from sim-flaky, a cut body, a stall).

Concurrency per request is a race of two tasks: the generator (the only writer) and a
listener on ``receive()``; when the client goes away the generator is cancelled at once.
The app object exposes counters and awaitable thresholds (:meth:`Simulator.wait_for`) so
tests never poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tokenrelay.asgi import Receive, Scope, Send
from tokenrelay.simulator.catalogue import DROP, FLAKY, STALL, ModelSpec, SimulatorConfig
from tokenrelay.simulator.errors import HTTPError
from tokenrelay.simulator.framing import Chunks, tokens_batch, tool_frames
from tokenrelay.simulator.material import Material
from tokenrelay.simulator.pacing import Pacer
from tokenrelay.simulator.plan import Plan, plan_answer
from tokenrelay.simulator.text import seeded_rng

__all__ = ["Simulator", "SimulatorStats", "create_simulator"]

OWNER = "tokenrelay-simulator"
MODELS_CREATED = 1_735_689_600  # 2025-01-01, a fixed date so /v1/models is stable
MAX_BODY_BYTES = 8 * 1024 * 1024
FLAKY_MEMORY = 4096  # prompts remembered by sim-flaky


@dataclass(slots=True)
class SimulatorStats:
    """Counters for tests and the demo; ``active`` is streams in progress."""

    requests: int = 0  # chat completion requests received (including rejected ones)
    completed: int = 0  # answers fully sent (stream with [DONE], or a JSON body)
    disconnected: int = 0  # the client went away before the answer was complete
    active: int = 0
    rejected: int = 0  # 4xx answers (bad request, auth, unknown model, 429)
    faults: int = 0  # drops and stalls performed on purpose


async def _send_json(send: Send, status: int, body: bytes,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-simulated", b"true"),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Simulator:
    """The ASGI app. State (counters, flaky memory, waiters) lives here, never in globals."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.models = {spec.name: spec for spec in self.config.models}
        self.stats = SimulatorStats()
        self.last_request_headers: dict[str, str] = {}
        self.last_request_body: dict[str, Any] | None = None
        self._material = Material()
        self._flaky: OrderedDict[bytes, int] = OrderedDict()
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self._models_body = orjson.dumps({
            "object": "list",
            "data": [self._model_object(spec) for spec in self.config.models],
        })
        auth = self.config.api_key
        self._auth = f"Bearer {auth}".encode() if auth else None

    @staticmethod
    def _model_object(spec: ModelSpec) -> dict[str, Any]:
        return {"id": spec.name, "object": "model", "created": MODELS_CREATED,
                "owned_by": OWNER, "simulated": True, "description": spec.description}

    # ---- observability

    async def wait_for(self, counter: str, n: int) -> None:
        """Return once ``stats.<counter> >= n`` (works from any event loop or thread)."""
        if getattr(self.stats, counter) >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((counter, n, fut))
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((counter, n, fut))

    async def wait_disconnected(self, n: int = 1) -> None:
        """Return once ``n`` clients have gone away mid-answer in total."""
        await self.wait_for("disconnected", n)

    async def wait_requests(self, n: int = 1) -> None:
        await self.wait_for("requests", n)

    async def wait_completed(self, n: int = 1) -> None:
        await self.wait_for("completed", n)

    def _bump(self, counter: str, delta: int = 1) -> None:
        value = getattr(self.stats, counter) + delta
        setattr(self.stats, counter, value)
        if not self._waiters:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for name, n, fut in list(self._waiters):
            if name == counter and value >= n and not fut.done():
                loop = fut.get_loop()
                if loop is running:
                    fut.set_result(None)
                else:
                    loop.call_soon_threadsafe(_resolve, fut)

    # ---- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1003})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if self._auth is not None and not self._authorized(scope):
                raise HTTPError(401, "Incorrect API key provided (simulated).",
                                code="invalid_api_key")
            if path == "/v1/chat/completions":
                if method != "POST":
                    raise HTTPError(405, f"Method {method} not allowed.",
                                    code="method_not_allowed")
                await self._chat(scope, receive, send)
            elif path == "/v1/models" and method == "GET":
                await _send_json(send, 200, self._models_body)
            elif path.startswith("/v1/models/") and method == "GET":
                spec = self.models.get(path[len("/v1/models/") :])
                if spec is None:
                    raise HTTPError(404, "The model does not exist.", code="model_not_found")
                await _send_json(send, 200, orjson.dumps(self._model_object(spec)))
            else:
                raise HTTPError(404, f"Unknown request URL: {method} {path}.",
                                code="unknown_url")
        except HTTPError as exc:
            if path == "/v1/chat/completions":
                self._bump("rejected")
            await _send_json(send, exc.status, exc.body, exc.headers)

    def _authorized(self, scope: Scope) -> bool:
        assert self._auth is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self._auth)
        return False

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._bump("requests")
        self.last_request_headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        body = await _read_body(receive)
        if body is None:
            self._bump("disconnected")
            return
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise HTTPError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(request, dict):
            raise HTTPError(400, "The request body must be a JSON object.")
        self.last_request_body = request
        plan = plan_answer(request, self.config, self.models, self._material)
        if plan.spec.fault == FLAKY and self._flaky_hit(plan.digest):
            retry = str(self.config.retry_after_s)
            raise HTTPError(
                429, f"Rate limit reached for {plan.spec.name} (simulated). "
                f"Please try again in {retry}s.", type_="requests", code="rate_limit_exceeded",
                headers=[(b"retry-after", retry.encode())],
            )
        stream = request.get("stream") is True
        work = self._stream(send, plan) if stream else self._complete(send, plan)
        self._bump("active")
        try:
            await self._race(receive, work, plan)
        finally:
            self._bump("active", -1)

    def _flaky_hit(self, digest: bytes) -> bool:
        """Odd attempts for a prompt (1st, 3rd, ...) are rate limited; memory is bounded."""
        count = self._flaky.pop(digest, 0)
        self._flaky[digest] = count + 1
        while len(self._flaky) > FLAKY_MEMORY:
            self._flaky.popitem(last=False)
        return count % 2 == 0

    async def _race(self, receive: Receive, work: Awaitable[None], plan: Plan) -> None:
        """Run the answer against a disconnect listener; the first to finish wins."""
        task = asyncio.ensure_future(work)
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((task, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, listener):
                if not t.done():
                    t.cancel()
            gone = listener.done() and not listener.cancelled() and not task.done()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if gone and not plan.finished:
            self._bump("disconnected")

    async def _stream(self, send: Send, plan: Plan) -> None:
        chat_id = "chatcmpl-sim" + uuid.uuid4().hex[:20]
        chunks = Chunks(chat_id, int(time.time()), plan.spec.name, plan.include_usage)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", chat_id.encode()),
            (b"x-simulated", b"true"),
        ]})
        if plan.first_delay > 0:
            await asyncio.sleep(plan.first_delay)
        pacer = Pacer(send, plan.rate)
        pacer.lead = chunks.role(content_null=bool(plan.tool_calls))
        if plan.reasoning:
            await pacer.emit(len(plan.reasoning),
                             tokens_batch(chunks.reasoning_head, chunks.tail, plan.reasoning))
        if plan.tool_calls:
            frames = tool_frames(chunks, plan.tool_calls, seeded_rng(plan.digest, 3))
            await pacer.emit(len(frames), lambda i, j: b"".join(frames[i:j]))
        await pacer.emit(len(plan.content),
                         tokens_batch(chunks.content_head, chunks.tail, plan.content))
        if plan.spec.fault == DROP:
            if pacer.lead:
                await send({"type": "http.response.body", "body": pacer.lead, "more_body": True})
            self._bump("faults")
            return  # no final message: the server closes the connection mid-body
        if plan.spec.fault == STALL:
            self._bump("faults")
            await asyncio.Event().wait()  # until the listener sees the client leave
        tail = pacer.lead + chunks.finish(plan.finish_reason)
        if plan.include_usage:
            tail += chunks.usage(plan.usage())
        plan.finished = True
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n",
                    "more_body": False})
        self._bump("completed")

    async def _complete(self, send: Send, plan: Plan) -> None:
        """A non-streaming answer takes as long as the stream would have."""
        items = len(plan.reasoning) + len(plan.content) + 4 * len(plan.tool_calls)
        duration = plan.first_delay + (items / plan.rate if plan.rate > 0 else 0.0)
        if duration > 0:
            await asyncio.sleep(duration)
        if plan.spec.fault in (DROP, STALL):
            self._bump("faults")
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"x-simulated", b"true")]})
            await send({"type": "http.response.body", "body": b'{"id":"chatcmpl-sim",',
                        "more_body": True})
            if plan.spec.fault == STALL:
                await asyncio.Event().wait()
            return
        message: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(plan.content) if not plan.tool_calls
                                   else None}
        if plan.reasoning:
            message["reasoning_content"] = "".join(plan.reasoning)
        if plan.tool_calls:
            message["tool_calls"] = [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                for cid, name, args in plan.tool_calls
            ]
        body = orjson.dumps({
            "id": "chatcmpl-sim" + uuid.uuid4().hex[:20],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.spec.name,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": plan.finish_reason}],
            "usage": plan.usage(),
        })
        plan.finished = True
        await _send_json(send, 200, body)
        self._bump("completed")


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client left first."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, "Request body too large.", code="request_too_large")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def create_simulator(config: SimulatorConfig | None = None) -> Simulator:
    """Build the simulator ASGI app."""
    return Simulator(config)
