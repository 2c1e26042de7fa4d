"""A link emulator of our own: a TCP proxy that makes a connection behave like a far, slow, unreliable link.

This kernel has no `netem` qdisc, so delay, jitter and drops are applied in user space. A `LinkEmulator` listens
on one address, opens a connection to `upstream` for every connection it accepts, and forwards bytes both ways:

- **one-way delay + jitter** per direction: every chunk read at time t is delivered at
  `depart + delay + U(-jitter, +jitter)` (never before it arrived), and never before the chunk ahead of it in the
  same direction of the same connection: jitter varies the delay but never reorders bytes of a TCP stream.
- **bandwidth cap** per direction, shared by all connections of the emulator (one link, one bottleneck): a token
  bucket (`rate_mbit`, `burst_bytes`) sets each chunk's departure; chunks are cut into pieces of about 1 ms of
  link time so bytes come out at the link rate rather than in bursts of one socket read.
- **a bounded queue**: the emulator stops reading from a sender once this connection's backlog before the
  bottleneck exceeds `queue_ms` of link time (or `max_buffer_bytes` in memory), so the sender feels the link's
  back-pressure through its own socket buffers the way it would behind a real bottleneck, and a request sent
  behind a bulk transfer waits its turn (bufferbloat included, `queue_ms` deep).
- **connection setup**: `handshake=True` holds a new connection's first bytes for one round trip, the way a real
  TCP handshake over the link would (the client's `connect()` itself returns at once: the emulator accepts locally).
- **drops** per connection: cut after `drop_after_bytes` bytes (both directions together), after `drop_after_s`
  seconds, or with probability `drop_prob` per second (an exponential lifetime); a cut sends a TCP reset to both
  ends (`drop_mode="reset"`), closes both (`"fin"`), or silently stops forwarding while keeping both sockets open
  (`"stall"`, what a dead path looks like until keepalives notice).

Counters: `bytes_up` (client -> upstream) and `bytes_down` (upstream -> client) count TCP payload bytes delivered
across the link ("bytes on the wire" without TCP/IP headers); `stats()` returns them with connection counts.

What it does not model: packet loss and TCP's reaction to it (slow start, congestion windows on the long link);
both ends talk TCP to the emulator over a fast local hop, so the link behaves like a lossless pipe with the given
delay, rate and queue. End-to-end flow control (HTTP/2 windows, application acks) does see the full round trip.

Use it in-process (`with LinkEmulator(...) as emu:` runs it on a thread with its own event loop; `await
emu.astart()` inside a running loop) or standalone:

    python -m heterorl.tools.linkem --listen 127.0.0.1:6000 --upstream 10.77.0.2:50051 --delay-ms 80 --rate-mbit 100

`--bench-mb N` measures the throughput of a link on loopback instead (see `bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

DROP_MODES = ("reset", "fin", "stall")
_EOF = object()  # queue marker: the sender half-closed; deliver a FIN after the bytes ahead of it
_CUT = object()  # queue marker: the byte budget is spent; cut the connection when the last byte is delivered


@dataclasses.dataclass(frozen=True)
class LinkSpec:
    """One link. Delay, jitter and rate apply to both directions unless a `down_*` field overrides the
    upstream -> client direction; the drop fields apply to each connection as a whole."""

    delay_ms: float = 0.0  # one-way propagation delay
    jitter_ms: float = 0.0  # each chunk's delay varies uniformly in [delay - jitter, delay + jitter]
    rate_mbit: float | None = None  # bandwidth cap in Mbit/s (1e6 bits); None or 0: unlimited
    burst_bytes: int = 16384  # token bucket depth
    queue_ms: float = 50.0  # backlog before the bottleneck a connection may build before the sender is paused
    max_buffer_bytes: int = 32 << 20  # memory cap per connection and direction (the only bound when unlimited:
    #                                   an unlimited-rate link then carries at most about this much per delay)
    down_delay_ms: float | None = None
    down_jitter_ms: float | None = None
    down_rate_mbit: float | None = None
    drop_after_bytes: int | None = None  # cut each connection after this many bytes crossed it (both ways)
    drop_after_s: float | None = None  # cut each connection this long after it was accepted
    drop_prob: float = 0.0  # probability per second that a connection is cut (exponential lifetime)
    drop_mode: str = "reset"  # reset | fin | stall
    stall_timeout_s: float = 900.0  # a stalled connection is reset after this long (TCP's own give-up time)
    handshake: bool = True  # hold a new connection's first bytes for one emulated round trip
    seed: int | None = None  # jitter and drop draws; None: random

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms", "queue_ms", "drop_prob", "stall_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("rate_mbit", "down_rate_mbit", "down_delay_ms", "down_jitter_ms", "drop_after_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.drop_after_bytes is not None and self.drop_after_bytes < 0:
            raise ValueError("drop_after_bytes must be >= 0")
        if self.drop_mode not in DROP_MODES:
            raise ValueError(f"drop_mode must be one of {', '.join(DROP_MODES)}, got {self.drop_mode!r}")
        if self.burst_bytes < 1 or self.max_buffer_bytes < 65536:
            raise ValueError("burst_bytes must be >= 1 and max_buffer_bytes >= 65536")

    def direction(self, name: str) -> "_DirParams":
        """Delay (s), jitter (s) and rate (bytes/s or None) of direction "up" or "down"."""
        if name not in ("up", "down"):
            raise ValueError(name)
        delay, jitter, rate = self.delay_ms, self.jitter_ms, self.rate_mbit
        if name == "down":
            delay = delay if self.down_delay_ms is None else self.down_delay_ms
            jitter = jitter if self.down_jitter_ms is None else self.down_jitter_ms
            rate = rate if self.down_rate_mbit is None else self.down_rate_mbit
        return _DirParams(delay / 1e3, jitter / 1e3, rate * 1e6 / 8 if rate else None, self.burst_bytes,
                          self.queue_ms / 1e3, self.max_buffer_bytes)

    @property
    def rtt_ms(self) -> float:
        """The round-trip propagation delay (no jitter, no queueing)."""
        return (self.delay_ms + (self.delay_ms if self.down_delay_ms is None else self.down_delay_ms))


@dataclasses.dataclass(frozen=True)
class _DirParams:
    delay: float
    jitter: float
    rate: float | None  # bytes/s
    burst: int
    queue: float  # s
    max_buffer: int

    @property
    def piece(self) -> int:
        """Chunks are cut to about 1 ms of link time (at least 4 KiB) so the rate is smooth at that scale."""
        return max(4096, int(self.rate / 1000)) if self.rate else 1 << 30


class _Bottleneck:
    """The token bucket of one direction, shared by every connection of the emulator."""

    __slots__ = ("free_at",)

    def __init__(self) -> None:
        self.free_at = 0.0  # when the link has sent everything booked so far

    def book(self, now: float, size: int, params: _DirParams) -> float:
        """Book `size` bytes entering at `now`; returns when their last byte has left the bottleneck."""
        if not params.rate:
            return now
        self.free_at = max(self.free_at, now - params.burst / params.rate) + size / params.rate
        return max(now, self.free_at)


def parse_hostport(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _hostport(address: tuple) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Pipe:
    """One direction of one connection: a delay line between a source transport and a destination transport."""

    def __init__(self, conn: "_Conn", name: str, open_at: float):
        self.conn = conn
        self.name = name  # "up" | "down"
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.queue: collections.deque = collections.deque()  # [arrival time, bytes | _EOF | _CUT]
        self.queued = 0  # bytes in the queue
        self.last_depart = 0.0  # when the newest queued byte leaves the bottleneck
        self.last_arrival = 0.0  # when the newest queued byte is delivered (arrivals never go backwards)
        self.open_at = open_at  # handshake emulation: nothing enters the link before this
        self.timer: asyncio.TimerHandle | None = None
        self.resume_timer: asyncio.TimerHandle | None = None
        self.dst_paused = False  # the destination transport's write buffer is full
        self.src_paused = False
        self.done = False  # the EOF was delivered
        self.delivered = 0

    # -- input -------------------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        conn = self.conn
        if conn.cut_done or conn.exhausted:
            return
        if conn.budget is not None:
            if len(data) >= conn.budget:
                data, conn.exhausted = data[:conn.budget], True
            conn.budget -= len(data)
        emu = conn.emu
        params = emu._params[self.name]
        bottleneck = emu._bottleneck[self.name]
        loop_now = emu._loop.time()
        now = max(loop_now, self.open_at)
        piece, size = params.piece, len(data)
        view = memoryview(data) if size > piece else None
        for start in range(0, size, piece):
            chunk = data if view is None else bytes(view[start:start + piece])
            depart = bottleneck.book(now, len(chunk), params)
            delay = params.delay
            if params.jitter:
                delay = max(0.0, delay + emu._rng.uniform(-params.jitter, params.jitter))
            arrival = max(depart + delay, self.last_arrival)
            self.last_depart, self.last_arrival = depart, arrival
            self.queue.append([arrival, chunk])
        self.queued += size
        if conn.exhausted:
            self.queue.append([self.last_arrival, _CUT])
            conn.pause_all_reading()
        else:
            self._check_backlog(loop_now, params)
        self._schedule()

    def feed_eof(self) -> None:
        if self.conn.cut_done or self.conn.exhausted:
            return
        self.queue.append([max(self.conn.emu._loop.time() + self.conn.emu._params[self.name].delay,
                               self.last_arrival), _EOF])
        self._schedule()

    def _check_backlog(self, now: float, params: _DirParams) -> None:
        """Pause the sender while this direction's backlog is too deep; resume when it has drained halfway."""
        if self.src is None or self.src_paused or self.conn.cut_done:
            return
        if self.queued > params.max_buffer:
            self._pause_src()
            return
        if params.rate and self.last_depart - now > params.queue:
            self._pause_src()
            loop = self.conn.emu._loop
            self.resume_timer = loop.call_at(self.last_depart - params.queue / 2, self._maybe_resume)

    def _pause_src(self) -> None:
        self.src_paused = True
        try:
            self.src.pause_reading()
        except (RuntimeError, AttributeError):
            pass

    def _maybe_resume(self) -> None:
        self.resume_timer = None
        if not self.src_paused or self.conn.cut_done or self.conn.exhausted or self.src is None:
            return
        params = self.conn.emu._params[self.name]
        now = self.conn.emu._loop.time()
        if self.queued > params.max_buffer // 2:
            return  # _release resumes once the memory backlog halves
        if params.rate and self.last_depart - now > params.queue / 2:
            self.resume_timer = self.conn.emu._loop.call_at(self.last_depart - params.queue / 2, self._maybe_resume)
            return
        self.src_paused = False
        try:
            self.src.resume_reading()
        except (RuntimeError, AttributeError):
            pass

    # -- output ------------------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self.timer is not None or not self.queue or self.dst is None or self.dst_paused or self.conn.cut_done:
            return
        self.timer = self.conn.emu._loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        self.timer = None
        conn = self.conn
        if self.dst is None or self.dst_paused or conn.cut_done:
            return
        emu = conn.emu
        now = emu._loop.time() + 0.0002
        ready: list[bytes] = []
        nbytes = 0
        marker = None
        queue = self.queue
        while queue and queue[0][0] <= now:
            item = queue.popleft()[1]
            if item is _EOF or item is _CUT:
                marker = item
                break
            ready.append(item)
            nbytes += len(item)
        if ready:
            self.queued -= nbytes
            self.delivered += nbytes
            if self.name == "up":
                emu.bytes_up += nbytes
                conn.bytes_up += nbytes
            else:
                emu.bytes_down += nbytes
                conn.bytes_down += nbytes
            if len(ready) == 1:
                self.dst.write(ready[0])
            else:
                self.dst.write(b"".join(ready))
        if marker is _CUT:
            conn.cut_when_flushed(self, emu._loop.time() + 2.0)
            return
        if marker is _EOF:
            self.done = True
            conn.half_closed(self)
            return
        if self.src_paused and self.resume_timer is None:
            self._maybe_resume()
        self._schedule()

    def cancel(self) -> None:
        for handle in (self.timer, self.resume_timer):
            if handle is not None:
                handle.cancel()
        self.timer = self.resume_timer = None
        self.queue.clear()
        self.queued = 0


