"""mergebake.hub: which Hub failures are retried, how long a rate limit asks to wait, and the
web addresses. No network."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from mergebake import MergebakeError
from mergebake.hub import commit_url, hub_url, is_transient, server_wait, with_retries

URL = "https://huggingface.co/api/models/org/x"


def _http(cls, status: int, headers: dict | None = None):
    resp = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", URL))
    return cls(f"{status} error", response=resp)


def _wrapped(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        raise outer from cause
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_http(HfHubHTTPError, 503), True),
        (_http(HfHubHTTPError, 409), True),  # a concurrent commit
        (_http(HfHubHTTPError, 429), True),
        (_http(HfHubHTTPError, 404), False),
        (_http(RepositoryNotFoundError, 401), False),
        (httpx2.ReadTimeout("slow"), True),
        (ConnectionResetError("reset"), True),
        (_wrapped(LocalEntryNotFoundError("no cache"), httpx2.ConnectError("down")), True),
        (_wrapped(LocalEntryNotFoundError("no cache"), OfflineModeIsEnabled("offline")), False),
        (OfflineModeIsEnabled("offline"), False),  # a ConnectionError, but waiting won't help
        (ValueError("bad"), False),
    ],
)
def test_what_is_transient(error, transient):
    assert is_transient(error) is transient


def test_rate_limit_waits():
    limited = {
        "ratelimit": '"api";r=0;t=55',
        "ratelimit-policy": '"fixed window";"api";q=500;w=300',
    }
    assert server_wait(_http(HfHubHTTPError, 429, limited)) == 56.0
    assert server_wait(_http(HfHubHTTPError, 429, {"Retry-After": "7"})) == 8.0
    assert server_wait(_http(HfHubHTTPError, 429, {"ratelimit": '"api";r=3;t=55'})) is None
    assert server_wait(_http(HfHubHTTPError, 503, {"Retry-After": "7"})) is None


def test_with_retries_names_what_failed_and_stops_at_once_when_not_transient():
    calls, sleeps = [], []

    def missing():
        calls.append(1)
        raise _http(RepositoryNotFoundError, 404)

    with pytest.raises(MergebakeError, match=r"^upload of x failed: Hub repo 'org/x' not found"):
        with_retries(missing, what="upload of x", repo="org/x", sleep=sleeps.append)
    assert calls == [1] and sleeps == []


def test_urls(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example/")
    assert hub_url("org/r") == "https://hub.example/org/r"
    assert (
        hub_url("org/r", "1b-std/g__m", rev="abc")
        == "https://hub.example/org/r/tree/abc/1b-std/g__m"
    )
    assert commit_url("org/r", "abc") == "https://hub.example/org/r/commit/abc"
