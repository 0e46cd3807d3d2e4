"""Audio that a request names by path or URL: the allow-list policy and a bounded read.

The server reads a path or fetches a URL for a client only when `serve.allowed_audio_sources` lists a prefix
that covers it, and the match is made on parsed URLs, never on strings: the scheme and the host must be equal
(`https://cdn.x` does not cover `https://cdn.x.evil/` and `s3://bucket` does not cover `s3://bucket-private`),
the path must lie under the prefix's path at a `/` boundary, and a location with userinfo
(`https://cdn.x@169.254.169.254/`), dot segments, encoded slashes or dots, backslashes or control characters is
refused outright. Local paths are resolved (symlinks and `..` followed) before they are compared, and only in
`read_source`, which the gateway runs in a thread: `os.path.realpath` on a long string is slow.

HTTP(S) is fetched here with connect/read timeouts, an overall deadline, the size cap enforced while streaming
(whatever Content-Length says) and redirects followed only while they stay inside the allow-list. Other fsspec
schemes (s3://, gs://, hf://) and local files go through `read_audio_file`, which caps what it reads.

Error messages never repeat the location or anything fetched: a client learns why, not what.
"""

from __future__ import annotations

import functools
import os
import re
import time
from urllib.parse import SplitResult, urljoin, urlsplit

from af3dist import storage
from af3dist.config import ServeConfig
from af3dist.data.audio import ClipError, read_audio_file
from af3dist.server.protocol import check_location, not_allowed

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
# Percent-encoded '.', '/' and '\': the ways around a path-prefix check.
_ENCODED_SEPARATORS = re.compile(r"%(2e|2f|5c)", re.I)


def _is_url(location: str) -> bool:
    return storage.is_remote(location)


@functools.lru_cache(maxsize=64)
def _url_rule(prefix: str) -> SplitResult:
    rule = urlsplit(prefix)
    if not rule.scheme or rule.username is not None or rule.password is not None:
        raise ValueError(f"allowed_audio_sources entry {prefix!r} must be scheme://host[/path] without userinfo")
    return rule


@functools.lru_cache(maxsize=64)
def _folder_rule(prefix: str) -> str:
    return os.path.realpath(prefix)


def _under(path: str, prefix: str, sep: str = "/") -> bool:
    """`path` is `prefix` or lies below it, split at separators (so /clips does not cover /clips-private)."""
    if prefix in ("", sep):
        return True
    if prefix.endswith(sep):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + sep)


def url_allowed(url: str, allowed: list[str]) -> bool:
    """Whether an allow-list entry covers `url`: equal scheme, host and port, path under the entry's path; a
    URL with userinfo, dot segments or encoded separators is never covered. file:// URLs never are either:
    local files are named by path, which is resolved before it is compared."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if (parts.username is not None or parts.password is not None or "@" in parts.netloc
            or parts.scheme.lower() == "file" or not parts.hostname
            or _ENCODED_SEPARATORS.search(parts.path) or any(s in (".", "..") for s in parts.path.split("/"))):
        return False
    for prefix in allowed:
        if not _is_url(prefix):
            continue
        rule = _url_rule(prefix)
        if (parts.scheme.lower() == rule.scheme.lower() and parts.hostname == rule.hostname
                and port == rule.port and _under(parts.path, rule.path)):
            return True
    return False


def resolve_path(path: str, allowed: list[str]) -> str | None:
    """The real path of `path` when it lies inside an allowed folder (after following symlinks and `..`),
    else None. Touches the file system: call it off the event loop."""
    real = os.path.realpath(path)
    for prefix in allowed:
        if not _is_url(prefix) and _under(real, _folder_rule(prefix), os.sep):
            return real
    return None


def _fetch_http(url: str, cfg: ServeConfig, param: str) -> bytes:
    """GET an allow-listed http(s) URL: no redirect out of the allow-list, never more than the size cap read,
    done within `cfg.fetch_timeout_s` however slowly the server sends."""
    import requests

    limit, deadline = cfg.max_body_bytes, time.monotonic() + cfg.fetch_timeout_s
    with requests.Session() as session:
        session.trust_env = False  # no proxies or .netrc credentials picked up from the environment
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = session.get(url, stream=True, allow_redirects=False,
                                       timeout=(cfg.fetch_connect_timeout_s, cfg.fetch_timeout_s),
                                       headers={"Accept-Encoding": "identity"})
            except requests.Timeout:
                raise ClipError("timeout", "the audio URL did not answer in time") from None
            except requests.RequestException:
                raise ClipError("unreadable", "the audio URL cannot be fetched") from None
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    if not url_allowed(url, cfg.allowed_audio_sources):
                        raise not_allowed(param, "the URL redirects outside the allowed sources")
                    continue
                if response.status_code != 200:
                    raise ClipError("unreadable", f"the audio URL answered HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise ClipError("too_long", f"the audio file is over the {cfg.max_body_mb:g} MB limit")
                chunks, size = [], 0
                try:
                    # read1: whatever has arrived (up to a chunk), so a trickle meets the deadline check.
                    while part := response.raw.read1(_CHUNK):
                        size += len(part)
                        if size > limit:
                            raise ClipError("too_long", f"the audio file is over the {cfg.max_body_mb:g} MB limit")
                        if time.monotonic() > deadline:
                            raise ClipError("timeout", f"the audio URL took over {cfg.fetch_timeout_s:g} s")
                        chunks.append(part)
                except ClipError:
                    raise
                except (requests.RequestException, OSError, ValueError) as err:  # urllib3 errors included
                    if "timed out" in str(err).lower():
                        raise ClipError("timeout", f"the audio URL took over {cfg.fetch_timeout_s:g} s") from None
                    raise ClipError("unreadable", "the audio URL's answer broke off") from None
                return b"".join(chunks)
    raise ClipError("unreadable", f"the audio URL redirects more than {MAX_REDIRECTS} times")


def read_source(location: str, cfg: ServeConfig, param: str = "audio") -> bytes:
    """The bytes of an audio part named by path or URL, if the allow-list covers it (ApiError if not; ClipError
    with reason unreadable, too_long or timeout when it cannot be read). Blocking: run it in a thread."""
    check_location(location, cfg, param)
    if _is_url(location):
        if not url_allowed(location, cfg.allowed_audio_sources):
            raise not_allowed(param, "the URL is not under an allowed source")
        if urlsplit(location).scheme.lower() in ("http", "https"):
            return _fetch_http(location, cfg, param)
        source = location
    else:
        resolved = resolve_path(location, cfg.allowed_audio_sources)
        if resolved is None:
            raise not_allowed(param, "the path is not inside an allowed folder")
        source = resolved
    try:
        return read_audio_file(source, cfg.max_body_bytes)
    except ClipError as err:
        # read_audio_file's detail may name the file or quote the file system's error: keep only the reason.
        raise ClipError(err.reason, {"too_long": f"the audio file is over the {cfg.max_body_mb:g} MB limit"}.get(
            err.reason, "the audio file cannot be read")) from None
