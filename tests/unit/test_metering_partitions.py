"""Who owns which usage partition (metering.partitions), without I/O."""

from __future__ import annotations

from metering.partitions import Claim, fair_share, plan, valid_until
from schemas.subjects import USAGE_PARTITIONS, partition_consumer, usage_partition


def test_the_members_shares_cover_every_partition_once_and_differ_by_at_most_one():
    for count in (1, 2, 3, 4, 5, 16, 20):
        members = [f"m{i:02d}" for i in range(count)]
        shares = [fair_share(members, m) for m in members]
        assert sorted(p for share in shares for p in share) == list(range(USAGE_PARTITIONS))
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1


def test_a_member_not_yet_listed_counts_itself_in():
    assert fair_share([], "me") == frozenset(range(USAGE_PARTITIONS))
    assert len(fair_share(["other"], "me")) == USAGE_PARTITIONS // 2


def test_a_round_claims_the_free_partitions_of_the_share_and_waits_for_held_ones():
    share = frozenset({0, 2, 4})
    steps = plan(share, owned=frozenset({2, 7}), holders={0: None, 2: "me", 4: "other", 7: "me"}, me="me")
    assert steps.claim == {0}  # 4 is held by another: it gives it back when it sees us
    assert steps.release == {7}  # no longer our share
    assert steps.renew == {2}


def test_a_claim_naming_us_that_we_do_not_own_is_taken_our_write_landed_unanswered():
    steps = plan(frozenset({1, 3}), owned=frozenset(), holders={1: "me", 3: "other"}, me="me")
    assert steps.claim == {1}


def test_a_claim_holds_until_two_thirds_of_its_ttl_after_its_renewal_was_sent_and_not_while_released():
    claim = Claim(partition=3, revision=9, valid_until=valid_until(sent_at=100.0, ttl_s=9.0))
    assert claim.holds(105.9) and not claim.holds(106.0)
    claim.releasing = True
    assert not claim.holds(100.0)


def test_a_users_partition_is_the_same_everywhere_and_users_spread_over_all_partitions():
    assert usage_partition("alice") == usage_partition("alice")  # CRC-32, not the salted hash()
    counts = [0] * USAGE_PARTITIONS
    for i in range(16_000):
        counts[usage_partition(f"user{i}")] += 1
    assert min(counts) > 800 and max(counts) < 1200
    assert partition_consumer(7) == "metering-p07"
