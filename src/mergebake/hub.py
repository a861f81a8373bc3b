"""Talking to the Hugging Face Hub: error explanations, retries, web addresses.

Fetches (:mod:`mergebake.fetch`) and uploads (:mod:`mergebake.upload`) share:

- :func:`explain_hub_error`: one line saying what went wrong and what to do, from
  huggingface_hub's error classes; never a token;
- :func:`with_retries`: retries transient failures (:func:`is_transient`) with exponential
  backoff. huggingface_hub's own ``http_backoff`` retries one HTTP request; the calls
  retried here (``snapshot_download``, a whole commit) are many requests, so the loop is
  ours, but a rate-limited answer (HTTP 429) waits as long as the server says, read with
  huggingface_hub's ``parse_ratelimit_headers`` as its ``http_backoff`` does;
- :func:`hub_url` and :func:`commit_url`: web addresses on the configured endpoint.

huggingface_hub and httpx2 are imported lazily: importing this module stays cheap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import MergebakeError

log = logging.getLogger(__name__)

RETRIES = 5  # attempts in all
BACKOFF_S = 2.0  # first wait; doubled after each failure ...
MAX_BACKOFF_S = 60.0  # ... up to this
MAX_RATELIMIT_WAIT_S = 600.0  # the longest wait a rate-limited answer may ask for
TRANSIENT_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})  # 409: a concurrent commit


def key_prefix(config_key: str | None) -> str:
    """``"<config_key>: "`` to start an error message with, or ``""``."""
    return f"{config_key}: " if config_key else ""


def token_hint() -> str:
    """How to authenticate, depending on whether a token is configured (never its value)."""
    from huggingface_hub import get_token

    if get_token() is None:
        return "no Hub token is configured: log in with `hf auth login` or set HF_TOKEN"
    return "the configured Hub token (HF_TOKEN or `hf auth login`) has no access to it"


def explain_hub_error(
    e: BaseException,
    *,
    repo: str,
    revision: str | None = None,
    subfolder: str | None = None,
    config_key: str | None = None,
) -> str:
    """One line saying what went wrong talking to the Hub and what to do about it.

    Knows huggingface_hub's error classes (missing repo/revision/file, gated, offline,
    unauthorised, unreachable). Starts with ``config_key: `` when given. Never includes a
    token: only repo names, revisions and the server's message.
    """
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    where = key_prefix(config_key)
    at = f"{repo}@{revision}" if revision else repo
    if isinstance(e, RevisionNotFoundError):
        return (
            f"{where}Hub repo {repo!r} has no revision {revision!r}; check the branch, "
            "tag or commit sha in the config"
        )
    if isinstance(e, GatedRepoError):
        return (
            f"{where}Hub repo {repo!r} is gated: accept its terms on its Hub page, and "
            f"check that {token_hint()}"
        )
    if isinstance(e, RepositoryNotFoundError):
        return f"{where}Hub repo {repo!r} not found, or private: check the name; {token_hint()}"
    if isinstance(e, RemoteEntryNotFoundError):
        return (
            f"{where}Hub repo {at}: {subfolder or 'a requested file'!r} not found; check "
            "'subfolder' in the config"
        )
    if isinstance(e, OfflineModeIsEnabled | LocalEntryNotFoundError | RevisionResolutionError):
        return (
            f"{where}Hub repo {at} is not (completely) in the Hub cache and HF_HUB_OFFLINE "
            "is set or the Hub cannot be reached: unset HF_HUB_OFFLINE and run again with "
            f"network access, or download it first (`hf download {repo}"
            f"{' --revision ' + revision if revision else ''}`) ({type(e).__name__})"
        )
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status == 401:
            return f"{where}Hub repo {at}: unauthorised (401); {token_hint()}"
        if status == 403:
            return (
                f"{where}Hub repo {at}: forbidden (403); the token in use lacks the "
                "permission (a write token is needed to upload)"
            )
        return f"{where}Hub repo {at}: HTTP {status} from the Hub: {e.server_message or e}"
    if isinstance(e, httpx2.TransportError | ConnectionError | TimeoutError):
        return (
            f"{where}Hub repo {at}: the Hub cannot be reached ({type(e).__name__}: {e}); "
            "check the network, or set HF_HUB_OFFLINE=1 to use the Hub cache only"
        )
    return f"{where}Hub repo {at}: {type(e).__name__}: {e}"


def _chain(e: BaseException | None):
    """``e``, then its ``__cause__``/``__context__``, and so on (each once)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
    """Whether a failure is worth retrying: network trouble, timeouts, HTTP 408/409/429/5xx.

    Looks through ``__cause__``/``__context__`` (huggingface_hub wraps LFS upload errors,
    and ``snapshot_download`` turns a connection error into ``LocalEntryNotFoundError``).
    Offline mode (``HF_HUB_OFFLINE``) is never transient: waiting does not change it.
    """
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for x in _chain(e):
        if isinstance(x, OfflineModeIsEnabled):
            return False
        if isinstance(x, HfHubHTTPError):
            resp = getattr(x, "response", None)
            return resp is not None and resp.status_code in TRANSIENT_STATUS
        if isinstance(x, httpx2.TransportError | ConnectionError | TimeoutError):
            return True
    return False


