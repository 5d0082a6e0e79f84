"""Avro schemas (.avsc files beside this module) and the single-object codec built on fastavro."""

from schemas.codec import (
    IDENTITY_LINK,
    VISITOR_EVENT,
    VISITOR_EVENT_BATCH,
    AvroCodec,
    DecodeError,
    EventCodec,
)

__all__ = ["AvroCodec", "DecodeError", "EventCodec", "IDENTITY_LINK", "VISITOR_EVENT", "VISITOR_EVENT_BATCH"]
