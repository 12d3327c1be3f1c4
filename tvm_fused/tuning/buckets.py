"""Token-count buckets: MetaSchedule tunes static shapes, the op is dynamic in tokens.

Each bucket is tuned on a realistic batch: decode buckets (up to 64 tokens) are one new token
for each of as many requests with long cached contexts; prefill buckets are a few requests
of many new tokens. At run time the call's token count (``q_rope.shape[0]``, known on the
host) picks the nearest bucket on a log scale, with no device sync.
"""

from __future__ import annotations

import bisect
import itertools
import math

BUCKETS = (1, 8, 64, 512, 4096, 32768)
DECODE_MAX = 64


def bucket_case(tokens: int, decode_max: int = DECODE_MAX) -> tuple[list[int], list[int]]:
    """``(new_tokens, cache_lengths)`` per request for ``tokens`` tokens: a decode step (one
    new token for each of ``tokens`` requests, 1k-4k cached) up to ``decode_max`` tokens,
    else a prefill (a few requests, up to 8, of many new tokens)."""
    if tokens <= decode_max:
        return [1] * tokens, [1024 + (977 * i) % 3072 for i in range(tokens)]
    requests = max(1, min(8, tokens // 512))
    base, extra = divmod(tokens, requests)
    new = [base + (i < extra) for i in range(requests)]
    return new, [(331 * i) % 2048 for i in range(requests)]


def thresholds(buckets) -> tuple[int, ...]:
    """For sorted ``buckets``, the smallest token count each bucket after the first serves:
    the geometric midpoint of it and the one before, rounded up (``t^2 >= lower * upper``;
    ties go to the larger bucket)."""
    return tuple(math.isqrt(lower * upper - 1) + 1
                 for lower, upper in itertools.pairwise(buckets))


def nearest_bucket(tokens: int, buckets=BUCKETS) -> int:
    """The bucket closest to ``tokens`` in log scale (ties go to the larger)."""
    ordered = sorted(buckets)
    return ordered[bisect.bisect_right(thresholds(ordered), tokens)]
