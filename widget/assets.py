"""Serves the widget script: minified once per process, with a content hash as ETag and version."""

from __future__ import annotations

import base64
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
    body: bytes  # minified JavaScript, starting with a version comment
    etag: str  # strong ETag (quoted), derived from the minified bytes
    version: str  # content hash of the minified source; also in the file so a saved copy says what it is

    @property
    def gzipped_size(self) -> int:
        return len(gzip.compress(self.body, 9))


@lru_cache(maxsize=1)
def widget_script() -> Script:
    minified = rjsmin.jsmin(SOURCE.read_text(encoding="utf-8"), keep_bang_comments=False).encode()
    digest = hashlib.sha256(minified).hexdigest()[:16]
    body = f"/* hydra widget.js {digest} */\n".encode() + minified
    return Script(body=body, etag=f'"{digest}"', version=digest)


def snippet_html() -> str:
    """The spec's pre-load queue snippet, verbatim (widget/static/snippet.html)."""
    return (STATIC_DIR / "snippet.html").read_text(encoding="utf-8")


def snippet_csp_hash() -> str:
    """The CSP source ('sha256-…') that allows the inline snippet, pasted byte for byte, under `script-src`."""
    html = snippet_html()
    code = html[html.index("<script>") + len("<script>") : html.index("</script>")]
    return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"
