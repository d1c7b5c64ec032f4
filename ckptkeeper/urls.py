"""Telling an object store URL (`s3://bucket/prefix`) from a path, without importing anything heavy: `plan` and
`prune` start fast whether or not --archive-to names an object store."""

from __future__ import annotations

import os
import re

URL_FORM = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")


def is_url(text: str | os.PathLike[str]) -> bool:
    return isinstance(text, str) and URL_FORM.match(text) is not None


def url_problem(url: str) -> str | None:
    """Why `url` cannot be an archive destination, told without importing anything; None when it can."""
    match = URL_FORM.match(url)
    if match is None:
        return "not a URL"
    protocol, rest = match.groups()
    if protocol in ("file", "local"):
        return "give a local archive as a path, not a file:// URL"
    if not rest.strip("/"):
        return f"names no bucket (expected {protocol}://BUCKET/PREFIX)"
    if "\0" in url:
        return "a URL cannot contain a NUL character"
    return None


__all__ = ["URL_FORM", "is_url", "url_problem"]
