"""The emulator's quota: per-minute budgets enforced as Azure enforces them, over sliding 10 s windows."""

from __future__ import annotations

import math
from collections import deque

QUOTA_WINDOW_S = 10.0  # Azure enforces a per-minute quota over 10 s windows, a sixth of it each
WINDOWS_PER_MINUTE = 6
RPM_PER_1000_TPM = 6  # Azure's default ratio when only a token quota is set


class QuotaWindow:
    """Per-minute budgets enforced as Azure does: a sixth of each over a sliding 10 s window.

    Pure: the caller passes the loop time. A request bigger than the whole window can never fit; it is
    told to wait a full window, so a client honouring retry-after is slowed rather than spun.
    """

    def __init__(self, tokens_per_minute: int, requests_per_minute: int) -> None:
        if requests_per_minute <= 0 < tokens_per_minute:
            requests_per_minute = max(1, tokens_per_minute * RPM_PER_1000_TPM // 1000)
        self.token_limit = tokens_per_minute / WINDOWS_PER_MINUTE if tokens_per_minute > 0 else math.inf
        # at least one request per window, or a small RPM would refuse everything
        self.request_limit = max(1.0, requests_per_minute / WINDOWS_PER_MINUTE)
        self._charges: deque[tuple[float, int]] = deque()  # (loop time, tokens), oldest first
        self._tokens = 0

    def _expire(self, now: float) -> None:
        while self._charges and self._charges[0][0] <= now - QUOTA_WINDOW_S:
            self._tokens -= self._charges.popleft()[1]

    def try_charge(self, now: float, cost_tokens: int) -> tuple[float, str] | None:
        """Charge one request: None when it fits, else (seconds to wait, "token" or "call")."""
        self._expire(now)
        over_tokens = self._tokens + cost_tokens - self.token_limit
        over_requests = len(self._charges) + 1 - self.request_limit
        if over_tokens <= 0 and over_requests <= 0:
            self._charges.append((now, cost_tokens))
            self._tokens += cost_tokens
            return None
        limit = "token" if over_tokens > 0 else "call"
        freed_tokens = freed_requests = 0
        for at, charged in self._charges:  # wait until enough of the oldest charges leave the window
            freed_tokens, freed_requests = freed_tokens + charged, freed_requests + 1
            if freed_tokens >= over_tokens and freed_requests >= over_requests:
                return at + QUOTA_WINDOW_S - now, limit
        return QUOTA_WINDOW_S, limit

    def remaining_headers(self, now: float) -> dict[str, str]:
        """What is left in the window, scaled per minute as Azure reports it."""
        self._expire(now)
        left = {
            "x-ratelimit-remaining-requests": self.request_limit - len(self._charges),
            "x-ratelimit-remaining-tokens": self.token_limit - self._tokens,
        }
        return {name: str(max(0, int(n * WINDOWS_PER_MINUTE))) for name, n in left.items() if n != math.inf}
