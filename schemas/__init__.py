"""Avro schemas (.avsc files beside this module) and the single-object codec built on fastavro."""

from schemas.codec import (
    IDENTITY_LINK,
    VISITOR_EVENT,
    AvroCodec,
    DecodeError,
)

__all__ = ["AvroCodec", "DecodeError", "IDENTITY_LINK", "VISITOR_EVENT"]
