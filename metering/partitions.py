"""Which metering process owns which usage partition. No I/O.

Usage is partitioned by user (`schemas.subjects.usage_partition`); each partition is
applied by one metering process at a time, so that its batches are applied in stream
order and can be taken in groups. Every running process renews a member key; each takes
its fair share of the partitions (the members sorted, partition `p` to member `p mod n`)
and gives back the ones that are no longer its share, so a process that starts gets its
share within a few renewals and one that dies leaves its share when its claims expire.

The safety of a handover does not depend on who believes what when: a new owner makes the
partition's consumer afresh (it then starts at the first batch not acknowledged), a ledger
skips a batch at or below its partition's high-water mark, and an old owner stops taking
batches once its claim may have lapsed (`Claim.holds`). Whatever an old owner still
applies meanwhile is either before the new owner's read of a ledger (and then skipped by
it) or after (and then skipped by the old owner).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from schemas.subjects import USAGE_PARTITIONS


def fair_share(members: Iterable[str], me: str, partitions: int = USAGE_PARTITIONS) -> frozenset[int]:
    """The partitions member `me` should own when `members` run (`me` counts, listed or not)."""
    ordered = sorted(set(members) | {me})
    index, count = ordered.index(me), len(ordered)
    return frozenset(p for p in range(partitions) if p % count == index)


@dataclass(frozen=True)
class Steps:
    """What one round of the ownership loop does."""

    claim: frozenset[int]  # free and ours to take
    release: frozenset[int]  # ours and no longer our share: finish the group in hand, then let go
    renew: frozenset[int]  # ours, and staying ours


def plan(share: frozenset[int], owned: frozenset[int], holders: dict[int, str | None], me: str) -> Steps:
    """This round's steps, from our `share`, what we `owned` and who holds each partition
    (None: no live claim). A partition of our share held by another is waited for: its
    holder gives it back when it sees us (or its claim expires). One whose claim names us
    though we do not own it (our claim's write landed but its answer was lost) is taken."""
    claim = frozenset(p for p in share - owned if holders.get(p) in (None, me))
    return Steps(claim=claim, release=owned - share, renew=owned & share)


@dataclass
class Claim:
    """A partition this process owns: the claim's KV revision and until when it surely holds.

    `valid_until` (the event loop's clock) is when the last renewal was sent plus two
    thirds of the TTL: the server expires the claim a full TTL after it stored it, which
    is later, so a process that stops taking batches at `valid_until` has stopped before
    anyone can take the partition over. A fetch of batches started before `valid_until`
    lasts at most `fetch_wait_s` (a sixth of the TTL), so it ends before that too: it can
    never take batches from the consumer a new owner made.
    """

    partition: int
    revision: int
    valid_until: float
    releasing: bool = False

    def holds(self, now: float) -> bool:
        """Whether to take another group of batches."""
        return not self.releasing and now < self.valid_until


def valid_until(sent_at: float, ttl_s: float) -> float:
    """Until when a claim written at `sent_at` surely holds (see `Claim`)."""
    return sent_at + ttl_s * 2 / 3


def fetch_wait_s(ttl_s: float) -> float:
    """How long one fetch of a partition's batches may wait (see `Claim`)."""
    return min(1.0, ttl_s / 6)
