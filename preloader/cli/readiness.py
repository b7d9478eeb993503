"""``preloader wait``: poll a ``/readyz`` (or ``/startz``) URL until it answers 200.

Standard library only (``urllib``), so it stays light inside a server image:
``preloader wait && exec python3 -m sglang.launch_server ...``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from ..settings import WaitConfig

__all__ = ["Poll", "check_url", "poll_once", "wait_ready"]

_REQUEST_TIMEOUT = 5.0
# A 4xx means the URL is wrong (a typo, a path the sidecar does not serve), not "not yet":
# the gates answer 503 until they open. 408 and 429 are about timing, so they are retried.
_RETRIED_4XX = frozenset({408, 429})
# The probe goes to the sidecar next door: never through an HTTP(S)_PROXY from the
# environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Poll:
    """One answer: the HTTP status (``None`` when there was none) and why."""

    status: int | None
    detail: str

    @property
    def ready(self) -> bool:
        return self.status == 200

    @property
    def refused(self) -> bool:
        """A 4xx that waiting will not change (anything but 408 and 429)."""
        return (
            self.status is not None
            and 400 <= self.status < 500
            and (self.status not in _RETRIED_4XX)
        )


def check_url(url: str) -> str:
    """Accept only ``http``/``https`` URLs with a host and, if given, a valid port.

    :raises UsageError: naming the URL and what is wrong with it otherwise (a bad IPv6
        literal, a port that is not a number or above 65535, spaces or control characters).
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for ":abc" and for 99999
        host = parts.hostname
    except ValueError as err:
        raise UsageError(f"{url}: not a valid URL: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc or not host:
        raise UsageError(f"{url}: not an http:// or https:// URL")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise UsageError(f"{url}: not a valid URL: spaces or control characters")
    if port == 0:
        raise UsageError(f"{url}: not a valid URL: port 0")
    return url


def _reason(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(document, dict):
        return str(document.get("reason") or document.get("state") or "")
    return ""


def poll_once(url: str, timeout: float = _REQUEST_TIMEOUT) -> Poll:
    """GET ``url`` once, within ``timeout`` seconds in all; connection failures are an
    answer too (``status=None``).

    The timeout bounds the whole exchange, not each socket read: a server that sends its
    status line or body a byte at a time cannot hold the poll past it. The request runs in
    a daemon thread that is abandoned when the time is up.

    :raises UsageError: for a URL that is not http(s) (never ``file:``).
    """
    check_url(url)
    answers: list[Poll] = []
    thread = threading.Thread(
        target=lambda: answers.append(_request(url, timeout)), name="preloader-wait", daemon=True
    )
    thread.start()
    thread.join(timeout)
    if not answers:
        return Poll(None, f"no complete answer within {timeout:g} s")
    return answers[0]


def _request(url: str, timeout: float) -> Poll:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return Poll(response.status, _reason(response.read(64 * 1024)))
    except urllib.error.HTTPError as err:
        with err:
            return Poll(err.code, _reason(err.read(64 * 1024)))
    except (urllib.error.URLError, OSError) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        return Poll(None, str(getattr(reason, "strerror", None) or reason))
    except (ValueError, http.client.HTTPException) as err:  # a reply that is not HTTP
        return Poll(None, f"not an HTTP answer: {type(err).__name__}: {err}")


def wait_ready(
    config: WaitConfig,
    on_change: Callable[[Poll], None] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Poll | None:
    """Poll ``config.url`` every ``config.interval`` seconds until it answers 200.

    Connection failures, 5xx (the gates' 503) and 408/429 mean "not yet".

    :param config: the URL, the timeout (``None``: for ever) and the pause between polls.
    :param on_change: called with each answer that differs from the one before.
    :param clock: the monotonic clock the timeout is measured on.
    :param sleep: how to pause between polls.
    :return: the 200 answer, or ``None`` when ``config.timeout`` ran out first.
    :raises UsageError: the URL is not http(s), or it answered a 4xx other than 408/429
        (a wrong URL never turns ready), naming the URL and the status.
    """
    url = check_url(config.url)
    deadline = None if config.timeout is None else clock() + config.timeout
    last: Poll | None = None
    while True:
        remaining = None if deadline is None else deadline - clock()
        if remaining is not None and remaining <= 0:
            return None
        limit = _REQUEST_TIMEOUT if remaining is None else min(_REQUEST_TIMEOUT, remaining)
        answer = poll_once(url, max(0.05, limit))
        if answer != last and on_change is not None:
            on_change(answer)
        last = answer
        if answer.ready:
            return answer
        if answer.refused:
            detail = f" ({answer.detail})" if answer.detail else ""
            raise UsageError(
                f"{url}: answered HTTP {answer.status}{detail}; a wrong URL never turns "
                "ready (the sidecar's gates are /readyz and /startz)"
            )
        pause = config.interval
        if deadline is not None:
            pause = min(pause, max(0.0, deadline - clock()))
        sleep(pause)
