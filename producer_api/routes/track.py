"""POST /api/widget/track — the ingest endpoint the widget calls.

Answers (every non-204 has a JSON body `{"error": <slug>, "reason": <text>, ...}` and CORS headers):
- 204: every event is durably in Kafka (delivery reports received), or the widget has tracking off.
- 400 `invalid_events`: some events were invalid; `rejected` lists `{"index", "reason"}` per bad event and
  `accepted` counts the valid ones, which were written like on a 204. Do not retry.
- 400 `malformed_json` / `invalid_request` / `malformed_body`: the request as a whole is unusable; nothing written.
- 404 `unknown_widget`. 415: Content-Type not JSON/text/plain, or Content-Encoding not gzip.
- 413 `body_too_large` (over max_body_bytes before or after gzip), `too_many_events` (over
  max_events_per_request) or `batch_too_large` (the encoded events over Limits.max_raw_message_bytes, what one
  Kafka message can carry, or refused by Kafka as too large); nothing written, split the request.
- 422 `unwritable_events`: Kafka refused the request's message for what it is (an invalid record); do not retry.
- 408 `request_timeout`: the body did not arrive within http_body_timeout_s (the connection is closed).
- 503 with Retry-After: Kafka did not confirm every event in time (or the queue is full), or the widget
  configs cannot be loaded. Retry the same request; event ids make the retry idempotent downstream."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from producer_api.body import read_body
from producer_api.deps import IngestDep
from producer_api.errors import json_response

router = APIRouter()

_ERROR: dict[str, Any] = {"content": {"application/json": {}}}


@router.post(
    "/api/widget/track",
    status_code=204,
    responses={
        204: {"description": "Every event was written to Kafka (or the widget has tracking off)."},
        400: {
            **_ERROR,
            "description": "Malformed request, or some events invalid (the valid ones were written); do not retry.",
        },
        404: {**_ERROR, "description": "Unknown widget."},
        413: {
            **_ERROR,
            "description": "Body over the size limit (before or after gzip), too many events, or "
            "events too large together once encoded; split the request.",
        },
        415: {**_ERROR, "description": "Unsupported Content-Type or Content-Encoding."},
        422: {**_ERROR, "description": "Kafka refused the events' message as an invalid record; do not retry."},
        503: {**_ERROR, "description": "Events not confirmed by Kafka; retry after Retry-After seconds."},
    },
)
async def track(request: Request, ingest: IngestDep) -> Response:
    body = await read_body(request, ingest.limits.max_body_bytes)
    outcome = await ingest.ingest(body)
    if outcome.rejected:
        return json_response(
            400,
            {
                "error": "invalid_events",
                "accepted": outcome.accepted,
                "rejected": [r.public() for r in outcome.rejected],
            },
        )
    return Response(status_code=204)
