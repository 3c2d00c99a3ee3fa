"""Asyncio front of an `LLMEngine`: the engine lives in one background thread.

Every engine call after construction (add, step, stats, rpc, shutdown) runs on that thread,
so calls never interleave with a step; only an abort's "is it unfinished?" is decided when it
arrives (`LLMEngine.abort_request` is thread-safe), so a request that finishes in the running
step is still ended. Request handlers talk to it through a command queue and read their
outputs from a per-request asyncio queue fed with `call_soon_threadsafe`.

The thread steps at once while steps compute; otherwise it sleeps until a command, a rank event
(a KV transfer finished: `engine.rank_events`) or a deadline: `idle_step_s` from the last step
(held blocks to free, leases to expire), `WAITING_POLL_S` for an engine without rank events
whose requests wait. A step that applied a rank event's report, or finished a request (which
may have issued a hold its ranks learn of with the next step's metadata), is followed by
another at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    from kvxfer.connectors.metadata import RemoteDecodeParams, RemotePrefillParams
    from kvxfer.engine.engine import LLMEngine
    from kvxfer.engine.rank_events import RankEvents
    from kvxfer.engine.request import RequestOutput
    from kvxfer.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
EngineCommand = Callable[["LLMEngine"], Any]  # runs on the engine thread between steps

WAITING_POLL_S = 0.002  # between steps that computed nothing while requests wait (no rank events)


class EngineDead(RuntimeError):
    """The engine thread stopped (engine error or shutdown); no request can make progress."""


class RequestStream:
    """Outputs of one request, in order. `close()` aborts the request if it is still running."""

    def __init__(self, engine: AsyncEngine, request_id: str):
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.added: concurrent.futures.Future | None = None  # the add command; its result: the Request

    async def next(self) -> RequestOutput:
        """The next RequestOutput; raises EngineDead if the engine stopped."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> None:
        """Stop listening; a request whose end was not seen is ended: aborted, or its hold for a
        remote reader released if it finished meanwhile (nobody got its params). It is named by
        the request the add created, never by id, so another request of that id is safe."""
        if self.engine._streams.get(self.request_id) is self:
            del self.engine._streams[self.request_id]
        if not self.finished:
            self.finished = True
            added = self.added
            if added is not None:  # runs after the add command (one queue, in order)
                self.engine.submit_nowait(lambda e: _end_added(e, added))


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] | None = None,
                 idle_step_s: float = 0.05):
        """`on_finished(output)` runs on the event loop for every finished request, also those
        nobody listens to any more (aborted ones). While no request is unfinished the thread
        still steps every `idle_step_s`, so the connector frees blocks whose readers have
        notified and expires leases."""
        self._engine = engine
        self._on_finished = on_finished
        self._idle_step_s = idle_step_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # A byte per queued command wakes the engine thread's select (with the ranks' events).
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvxfer-engine", daemon=True)
        self.error: BaseException | None = None
        self._step_started: float | None = None  # published by the engine thread for /health

    # --- lifecycle (any thread) ---

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stop.is_set()

    @property
    def step_seconds(self) -> float:
        """How long the engine thread has been inside its current step (0 between steps)."""
        started = self._step_started
        return time.monotonic() - started if started is not None else 0.0

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop; the engine (and its TP workers) is shut down on its thread."""
        self._stop.set()
        self._put(None)  # wake the thread if it is waiting for commands
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # --- asyncio side ---

    async def call(self, fn: Callable[[LLMEngine], T], timeout_s: float = 60.0) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result. The
        time-out also covers a command queued just as the engine thread stopped; a command
        still queued when its caller gives up is skipped."""
        return await self._wait(self._submit(fn), timeout_s)

    def _submit(self, fn: EngineCommand) -> concurrent.futures.Future:
        self._check_alive()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._put((fn, future))
        return future

    def _put(self, item: tuple | None) -> None:
        self._commands.put(item)
        try:
            self._wake_send.send(b"\x01")
        except OSError:
            pass  # full (the thread has wake-ups to read already) or closed (the thread ended)

    @staticmethod
    async def _wait(future: concurrent.futures.Future, timeout_s: float) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)

    def submit_nowait(self, fn: EngineCommand) -> None:
        if self.alive:
            self._put((fn, None))

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
        kv_transfer_params: RemotePrefillParams | RemoteDecodeParams | None,
    ) -> RequestStream:
        """Register the stream first, so no output can be missed, then add the request.
        Errors from `add_request` (e.g. ValueError) propagate and leave nothing behind."""
        self._loop = asyncio.get_running_loop()
        if request_id in self._streams:
            raise KeyError(request_id)  # in flight here; the engine would refuse it too
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream
        try:
            stream.added = self._submit(
                lambda e: e.add_request(request_id, prompt_token_ids, sampling_params, kv_transfer_params))
            await self._wait(stream.added, 60.0)
        except BaseException:
            # Refused: nothing to end. The caller gave up (a time-out, a cancelled handler) while
            # the add ran or after: the request the add made, if any, is ended behind it.
            stream.close()
            raise
        return stream

    async def abort(self, request_id: str, transfer_token: str | None) -> str:
        """`LLMEngine.abort_request`, called off the engine thread so that whether the request is
        unfinished is decided now, not after the running step (which may finish it and hold its
        blocks: the abort then releases them). A release waits for the running step."""
        self._check_alive()
        return await asyncio.wait_for(
            asyncio.to_thread(self._engine.abort_request, request_id, transfer_token), 10.0)

    def is_active(self, request_id: str) -> bool:
        return request_id in self._streams

    def _check_alive(self) -> None:
        if not self.alive:
            raise EngineDead(f"engine is not running: {self.error!r}" if self.error else "engine is not running")

    def _dispatch(self, outputs: list) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)
            if output.finished and self._on_finished is not None:
                self._on_finished(output)

    def _fail_all(self, error: EngineDead) -> None:
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(error)
        self._streams.clear()

    # --- engine thread ---

    def _run(self) -> None:
        engine = self._engine
        try:
            self._serve(engine)
        except BaseException as exc:
            logger.exception("engine loop failed")
            self.error = exc
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._fail_all, EngineDead(f"engine failed: {exc!r}"))
        finally:
            self._stop.set()
            self._drain_commands(EngineDead("engine stopped"))
            try:
                engine.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")
            self._wake_recv.close()
            self._wake_send.close()

    def _serve(self, engine: LLMEngine) -> None:
        events = engine.executor.events  # None without a KV connector
        last_step, stalled, again = 0.0, False, False
        while not self._stop.is_set():
            busy = engine.has_unfinished_requests()
            if again or (busy and not stalled):
                wait_s = 0.0
            elif busy and events is None:
                wait_s = WAITING_POLL_S
            else:
                wait_s = max(0.0, last_step + self._idle_step_s - time.monotonic())
            woke = self._run_commands(engine, wait_s, events)
            if again or woke or engine.has_unfinished_requests() or time.monotonic() - last_step >= self._idle_step_s:
                last_step = self._step_started = time.monotonic()
                try:
                    outputs = engine.step()
                finally:
                    self._step_started = None
                stalled = not outputs and engine.last_step_num_tokens == 0
                again = events is not None and (woke or any(o.finished for o in outputs))
                if outputs and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _run_commands(self, engine: LLMEngine, wait_s: float, events: RankEvents | None) -> bool:
        """Sleep up to `wait_s` for a command or a rank event, run the queued commands; True
        when a rank event came."""
        if wait_s > 0:
            fds = [self._wake_recv] if events is None else [self._wake_recv, events]
            select.select(fds, [], [], wait_s)
        try:
            while self._wake_recv.recv(4096):
                pass
        except BlockingIOError:
            pass
        woke = events is not None and events.drain() > 0
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return woke
            if item is None:
                return woke
            self._run_command(engine, *item)

    @staticmethod
    def _run_command(engine: LLMEngine, fn: EngineCommand, future: concurrent.futures.Future | None) -> None:
        """Run one command. Its caller may have timed out (cancelling the future) while a long
        step ran: such a command is skipped, and no completion error may reach the loop."""
        if future is not None and not future.set_running_or_notify_cancel():
            return  # cancelled while queued: nobody waits for it
        try:
            result = fn(engine)
        except Exception as exc:
            if future is None:
                logger.warning("engine command failed: %r", exc)
            else:
                _settle(future, exc=exc)
        else:
            if future is not None:
                _settle(future, result=result)

    def _drain_commands(self, error: BaseException) -> None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1] is not None:
                _settle(item[1], exc=error)


def _end_added(engine: LLMEngine, added: concurrent.futures.Future) -> None:
    if added.done() and not added.cancelled() and added.exception() is None:
        engine.end_request(added.result())


def _settle(future: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Complete `future` unless it is already done (cancelled by its caller's time-out)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
