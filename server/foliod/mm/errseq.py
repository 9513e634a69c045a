"""Writeback error sequences (lib/errseq.c): report each error once per file description.

An errseq value holds the last errno in bits 0-11, a SEEN flag at bit 12 and a counter from
bit 13. Recording a new error bumps the counter only if the previous one was seen, so an error
nobody has seen yet is not hidden by a later one.
"""

from __future__ import annotations

MAX_ERRNO = (1 << 12) - 1
ERRSEQ_SEEN = 1 << 12
ERRSEQ_CTR_INC = 1 << 13


def errseq_set(eseq: int, errno_value: int) -> int:
    """The value after an error (errno_value > 0) is recorded."""
    new = (eseq & ~(MAX_ERRNO | ERRSEQ_SEEN)) | (errno_value & MAX_ERRNO)
    if eseq & ERRSEQ_SEEN:
        new += ERRSEQ_CTR_INC
    return new


def errseq_sample(eseq: int) -> int:
    """What a new opener records: an unseen error stays visible to it (returns 0)."""
    return eseq if eseq & ERRSEQ_SEEN else 0


def errseq_check_and_advance(eseq: int, since: int) -> tuple[int, int, int]:
    """(errno to report or 0, the new sample, the new errseq value marked seen)."""
    if eseq == since:
        return 0, since, eseq
    seen = eseq | ERRSEQ_SEEN if eseq else eseq
    return seen & MAX_ERRNO, seen, seen