class _Side(asyncio.Protocol):
    """The protocol on one of a connection's two sockets ("client" or "upstream")."""

    def __init__(self, conn: "_Conn", side: str):
        self.conn, self.side = conn, side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.attach(self.side, transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.conn.out_of(self.side).feed(data)

    def eof_received(self) -> bool:
        self.conn.out_of(self.side).feed_eof()
        return True  # keep the other half open until the EOF has crossed the link

    def pause_writing(self) -> None:
        self.conn.into(self.side).dst_paused = True

    def resume_writing(self) -> None:
        pipe = self.conn.into(self.side)
        pipe.dst_paused = False
        pipe._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.lost(self.side, exc)


class _Conn:
    """One accepted connection and its upstream twin."""

    def __init__(self, emu: "LinkEmulator", ident: int):
        self.emu, self.id, self.spec = emu, ident, emu.link
        now = emu._loop.time()
        up, down = emu._params["up"], emu._params["down"]
        handshake = self.spec.handshake
        self.up = _Pipe(self, "up", now + (up.delay + down.delay if handshake else 0.0))
        self.down = _Pipe(self, "down", now + (2 * up.delay + down.delay if handshake else 0.0))
        self.transports: dict[str, asyncio.Transport] = {}
        self.accepted_at = time.time()
        self.bytes_up = self.bytes_down = 0
        self.budget = self.spec.drop_after_bytes
        self.exhausted = self.budget == 0
        self.cut_done = False
        self.closed = False
        self.cut_reason: str | None = None
        self.drop_timer: asyncio.TimerHandle | None = None
        life = None
        if self.spec.drop_after_s is not None:
            life = self.spec.drop_after_s
        if self.spec.drop_prob > 0:
            p = min(self.spec.drop_prob, 1 - 1e-12)
            drawn = emu._rng.expovariate(-math.log1p(-p))
            life = drawn if life is None else min(life, drawn)
        if self.exhausted:  # drop_after_bytes=0: the link is down for every connection
            emu._loop.call_soon(lambda: self.cut(self.spec.drop_mode, reason="after 0 bytes"))
        if life is not None:
            reason = f"lifetime {life:.2f} s"
            self.drop_timer = emu._loop.call_later(life, lambda: self.cut(self.spec.drop_mode, reason=reason))

    def out_of(self, side: str) -> _Pipe:
        return self.up if side == "client" else self.down

    def into(self, side: str) -> _Pipe:
        return self.down if side == "client" else self.up

    def attach(self, side: str, transport: asyncio.Transport) -> None:
        self.transports[side] = transport
        transport.set_write_buffer_limits(high=1 << 20)
        try:
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        self.out_of(side).src = transport
        self.into(side).dst = transport
        if self.cut_done or self.exhausted:
            transport.pause_reading()
        self.into(side)._schedule()

    def pause_all_reading(self) -> None:
        for pipe in (self.up, self.down):
            if pipe.src is not None and not pipe.src_paused:
                pipe._pause_src()

    def half_closed(self, pipe: _Pipe) -> None:
        """`pipe`'s sender half-closed and the FIN has crossed the link."""
        if pipe.dst is not None and pipe.dst.can_write_eof():
            try:
                pipe.dst.write_eof()
            except (OSError, RuntimeError):
                pass
        if self.up.done and self.down.done:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pipe in (self.up, self.down):
            pipe.cancel()
        if self.drop_timer is not None:
            self.drop_timer.cancel()
        for transport in self.transports.values():
            transport.close()
        self.emu._forget(self)

    def abort(self) -> None:
        """Reset both sockets now (nothing queued is delivered)."""
        for pipe in (self.up, self.down):
            pipe.cancel()
        for transport in self.transports.values():
            sock = transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            transport.abort()
        self.close()

    def cut(self, mode: str, reason: str = "manual") -> None:
        """The link fails: reset, close or stall this connection."""
        if self.cut_done or self.closed:
            return
        self.cut_done, self.cut_reason = True, reason
        self.emu.connections_cut += 1
        log.info("link %s: cut connection %d (%s, %s) after %d up / %d down bytes", self.emu.name, self.id,
                 mode, reason, self.bytes_up, self.bytes_down)
        if mode == "reset":
            self.abort()
        elif mode == "fin":
            for pipe in (self.up, self.down):
                pipe.cancel()
            self.close()
        else:  # stall: keep both sockets open, forward nothing, read nothing; give up the way TCP eventually would
            for pipe in (self.up, self.down):
                pipe.cancel()
            self.pause_all_reading()
            if self.drop_timer is not None:
                self.drop_timer.cancel()
            self.drop_timer = self.emu._loop.call_later(self.spec.stall_timeout_s, self.abort)

    def cut_when_flushed(self, pipe: _Pipe, deadline: float) -> None:
        """The byte budget is spent: cut once the last allowed bytes have left our socket and been acknowledged
        (a reset discards whatever the kernel has not sent yet), or at `deadline`."""
        if self.cut_done or self.closed:
            return
        dst = pipe.dst
        pending = 0
        if dst is not None and not dst.is_closing():
            pending = dst.get_write_buffer_size() or _unacked(dst)
        if pending and self.emu._loop.time() < deadline:
            self.emu._loop.call_later(0.002, self.cut_when_flushed, pipe, deadline)
            return
        self.cut(self.spec.drop_mode, reason=f"after {self.spec.drop_after_bytes} bytes")

    def lost(self, side: str, exc: Exception | None) -> None:
        self.transports.pop(side, None)
        if self.closed:
            return
        if exc is not None:
            log.debug("link %s: connection %d: %s side lost: %r", self.emu.name, self.id, side, exc)
        # One end went away without a clean shutdown (or with one we have not finished relaying): pass a reset on.
        self.abort()


class LinkEmulator:
    """A TCP proxy `listen` -> `upstream` with the delay, jitter, rate and drops of `link` (see the module doc).

    `listen` may use port 0; `address` is the bound address once started. `listen_netns` / `upstream_netns` name
    Linux network namespaces (made by `heterorl.tools.netns`) in which the listening socket and the upstream
    connections are opened, so an emulator in this process can sit between two namespaces.
    """

    def __init__(self, listen: tuple[str, int] | str, upstream: tuple[str, int] | str, link: LinkSpec | None = None,
                 *, name: str | None = None, listen_netns: str | None = None, upstream_netns: str | None = None,
                 backlog: int = 512):
        self.listen = parse_hostport(listen) if isinstance(listen, str) else tuple(listen)
        self.upstream = parse_hostport(upstream) if isinstance(upstream, str) else tuple(upstream)
        self.link = link or LinkSpec()
        self.name = name or f"{_hostport(self.listen)}->{_hostport(self.upstream)}"
        self.listen_netns, self.upstream_netns = listen_netns, upstream_netns
        self.backlog = backlog
        self.bytes_up = 0  # client -> upstream payload bytes delivered
        self.bytes_down = 0  # upstream -> client payload bytes delivered
        self.connections_total = 0
        self.connections_cut = 0
        self.connect_failures = 0
        self.address: tuple[str, int] | None = None
        self._conns: dict[int, _Conn] = {}
        self._params = {"up": self.link.direction("up"), "down": self.link.direction("down")}
        self._bottleneck = {"up": _Bottleneck(), "down": _Bottleneck()}
        self._rng = random.Random(self.link.seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- configuration -----------------------------------------------------------------------------------------
    def set_link(self, link: LinkSpec) -> None:
        """Change the link. Delay, jitter and rate apply to bytes read from now on; drops to new connections."""
        def apply() -> None:
            self.link = link
            self._params = {"up": link.direction("up"), "down": link.direction("down")}
        self._call(apply)

    def cut_all(self, mode: str = "reset") -> int:
        """Cut every open connection now; returns how many."""
        if mode not in DROP_MODES:
            raise ValueError(mode)

        def apply() -> int:
            conns = [c for c in self._conns.values() if not c.cut_done]
            for conn in conns:
                conn.cut(mode, reason="cut_all")
            return len(conns)
        return self._call(apply)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": _hostport(self.address) if self.address else None,
            "upstream": _hostport(self.upstream),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections_total": self.connections_total,
            "connections_open": len(self._conns),
            "connections_cut": self.connections_cut,
            "connect_failures": self.connect_failures,
            "link": dataclasses.asdict(self.link),
        }

    def connections(self) -> list[dict[str, Any]]:
        """Per open connection: id, accepted_at (epoch s), bytes up and down."""
        return [{"id": c.id, "accepted_at": c.accepted_at, "bytes_up": c.bytes_up, "bytes_down": c.bytes_down}
                for c in list(self._conns.values())]

    # -- lifecycle, inside a running loop ----------------------------------------------------------------------
    async def astart(self) -> "LinkEmulator":
        self._loop = asyncio.get_running_loop()
        family = _family(self.listen[0])
        sock = _make_socket(self.listen_netns, family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.listen)
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await self._loop.create_server(self._accepted_protocol, sock=sock)
        self.address = sock.getsockname()[:2]
        log.info("link %s: listening on %s -> %s (%s)", self.name, _hostport(self.address),
                 _hostport(self.upstream), describe(self.link))
        return self

    async def astop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- lifecycle, on a thread of its own ---------------------------------------------------------------------
    def start(self) -> "LinkEmulator":
        """Run on a daemon thread with an event loop of its own; returns once listening (or raises)."""
        ready: dict[str, Any] = {}
        started = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.astart())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                ready["error"] = exc
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.astop())
                loop.close()

        self._thread = threading.Thread(target=main, name=f"linkem {self.name}", daemon=True)
        self._thread.start()
        started.wait()
        if "error" in ready:
            self._thread.join()
            self._thread = None
            raise ready["error"]
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> "LinkEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def target(self) -> str:
        """'host:port' to connect to (the listening address; 127.0.0.1 when it listens on 0.0.0.0)."""
        if self.address is None:
            raise RuntimeError("not started")
        host = self.address[0]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return _hostport((host, self.address[1]))

    # -- internals ---------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the emulator's loop (directly when called from it or before it starts)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn()
        try:
            if asyncio.get_running_loop() is loop:
                return fn()
        except RuntimeError:
            pass
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc
            done.set()
        loop.call_soon_threadsafe(run)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _accepted_protocol(self) -> _Side:
        self.connections_total += 1
        conn = _Conn(self, self.connections_total)
        self._conns[conn.id] = conn
        task = self._loop.create_task(self._connect_upstream(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _Side(conn, "client")

    async def _connect_upstream(self, conn: _Conn) -> None:
        sock = None
        try:
            sock = _make_socket(self.upstream_netns, _family(self.upstream[0]))
            sock.setblocking(False)
            await asyncio.wait_for(self._loop.sock_connect(sock, self.upstream), timeout=30)
            if conn.closed:
                sock.close()
                return
            await self._loop.create_connection(lambda: _Side(conn, "upstream"), sock=sock)
            log.debug("link %s: connection %d open", self.name, conn.id)
        except (OSError, asyncio.TimeoutError) as exc:
            self.connect_failures += 1
            log.warning("link %s: upstream %s unreachable for connection %d: %r", self.name,
                        _hostport(self.upstream), conn.id, exc)
            if sock is not None:
                sock.close()
            conn.abort()

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.id, None)


def _unacked(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux TIOCOUTQ), 0 if unknown."""
    try:
        import fcntl
        import termios
        sock = transport.get_extra_info("socket")
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ImportError):
        return 0


def _make_socket(netns: str | None, family: int) -> socket.socket:
    if netns is None:
        return socket.socket(family, socket.SOCK_STREAM)
    from heterorl.tools.netns import netns_socket
    return netns_socket(netns, family, socket.SOCK_STREAM)


def describe(link: LinkSpec) -> str:
    parts = [f"delay {link.delay_ms:g} ms"]
    if link.jitter_ms:
        parts.append(f"jitter {link.jitter_ms:g} ms")
    parts.append(f"rate {link.rate_mbit:g} Mbit/s" if link.rate_mbit else "rate unlimited")
    if link.down_delay_ms is not None or link.down_jitter_ms is not None or link.down_rate_mbit is not None:
        down = link.direction("down")
        parts.append(f"down: delay {down.delay * 1e3:g} ms jitter {down.jitter * 1e3:g} ms rate "
                     + (f"{down.rate * 8 / 1e6:g} Mbit/s" if down.rate else "unlimited"))
    if link.drop_after_bytes is not None:
        parts.append(f"drop after {link.drop_after_bytes} B")
    if link.drop_after_s is not None:
        parts.append(f"drop after {link.drop_after_s:g} s")
    if link.drop_prob:
        parts.append(f"drop p={link.drop_prob:g}/s")
    return ", ".join(parts)


# -- benchmark -------------------------------------------------------------------------------------------------
def bench(link: LinkSpec, megabytes: float = 256, *, direction: str = "down", in_process: bool = False,
          chunk: int = 1 << 20) -> dict[str, float]:
    """Push `megabytes` through an emulated link on loopback and time it.

    The emulator runs in a child process (`python -m heterorl.tools.linkem`) unless `in_process`; this process
    runs the sink server and the source with blocking sockets. `direction="down"`: the upstream server sends
    (like a weight download); `"up"`: the client sends. Returns seconds, Mbit/s, the emulator's byte count and,
    for a child process, `emulator_cpu_s` (its CPU seconds in all, about 0.35 s of interpreter start-up included).

    Measured on this machine (2 shared cores, 1 MB writes): unshaped 8.4 Gbit/s down / 9.6 up; a 1 Gbit/s link
    989 Mbit/s; an unlimited-rate link is bounded by `max_buffer_bytes` / delay (683 Mbit/s at 300 ms).
    """
    import subprocess
    import tempfile

    total = int(megabytes * 1e6)
    payload = os.urandom(chunk)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    result: dict[str, float] = {}

    def sender(sock: socket.socket) -> None:
        left = total
        while left > 0:
            n = min(left, chunk)
            sock.sendall(payload[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)

    def receiver(sock: socket.socket) -> int:
        got = 0
        buf = bytearray(chunk)
        while True:
            n = sock.recv_into(buf)
            if not n:
                return got
            got += n

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            if direction == "down":
                sender(conn)
                conn.recv(1)
            else:
                result["server_got"] = receiver(conn)

    proc = None
    emu = None
    with tempfile.TemporaryDirectory() as tmp:
        upstream = f"127.0.0.1:{server.getsockname()[1]}"
        if in_process:
            emu = LinkEmulator(("127.0.0.1", 0), upstream, link).start()
            target = emu.target
        else:
            ready = os.path.join(tmp, "ready.json")
            stats_path = os.path.join(tmp, "stats.json")
            proc = subprocess.Popen([sys.executable, "-m", "heterorl.tools.linkem", "--listen", "127.0.0.1:0",
                                     "--upstream", upstream, *spec_to_args(link), "--ready-file", ready,
                                     "--stats-file", stats_path, "--log-level", "warning"])
            deadline = time.time() + 30
            while not os.path.exists(ready):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the emulator did not start")
                time.sleep(0.02)
            time.sleep(0.05)
            target = json.load(open(ready))["listen"]
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = socket.create_connection(parse_hostport(target))
        for s in (client,):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        start = time.perf_counter()
        if direction == "down":
            got = receiver(client)
        else:
            sender(client)
            client.recv(1)
            got = total
        elapsed = time.perf_counter() - start
        client.close()
        thread.join(timeout=30)
        server.close()
        if emu is not None:
            emu.stop()
            wire = emu.bytes_down if direction == "down" else emu.bytes_up
        else:
            proc.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            result["emulator_cpu_s"] = usage.ru_utime + usage.ru_stime
            stats = json.load(open(stats_path))
            wire = stats["bytes_down"] if direction == "down" else stats["bytes_up"]
    result.update(seconds=elapsed, mbit_s=got * 8 / elapsed / 1e6, bytes=got, wire_bytes=wire)
    return result


def spec_to_args(link: LinkSpec) -> list[str]:
    """The CLI flags that rebuild `link` (the inverse of `spec_from_args`)."""
    args: list[str] = []
    for f in dataclasses.fields(LinkSpec):
        value = getattr(link, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "handshake":
            args.append("--no-handshake")
        else:
            args += [flag, str(value)]
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m heterorl.tools.linkem", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept connections on (port 0: any)")
    p.add_argument("--upstream", help="HOST:PORT to forward each connection to (required unless --bench-mb)")
    d = LinkSpec()
    p.add_argument("--delay-ms", type=float, default=d.delay_ms, help="one-way delay, both directions")
    p.add_argument("--jitter-ms", type=float, default=d.jitter_ms, help="uniform +- jitter on the delay")
    p.add_argument("--rate-mbit", type=float, default=None, help="bandwidth cap per direction (default unlimited)")
    p.add_argument("--burst-bytes", type=int, default=d.burst_bytes, help="token bucket depth")
    p.add_argument("--queue-ms", type=float, default=d.queue_ms, help="backlog allowed before the sender is paused")
    p.add_argument("--max-buffer-bytes", type=int, default=d.max_buffer_bytes, help="memory cap per direction")
    p.add_argument("--down-delay-ms", type=float, default=None, help="upstream->client delay (default --delay-ms)")
    p.add_argument("--down-jitter-ms", type=float, default=None, help="upstream->client jitter")
    p.add_argument("--down-rate-mbit", type=float, default=None, help="upstream->client rate (default --rate-mbit)")
    p.add_argument("--drop-after-bytes", type=int, default=None, help="cut each connection after N bytes")
    p.add_argument("--drop-after-s", type=float, default=None, help="cut each connection after S seconds")
    p.add_argument("--drop-prob", type=float, default=0.0, help="probability per second of cutting a connection")
    p.add_argument("--drop-mode", choices=DROP_MODES, default=d.drop_mode, help="what a cut does")
    p.add_argument("--stall-timeout-s", type=float, default=d.stall_timeout_s,
                   help="reset a stalled connection after this long")
    p.add_argument("--no-handshake", dest="handshake", action="store_false",
                   help="do not hold a new connection's first bytes for one round trip")
    p.add_argument("--seed", type=int, default=None, help="seed for jitter and drops")
    p.add_argument("--name", default=None, help="name in logs and stats")
    p.add_argument("--netns", default=None, help="open the listening socket in this network namespace")
    p.add_argument("--upstream-netns", default=None, help="open upstream connections in this network namespace")
    p.add_argument("--ready-file", default=None, help="write {listen, upstream, pid} as JSON here once listening")
    p.add_argument("--stats-file", default=None, help="write stats() as JSON here periodically and on exit")
    p.add_argument("--stats-interval-s", type=float, default=1.0)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--bench-mb", type=float, default=None,
                   help="instead of serving: push this many MB through the link on loopback and print the rate")
    p.add_argument("--bench-direction", choices=("up", "down"), default="down")
    return p


def spec_from_args(args: argparse.Namespace) -> LinkSpec:
    return LinkSpec(delay_ms=args.delay_ms, jitter_ms=args.jitter_ms, rate_mbit=args.rate_mbit,
                    burst_bytes=args.burst_bytes, queue_ms=args.queue_ms, max_buffer_bytes=args.max_buffer_bytes,
                    down_delay_ms=args.down_delay_ms, down_jitter_ms=args.down_jitter_ms,
                    down_rate_mbit=args.down_rate_mbit, drop_after_bytes=args.drop_after_bytes,
                    drop_after_s=args.drop_after_s, drop_prob=args.drop_prob, drop_mode=args.drop_mode,
                    stall_timeout_s=args.stall_timeout_s,
                    handshake=args.handshake, seed=args.seed)


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


async def _serve(args: argparse.Namespace, link: LinkSpec) -> None:
    emu = LinkEmulator(args.listen, args.upstream, link, name=args.name, listen_netns=args.netns,
                       upstream_netns=args.upstream_netns)
    await emu.astart()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.ready_file:
        _write_json(args.ready_file, {"listen": emu.target, "upstream": _hostport(emu.upstream), "pid": os.getpid()})
    try:
        while not stop.is_set():
            if args.stats_file:
                _write_json(args.stats_file, emu.stats())
            try:
                await asyncio.wait_for(stop.wait(), timeout=args.stats_interval_s)
            except asyncio.TimeoutError:
                pass
    finally:
        await emu.astop()
        stats = emu.stats()
        if args.stats_file:
            _write_json(args.stats_file, stats)
        log.info("link %s: stopped; %d bytes up, %d bytes down, %d connections (%d cut)", emu.name,
                 stats["bytes_up"], stats["bytes_down"], stats["connections_total"], stats["connections_cut"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        link = spec_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.bench_mb is not None:
        result = bench(link, args.bench_mb, direction=args.bench_direction)
        print(f"RESULT link=\"{describe(link)}\" direction={args.bench_direction} mb={result['bytes'] / 1e6:.1f} "
              f"seconds={result['seconds']:.3f} mbit_s={result['mbit_s']:.1f} wire_bytes={int(result['wire_bytes'])} "
              f"emulator_cpu_s={result.get('emulator_cpu_s', float('nan')):.2f}")
        return 0
    if not args.upstream:
        print("error: --upstream is required", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(args, link))
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
