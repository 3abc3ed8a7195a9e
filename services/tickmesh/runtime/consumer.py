"""A JetStream pull consumer that holds a standing pull request and hands its
owner whatever is queued, as one batch.

Batches grow with load and shrink to one message when idle, with no linger:
the loop waits only for the first message, then takes every message already
delivered. (nats-py's ``fetch(n)`` waits for n messages or its timeout, which
at low load turns into latency.) Pull requests expire and are renewed. After a
reconnect they are renewed at once, on a new inbox: a restarted server lost
them, and one that kept them (the client only lost its link) must not count
against the new ones.

Two ways to ask for messages:

* ``auto=True``: keep up to ``max_batch`` requested at all times (state, router).
* ``auto=False``: the owner calls :meth:`pull` with the capacity it has free
  (the executor pool, which must never hold more than its executors can run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError

from tickmesh.sdk import BODY_KINDS, BodyKind, ValidationError

from .nats import watch
from .nats_wire import deliver_inline
from .subjects import HDR_TYPE

logger = logging.getLogger(__name__)

BatchHandler = Callable[[list[Msg]], Awaitable[None]]

PULL_EXPIRES_S = 5.0
RETRY_FAILED_BATCH_S = 1.0
"""How long JetStream holds back a batch whose handler raised before redelivering it."""
RETIRED_INBOX_S = PULL_EXPIRES_S * 2
"""How long an inbox replaced at a reconnect still takes messages: pull requests the
server kept across the reconnect deliver there until they expire."""
NO_RESPONDERS_RETRY_S = 0.25
"""The pause before asking again when JetStream did not answer a pull request (503:
e.g. a server just restarted whose JetStream is not ready yet)."""
_STATUS = "Status"
_PENDING = "Nats-Pending-Messages"


class BatchConsumer:
    """Consume a durable pull consumer in batches.

    The handler acks, naks or terms every message it is given; if it raises, the
    messages it did not settle are naked and JetStream redelivers them after
    ``RETRY_FAILED_BATCH_S``.
    """

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        *,
        stream: str,
        config: ConsumerConfig,
        handler: BatchHandler,
        max_batch: int = 256,
        auto: bool = True,
        name: str = "",
        on_request_end: Callable[[], None] | None = None,
        linger_s: float = 0.0,
    ) -> None:
        """``linger_s``: how long a batch smaller than ``max_batch`` waits for more
        messages before it is handled (0: handled at once). For consumers off a step's
        critical path, where fewer, larger batches cost less CPU per message; a reader
        waiting for what is on the bus calls :meth:`hurrying` meanwhile."""
        assert config.durable_name, "durable consumers only"
        self._nc = nc
        self._js = js
        self._stream = stream
        self._config = config
        self._handler = handler
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._hurried = 0
        """Readers inside :meth:`hurrying`: while any is, batches do not linger."""
        self._auto = auto
        self._name = name or f"{stream}/{config.durable_name}"
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._queued = 0
        self._on_request_end = on_request_end
        self._outstanding = 0
        self._sub: Subscription | None = None
        self._inbox = ""
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._unwatch: Callable[[], None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._retired: dict[Subscription, asyncio.Task[None]] = {}

    @property
    def outstanding(self) -> int:
        """Messages requested from the server and not yet delivered."""
        return self._outstanding

    @property
    def queued(self) -> int:
        """Messages delivered to this process and not yet handed to the handler."""
        return self._queued

    async def start(self) -> None:
        await ensure_consumer(self._js, self._stream, self._config)
        self._inbox = self._nc.new_inbox()
        self._sub = await self._subscribe(self._inbox)
        self._unwatch = watch(self._nc).on_reconnect(self._on_reconnected)
        if self._auto:
            await self._replenish()
        self._task = asyncio.create_task(self._run(), name=f"consumer:{self._name}")

    @contextlib.contextmanager
    def hurrying(self) -> Iterator[None]:
        """While inside, no batch lingers, and one lingering now is handled at once: for
        a reader that waits until what is on the bus has been handled, who would
        otherwise wait out each linger."""
        self._hurried += 1
        self._queue.put_nowait(_WAKE)  # ends a linger under way
        try:
            yield
        finally:
            self._hurried -= 1

    async def stop(self) -> None:
        """Stop taking batches; the one being handled is allowed to finish."""
        self._stopping = True
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._renewal is not None:
            # Quick (a subscribe is only queued): let it finish, so its inbox is released.
            with contextlib.suppress(Exception):
                await self._renewal
            self._renewal = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sub, dropping in list(self._retired.items()):
            dropping.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._retired.clear()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        # Delivered but never handed out: give them back at once.
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if msg is _WAKE:
                continue
            self._queued -= 1
            with contextlib.suppress(Exception):
                await msg.nak()

    async def pull(self, count: int) -> None:
        """Ask the server for up to ``count`` more messages."""
        if count <= 0 or self._stopping or self._sub is None:
            return
        request = {"batch": count, "expires": int(PULL_EXPIRES_S * 1e9)}
        subject = f"{self._js._prefix}.CONSUMER.MSG.NEXT.{self._stream}.{self._config.durable_name}"
        self._outstanding += count
        try:
            await self._nc.publish(subject, json.dumps(request).encode(), reply=self._inbox)
        except Exception:
            self._outstanding -= count
            raise

    async def _replenish(self) -> None:
        # Keep between half and all of max_batch requested.
        if self._outstanding <= self._max_batch // 2:
            await self.pull(self._max_batch - self._outstanding)

    async def _subscribe(self, inbox: str) -> Subscription:
        """Subscribe to a pull inbox; its messages are taken in the client's read loop
        where the client can (nats_wire.deliver_inline), else by the callback."""

        def take(msg: Msg) -> None:
            self._on_msg(msg, current=inbox == self._inbox)

        async def receive(msg: Msg) -> None:
            take(msg)

        sub = await self._nc.subscribe(inbox, cb=receive)
        deliver_inline(self._nc, sub, take)
        return sub

    def _on_msg(self, msg: Msg, *, current: bool = True) -> None:
        """A delivery or a status. On a retired inbox (``current`` False) only the
        deliveries count: they are handled like any other, but the requests they
        answer are no longer in :attr:`outstanding`."""
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None and not msg.data and msg.headers and "Nats-Last-Consumer" in msg.headers:
            status = "100"
        if status is not None:
            if current:
                self._on_status(status, msg)
            return
        if current:
            self._outstanding = max(0, self._outstanding - 1)
        self._queued += 1
        self._queue.put_nowait(msg)

    def _on_reconnected(self) -> None:
        """The connection is back: what was requested before is lost (a restarted server)
        or is on its way to an inbox that is about to be retired. Ask again at once
        rather than wait for the lost requests' expiry to be noticed."""
        if self._stopping or self._sub is None:
            return  # not started, stopping, or a renewal is already under way
        old, self._sub = self._sub, None  # no pull until the new inbox is subscribed
        self._renewal = asyncio.create_task(self._renew(old), name=f"renew:{self._name}")

    async def _renew(self, old: Subscription) -> None:
        try:
            inbox = self._nc.new_inbox()
            sub = await self._subscribe(inbox)
        except Exception as exc:  # dropped again: keep the old inbox, ask again on it
            logger.warning("%s: cannot renew the pull inbox: %s", self._name, exc)
            self._sub = old
        else:
            self._inbox, self._sub = inbox, sub
            self._retired[old] = asyncio.create_task(self._retire(old))
        self._outstanding = 0
        self._queue.put_nowait(_WAKE)
        if self._on_request_end is not None:
            self._on_request_end()

    async def _retire(self, sub: Subscription) -> None:
        await asyncio.sleep(RETIRED_INBOX_S)
        self._retired.pop(sub, None)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    def _on_status(self, status: str, msg: Msg) -> None:
        if status == "100":  # idle heartbeat / flow control
            return
        # 404 no messages, 408 request expired, 409 consumer changed or
        # max waiting exceeded: the request is over; what it did not deliver
        # is no longer coming.
        pending = msg.headers.get(_PENDING) if msg.headers else None
        if pending is not None and pending.isdigit():
            self._outstanding = max(0, self._outstanding - int(pending))
        else:
            self._outstanding = 0
        if status not in {"404", "408"}:
            logger.debug("%s: pull status %s %s", self._name, status, msg.headers)
        if status == "503":
            # Nothing answered the request: asking again at once would spin until
            # JetStream is back.
            asyncio.get_running_loop().call_later(NO_RESPONDERS_RETRY_S, self._request_ended)
        else:
            self._request_ended()

    def _request_ended(self) -> None:
        if self._stopping:
            return
        self._queue.put_nowait(_WAKE)
        if self._on_request_end is not None:
            # auto=False owners renew their own requests: tell them one ended.
            self._on_request_end()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                first = await asyncio.wait_for(self._queue.get(), PULL_EXPIRES_S * 1.5)
            except TimeoutError:
                # No message and no expiry notice: the request was lost (e.g. a
                # broker restart). Start over, and tell an owner that pulls for itself.
                self._outstanding = 0
                await self._safe_replenish()
                if self._on_request_end is not None:
                    self._on_request_end()
                continue
            batch = [] if first is _WAKE else [first]
            self._take_queued(batch)
            if batch and self._linger_s > 0 and not self._hurried and len(batch) < self._max_batch:
                await self._linger(batch)
            self._queued -= len(batch)
            if self._auto:
                await self._safe_replenish()
            if not batch:
                continue
            try:
                await self._handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "%s: handler failed on a batch of %d; it will be redelivered in %g s",
                    self._name,
                    len(batch),
                    RETRY_FAILED_BATCH_S,
                )
                await self._hand_back(batch)

    def _take_queued(self, batch: list[Msg]) -> None:
        while len(batch) < self._max_batch and not self._queue.empty():
            msg = self._queue.get_nowait()
            if msg is not _WAKE:
                batch.append(msg)

    async def _linger(self, batch: list[Msg]) -> None:
        """Let ``batch`` grow for up to ``linger_s`` (or until it is full)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger_s
        while len(batch) < self._max_batch and not self._hurried:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                msg = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                return
            if msg is not _WAKE:
                batch.append(msg)
            self._take_queued(batch)

    async def _hand_back(self, batch: list[Msg]) -> None:
        """Nak a failed batch with a short delay rather than wait out ``ack_wait``: a
        store that was restarting is usually back within seconds. Messages the handler
        did settle before it failed refuse the nak, which is what we want."""
        for msg in batch:
            with contextlib.suppress(Exception):
                await msg.nak(delay=RETRY_FAILED_BATCH_S)

    async def _safe_replenish(self) -> None:
        try:
            if self._auto:
                await self._replenish()
        except Exception as exc:  # disconnected: the next loop turn retries
            logger.warning("%s: cannot request messages: %s", self._name, exc)
            await asyncio.sleep(0.2)


class _Wake(Msg):
    """A sentinel that wakes the loop when a pull request ends."""

    def __init__(self) -> None:
        pass


_WAKE: Msg = _Wake()


def durable_config(
    durable: str, filter_subject: str, *, ack_wait_s: float, max_ack_pending: int = 50_000
) -> ConsumerConfig:
    """The one policy of tickmesh's durable consumers: explicit acks, and unlimited
    deliveries (the owner decides retries and dead letters itself), with a wide
    ack-pending window so batches can grow."""
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
    )


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """Create the durable consumer; an existing one with another config is kept."""
    try:
        await js.add_consumer(stream, config)
    except BadRequestError as exc:
        if "already exists" not in str(exc).lower():
            raise
        logger.warning(
            "consumer %s/%s exists with another config: %s", stream, config.durable_name, exc
        )


def message_type(msg: Msg) -> BodyKind:
    """The body kind announced in the Tickmesh-Type header: checked, never guessed.

    Raises:
        ValidationError: The header is missing or names no known body kind.
    """
    kind = (msg.headers or {}).get(HDR_TYPE)
    if kind is None:
        raise ValidationError(f"message on {msg.subject} has no {HDR_TYPE} header")
    if kind not in BODY_KINDS:
        raise ValidationError(f"message on {msg.subject} has unknown {HDR_TYPE} {kind!r}")
    return kind


async def term(msg: Msg, reason: str) -> None:
    """Terminate a message with a reason (kept in the MSG_TERMINATED advisory).

    nats-py's ``Msg.term()`` takes no reason, so the protocol's ``+TERM reason``
    is sent directly.
    """
    if msg.reply:
        await msg._client.publish(msg.reply, b"+TERM " + reason.encode()[:512])