def server_wait(e: BaseException) -> float | None:
    """Seconds a rate-limited answer (HTTP 429) asks to wait before the next request, or None.

    As huggingface_hub's ``http_backoff``: the ``RateLimit`` headers (IETF draft, read with
    ``huggingface_hub.utils.parse_ratelimit_headers``) when no request is left in the
    window, else a ``Retry-After`` given in seconds; plus one second for rounding.
    """
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import parse_ratelimit_headers

    for x in _chain(e):
        resp = getattr(x, "response", None) if isinstance(x, HfHubHTTPError) else None
        if resp is None or resp.status_code != 429:
            continue
        info = parse_ratelimit_headers(resp.headers)
        if info is not None and info.remaining == 0:
            return float(info.reset_in_seconds) + 1
        after = str(resp.headers.get("retry-after", "")).strip()
        if after.isdigit():
            return float(after) + 1
    return None


def with_retries(
    fn: Callable[[], Any],
    *,
    what: str,
    repo: str | None = None,
    failure: Callable[[BaseException, int], str] | None = None,
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """Call ``fn`` until it succeeds, retrying transient failures with exponential backoff.

    Makes at most ``retries`` attempts, waiting ``backoff``, ``2·backoff``, ... (at most
    :data:`MAX_BACKOFF_S`) in between, or what a rate-limited answer asks for
    (:func:`server_wait`, at most :data:`MAX_RATELIMIT_WAIT_S`). A :class:`MergebakeError`
    or a failure that is not transient (:func:`is_transient`) ends it at once. The last
    failure is raised as a :class:`MergebakeError` whose message is ``failure(error,
    attempts)``, by default ``"<what> failed[ after N attempts]: <explain_hub_error>"``.
    """

    def default(e: BaseException, attempts: int) -> str:
        note = f" after {attempts} attempts" if attempts > 1 else ""
        return f"{what} failed{note}: {explain_hub_error(e, repo=repo or '?')}"

    failure = failure or default
    retries = max(1, retries)
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except MergebakeError:
            raise
        except Exception as e:
            if attempt >= retries or not is_transient(e):
                raise MergebakeError(failure(e, attempt)) from e
            delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S)
            asked = server_wait(e)
            if asked is not None:
                delay = min(asked, MAX_RATELIMIT_WAIT_S)
            log.warning(
                "%s: attempt %d/%d failed (%s: %s); retrying in %.1f s",
                what,
                attempt,
                retries,
                type(e).__name__,
                e,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")


def hub_url(repo: str, path: str = "", *, rev: str = "main") -> str:
    """Web address of ``repo`` (of folder ``path`` in it at ``rev``) on the configured
    endpoint (``HF_ENDPOINT``, default ``https://huggingface.co``)."""
    from huggingface_hub import constants

    base = f"{constants.ENDPOINT.rstrip('/')}/{repo}"
    return f"{base}/tree/{rev}/{path}" if path else base


def commit_url(repo: str, oid: str) -> str:
    """Web address of commit ``oid`` of ``repo``."""
    return f"{hub_url(repo)}/commit/{oid}"


__all__ = [
    "BACKOFF_S",
    "RETRIES",
    "commit_url",
    "explain_hub_error",
    "hub_url",
    "is_transient",
    "key_prefix",
    "server_wait",
    "token_hint",
    "with_retries",
]
