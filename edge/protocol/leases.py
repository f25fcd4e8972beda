"""An edge id's lease: when to take it, wait for it, or refuse it; what a lost renewal means. No I/O.

Two processes must never serve one edge id: they would take the lease from each other in
turn, each time closing all their sockets. Each incarnation answers on its own subject,
so a process that finds the lease held can ask its holder (`edge.leases` does the I/O).
"""

from __future__ import annotations

import enum

# What an incarnation answers on its incarnation subject.
RUNNING = b"running"
STOPPING = b"stopping"
GONE = b""  # NATS answered "no responders": nobody subscribes for that incarnation


class Holder(enum.Enum):
    """What to do about another incarnation holding the lease."""

    TAKE_OVER = "take over"  # its process is gone: take the lease at once (logged)
    WAIT = "wait"  # stopping, or silent: wait for its lease to go
    REFUSE = "refuse"  # it runs: this process cannot serve the id


def judge_holder(answer: bytes | None, renewed_while_silent: bool) -> Holder:
    """The verdict on the lease's holder from what it `answer`ed (None: not in time).

    A holder that is gone from NATS (crashed, or cut off and unable to renew; should it
    come back it finds the id taken and stops) is taken over at once, so an edge restarted
    after a crash does not wait for its old lease. One that says it runs, or that is silent
    and yet renewed its lease meanwhile, runs: refused. Stopping or silent: waited for.
    """
    if answer == RUNNING or (answer is None and renewed_while_silent):
        return Holder.REFUSE
    if answer == GONE:
        return Holder.TAKE_OVER
    return Holder.WAIT


class AfterLostRace(enum.Enum):
    """What a renewal refused for a wrong revision means."""

    RENEW_NOW = "renew now"  # one of our own renewals landed unseen: the lease never lapsed
    STOP = "stop"  # the edge is stopping: its sockets are being closed anyway
    START_OVER = "start over"  # the lease expired or was taken: a new incarnation


def after_lost_race(still_ours: bool, stopping: bool) -> AfterLostRace:
    """A renewal lost its compare-and-set. Busy or slow moments must not cost a live edge
    its lease and every socket: if the key still holds this incarnation's lease, a renewal
    whose answer timed out landed, and nothing is lost. Only a lease really gone starts
    the edge over, as a new incarnation (the old one's peers were told `timeout`)."""
    if still_ours:
        return AfterLostRace.RENEW_NOW
    if stopping:
        return AfterLostRace.STOP
    return AfterLostRace.START_OVER


def renewal_overdue(since_renewed_s: float, ttl_s: float) -> bool:
    """Whether renewals have failed for so long that the lease must be taken for expired.

    Other edges see a lease expire a TTL after its last write and tell our sockets' peers
    `timeout`. An edge that cannot reach storage for that long (its NATS node cut off from
    the cluster) still holds sockets whose frames go nowhere: it closes them 1001 (their
    clients reconnect, through the load balancer, to an edge that works) and takes no new
    ones until it holds a lease again, rather than waiting for storage to come back.
    """
    return since_renewed_s >= ttl_s
