"""Serves the widget script: minified once per process, with a content hash as ETag and version."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import rjsmin

STATIC_DIR = Path(__file__).parent / "static"
SOURCE = STATIC_DIR / "hydra.js"


@dataclass(frozen=True)
class Script:
    body: bytes  # minified JavaScript
    etag: str  # strong ETag (quoted), derived from the minified bytes

    @property
    def gzipped_size(self) -> int:
        return len(gzip.compress(self.body, 9))


@lru_cache(maxsize=1)
def widget_script() -> Script:
    minified = rjsmin.jsmin(SOURCE.read_text(encoding="utf-8"), keep_bang_comments=False).encode()
    digest = hashlib.sha256(minified).hexdigest()[:16]
    return Script(body=minified, etag=f'"{digest}"')
