"""Closing the sockets of accounts deleted while they are connected (§12 item 16)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from edge.carrier import Carrier
from edge.context import EdgeContext
from runtime.service import keep_running
from schemas.client import DisconnectReason
from schemas.records import user_decoder
from schemas.subjects import ACCOUNTS_BUCKET, USER_FILTER, kv_subject

log = logging.getLogger("edge")


class AccountWatch:
    """Follows changes of account records; a deleted account's sockets here are closed."""

    def __init__(self, ctx: EdgeContext, carrier: Carrier) -> None:
        self.ctx = ctx
        self.carrier = carrier
        # Accounts deleted while this edge watched: a socket admitted just before its
        # account's deletion arrived is closed when it starts.
        self.deleted_users: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()  # set: recreate the watcher

    def restart(self) -> None:
        """Recreate the watcher (after a NATS reconnect: an ordered consumer would notice its
        gap only after missed heartbeats, and every socket was closed at the reconnect anyway)."""
        self._wake.set()

    async def watch(self, watching: asyncio.Event) -> None:
        """Follow changes of account records from now on (the stream's new messages only): an
        upgrade checks the deleted flag itself. `watching` is set once the watcher is there."""
        ctx = self.ctx

        async def watch_once() -> None:
            self._wake.clear()
            js = ctx.nc.jetstream(timeout=ctx.settings.jetstream_timeout_ms / 1000)
            subscription = await js.subscribe(
                kv_subject(ACCOUNTS_BUCKET, USER_FILTER),
                cb=self._changed,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )
            watching.set()
            waits = [asyncio.ensure_future(ctx.stopping.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

        await keep_running("account watcher", watch_once, ctx.stopping)

    async def _changed(self, msg: Msg) -> None:
        if not msg.data:
            return
        try:
            user = user_decoder.decode(msg.data)
        except msgspec.DecodeError:
            log.error("undecodable account record on %s", msg.subject)
            return
        if not user.deleted:
            return
        self.deleted_users[user.user_id] = None
        while len(self.deleted_users) > self.ctx.settings.deleted_users_kept:
            self.deleted_users.popitem(last=False)
        for conn in list(self.ctx.connections.values()):
            if conn.session.user_id == user.user_id and not conn.closing:
                conn.session.ends_with(DisconnectReason.CLIENT_LEFT)
                self.ctx.spawn(self.carrier.decide_in_order(conn, conn.session.account_deleted), "close a deleted account's socket")
