"""Telling an object store URL (`s3://bucket/prefix`) from a path, without importing anything heavy: `plan` and
`prune` start fast whether or not --archive-to names an object store."""

from __future__ import annotations

import os
import re

URL_FORM = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")

# fsspec protocols that can only be read (or, for zip, written only as one whole new archive): never a place to
# archive to; `archive ls` and `archive restore` may still read from them.
READ_ONLY_PROTOCOLS = frozenset(
    {"http", "https", "github", "gist", "git", "dvc", "zip", "tar", "libarchive", "reference", "data"}
)


def is_url(text: str | os.PathLike[str]) -> bool:
    return isinstance(text, str) and URL_FORM.match(text) is not None


def url_problem(url: str, *, writing: bool = True) -> str | None:
    """Why `url` cannot be an archive destination (`writing`) or source, told without importing anything; None
    when it can."""
    match = URL_FORM.match(url)
    if match is None:
        return "not a URL"
    protocol, rest = match.groups()
    problem = _protocol_problem(protocol.lower(), writing)
    if problem:
        return problem
    if not rest.split("/", 1)[0]:
        return f"names no bucket (expected {protocol}://BUCKET/PREFIX)"
    if "\0" in url:
        return "a URL cannot contain a NUL character"
    return None


def _protocol_problem(protocol: str, writing: bool) -> str | None:
    if protocol in ("file", "local"):
        return "give a local archive as a path, not a file:// URL"
    if writing and protocol in READ_ONLY_PROTOCOLS:
        return f"{protocol}:// is read-only (fsspec cannot write there): archive to an object store such as s3://"
    if protocol == "memory":
        return "memory:// lives only as long as this process: an archive there is lost when it exits"
    return None


__all__ = ["READ_ONLY_PROTOCOLS", "URL_FORM", "is_url", "url_problem"]
