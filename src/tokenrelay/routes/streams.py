"""Resume, inspect and stop streams: ``/api/streams/{id}[/events|/cancel]``, and follow
several at once over one response: ``/api/events?streams=ID:SEQ,...``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenrelay.hub import Hub
from tokenrelay.multiplex import MultiplexResponse, parse_streams
from tokenrelay.routes.common import JSONResponse, owner_of
from tokenrelay.subscriber import SubscriberResponse
from tokenrelay.validation import parse_last_event_id


async def stream_info(request: Request) -> JSONResponse:
    hub: Hub = request.app.state.hub
    info = await hub.info(request.path_params["stream_id"], owner_of(request))
    return JSONResponse(
        {
            "stream_id": info.stream_id,
            "finished": info.finished,
            "state": info.state or "streaming",
            "last_seq": info.last_seq,
            "model": info.meta.get("model"),
            "conversation_id": info.meta.get("conversation_id"),
            "message_id": info.meta.get("message_id"),
        }
    )


async def stream_events(request: Request) -> Response | SubscriberResponse:
    """Replay after Last-Event-ID (header, or ?last_event_id= for fetch clients), then tail.

    A finished stream with nothing after Last-Event-ID answers 204 No Content: the
    EventSource spec's signal to stop reconnecting (a 200 with no events would make a
    browser reconnect every few seconds until the stream expires). A client that missed
    the terminal event still gets it."""
    hub: Hub = request.app.state.hub
    stream_id = request.path_params["stream_id"]
    after = parse_last_event_id(
        request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    )
    info = await hub.info(stream_id, owner_of(request))
    if info.finished and after >= info.last_seq:
        return Response(status_code=204, headers={"Cache-Control": "no-store"})
    request.app.state.metrics.resumed()
    return SubscriberResponse(hub, stream_id, after)


async def multiplexed_events(request: Request) -> MultiplexResponse:
    """Several streams, each after its own seq, over one SSE response (the page's tabs)."""
    positions = parse_streams(request.query_params.get("streams"))
    request.app.state.metrics.resumed()
    return MultiplexResponse(request.app.state.hub, owner_of(request), positions)


async def cancel(request: Request) -> JSONResponse:
    hub: Hub = request.app.state.hub
    stream_id = request.path_params["stream_id"]
    cancelled = await hub.cancel(stream_id, owner_of(request))
    return JSONResponse({"stream_id": stream_id, "cancelled": cancelled}, status_code=202)


routes = [
    Route("/api/streams/{stream_id}", stream_info, methods=["GET"]),
    Route("/api/streams/{stream_id}/events", stream_events, methods=["GET"]),
    Route("/api/streams/{stream_id}/cancel", cancel, methods=["POST"]),
    Route("/api/events", multiplexed_events, methods=["GET"]),
]
