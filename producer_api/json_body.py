"""Parses a request body into Python values without ever changing a number or crashing on depth.

The number rule (README, "Numbers"): a JSON number is accepted when reading it as an IEEE-754 double — what
JavaScript's JSON.parse and most JSON consumers do — gives back exactly the value that was sent: finite, inside
the double range, and with no more precision than a double keeps. So everything JSON.stringify (or any
double-based serializer) writes passes; NaN, Infinity, 1e400, 1e-400, 9007199254740993 and
0.30000000000000001 do not. Such a number is not refused here (that would cost the whole request): it
becomes an `Unfaithful` marker, and the validator refuses the one event that carries it.

Two parsers:
- orjson, the fast path, when the body has no number that a double could change: orjson silently turns
  integers beyond 64 bits into floats and rounds long decimals, so 16 digits in a row (decimal points
  between them allowed) or a three-digit exponent anywhere in the body (strings included: a false positive
  only costs speed) sends the body to the careful parser. With at most 15 significant digits and a two-digit exponent
  every JSON number is an exact double (DBL_DIG = 15), so the fast path needs no per-number check.
- the standard library's parser, with hooks that see each number's text, when orjson cannot be trusted or
  refuses the body (NaN/Infinity literals, unpaired UTF-16 surrogate escapes, nesting deeper than orjson's
  1024 levels). Its C scanner recurses, so when it hits the recursion limit the body is first pruned:
  containers opened deeper than `max_depth` keep their brackets but lose their content, which the validator
  then refuses as too deep without it ever being parsed."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

# With digits and "." all mapped to "0" (and E to e, - to +): 16 digits-or-points in a row, or an exponent
# of three or more digits. Three plain substring searches: ~4 µs per KB, where
# an equivalent regular expression costs ~15 times that.
_NORMALIZE = bytes.maketrans(b"123456789.E-", b"0000000000e+")
_RISKY = (b"0" * 16, b"e000", b"e+000")
# A JSON string token, or a bracket. Strings are matched whole so brackets inside them are not counted.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SAFE_INT = 2**53


class MalformedJson(ValueError):
    """The body is not JSON at all (or not UTF-8); the message says where."""


@dataclass(frozen=True, slots=True)
class Unfaithful:
    """A number that a double would not carry exactly; `problem` completes "<text> ...". Never stored."""

    text: str
    problem: str

    def describe(self) -> str:
        shown = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return f"{shown} {self.problem}"


def _int(text: str) -> int | Unfaithful:
    try:
        value = int(text)
    except ValueError:  # over Python's 4300-digit conversion limit
        return Unfaithful(text, "is outside the range of a double")
    if -_SAFE_INT <= value <= _SAFE_INT:
        return value
    try:
        double = float(value)
    except OverflowError:
        return Unfaithful(text, "is outside the range of a double")
    # 12345678901234567000 is what JSON.stringify writes for the double 12345678901234567168: the shortest
    # digits of that double, so it is kept; 9007199254740993 reads as 9007199254740992, so it is not.
    if Decimal(repr(double)) == value:
        return value
    return Unfaithful(text, "cannot be stored exactly as a double (send big integers as strings)")


def _float(text: str) -> float | Unfaithful:
    value = float(text)
    if not math.isfinite(value):
        return Unfaithful(text, "is outside the range of a double")
    try:
        same = Decimal(repr(value)) == Decimal(text)
    except InvalidOperation:  # not reachable for text the JSON scanner accepted; refuse rather than guess
        same = False
    if same:
        return value
    if value == 0.0:
        return Unfaithful(text, "is too small for a double (it would be stored as 0)")
    return Unfaithful(text, f"cannot be stored exactly as a double (it would become {value!r})")


def _constant(text: str) -> Unfaithful:
    return Unfaithful(text, "is not a finite number")


def prune_deep(text: str, max_depth: int) -> str:
    """`text` with the content of every container opened at depth `max_depth` (the top-level value is depth 1)
    removed, brackets kept: `[[[1]]]` pruned at 2 is `[[]]`. Iterative, linear in the text; brackets inside
    strings are not counted. Malformed input stays malformed (the parser reports it), except inside the pruned
    parts, which are never parsed."""
    out: list[str] = []
    depth = 0
    kept_until = 0  # text[kept_until:] is not yet decided
    for match in _TOKEN.finditer(text):
        start = match.start()
        char = text[start]
        if char == '"':
            continue
        if char in "[{":
            depth += 1
            if depth == max_depth:
                out.append(text[kept_until : start + 1])
                kept_until = -1  # inside a pruned container
        else:
            if depth == max_depth:
                kept_until = start
            depth -= 1
    if kept_until != -1:  # else unbalanced: a pruned container never closed, and the parser will say so
        out.append(text[kept_until:])
    return "".join(out)


def _careful(body: bytes, max_depth: int) -> Any:
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"body is not UTF-8: {exc}") from None
    try:
        try:
            return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
        except RecursionError:
            return json.loads(prune_deep(text, max_depth), parse_int=_int, parse_float=_float, parse_constant=_constant)
    except (ValueError, RecursionError) as exc:
        raise MalformedJson(str(exc)) from None


def parse_body(body: bytes, max_depth: int) -> Any:
    """The JSON value of `body`. Raises MalformedJson when it is not JSON. Numbers a double would change are
    Unfaithful markers; strings may hold unpaired surrogates (careful parser only); containers deeper than
    `max_depth` may come back empty (only when the body nests deeper than the parser's recursion limit)."""
    normalized = body.translate(_NORMALIZE)
    if not any(pattern in normalized for pattern in _RISKY):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # NaN/Infinity, a lone surrogate, > 1024 levels, or simply not JSON: the careful parser decides
    return _careful(body, max_depth)
