"""The link emulator on loopback: delay, jitter without reordering, rate, drops, counters, CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from heterorl.tools.linkem import LinkEmulator, LinkSpec, bench, parse_hostport, spec_from_args, spec_to_args, \
    build_parser

REPO = Path(__file__).resolve().parent.parent


class Server:
    """A threaded TCP server on loopback: `handler(conn)` runs on a thread per connection."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            with conn:
                self.handler(conn)
        except OSError as exc:
            self.errors.append(exc)

    def close(self):
        self.sock.close()


def echo(conn):
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return
        conn.sendall(data)


def sender(size):
    def handler(conn):
        block = os.urandom(1 << 16)
        left = size
        while left > 0:
            n = min(left, len(block))
            conn.sendall(block[:n])
            left -= n
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    return handler


def sink(received: list):
    def handler(conn):
        got = 0
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            got += len(data)
        received.append(got)
    return handler


@pytest.fixture
def servers():
    made = []

    def make(handler):
        server = Server(handler)
        made.append(server)
        return server
    yield make
    for server in made:
        server.close()


@pytest.fixture
def emulators():
    made = []

    def make(upstream_port, link, **kwargs):
        emu = LinkEmulator(("127.0.0.1", 0), ("127.0.0.1", upstream_port), link, **kwargs).start()
        made.append(emu)
        return emu
    yield make
    for emu in made:
        emu.stop()


def connect(emu, timeout=10.0):
    return socket.create_connection(parse_hostport(emu.target), timeout=timeout)


def ping(sock, n=1):
    sock.sendall(b"p" * n)
    got = 0
    while got < n:
        data = sock.recv(n - got)
        if not data:
            raise ConnectionError("closed")
        got += len(data)


def round_trips(sock, count):
    times = []
    for _ in range(count):
        start = time.perf_counter()
        ping(sock)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def read_all(sock):
    got = 0
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return got
        got += len(data)


# -- delay -----------------------------------------------------------------------------------------------------
def test_round_trip_shows_both_delays_and_the_handshake(servers, emulators):
    server = servers(echo)
    emu = emulators(server.port, LinkSpec(delay_ms=50))
    with connect(emu) as sock:
        first = round_trips(sock, 1)[0]
        rtts = round_trips(sock, 10)
    # The first exchange waits one more round trip: the handshake a real TCP connection would make over the link.
    assert 195 <= first <= 260, first
    median = statistics.median(rtts)
    assert 99 <= median <= 120, rtts
    assert min(rtts) >= 99, rtts
    assert emu.bytes_up == emu.bytes_down == 11


def test_asymmetric_delay_and_no_handshake(servers, emulators):
    server = servers(echo)
    emu = emulators(server.port, LinkSpec(delay_ms=10, down_delay_ms=60, handshake=False))
    with connect(emu) as sock:
        rtts = round_trips(sock, 8)
    assert 69 <= rtts[0] <= 95, rtts  # no handshake: the first exchange is one round trip
    assert 69 <= statistics.median(rtts) <= 90, rtts


def test_jitter_varies_the_delay_but_never_reorders_bytes(servers, emulators):
    server = servers(echo)
    emu = emulators(server.port, LinkSpec(delay_ms=20, jitter_ms=15, handshake=False, seed=7))
    with connect(emu) as sock:
        rtts = round_trips(sock, 30)
        # Jitter is real: round trips spread over most of the +-2*15 ms window around 40 ms.
        assert max(rtts) - min(rtts) > 10, rtts
        assert min(rtts) >= 10 - 1, rtts
        # Many small writes a little apart, each its own chunk with its own jitter draw; the echo must come back
        # in exactly the order sent.
        records = 20000
        received = bytearray()
        done = threading.Event()

        def reader():
            while len(received) < records * 4:
                data = sock.recv(1 << 16)
                if not data:
                    break
                received.extend(data)
            done.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        for start in range(0, records, 50):
            sock.sendall(b"".join(struct.pack(">I", i) for i in range(start, start + 50)))
            time.sleep(0.0005)
        assert done.wait(30)
    values = struct.unpack(f">{records}I", bytes(received))
    assert list(values) == list(range(records))


# -- rate ------------------------------------------------------------------------------------------------------
def test_rate_cap_download(servers, emulators):
    size = 4_000_000
    server = servers(sender(size))
    emu = emulators(server.port, LinkSpec(rate_mbit=20, handshake=False))
    with connect(emu) as sock:
        first = sock.recv(1 << 16)
        start = time.perf_counter()
        got = len(first) + read_all(sock)
        elapsed = time.perf_counter() - start
    assert got == size
    expected = (size - len(first)) * 8 / 20e6  # 1.6 s
    assert 0.92 * expected <= elapsed <= 1.3 * expected, (elapsed, expected)
    assert emu.bytes_down == size and emu.bytes_up == 0


def test_rate_cap_upload_and_asymmetric_rate(servers, emulators):
    size = 3_000_000
    received: list[int] = []
    server = servers(sink(received))
    emu = emulators(server.port, LinkSpec(rate_mbit=40, down_rate_mbit=1, handshake=False))
    block = os.urandom(1 << 16)
    with connect(emu) as sock:
        start = time.perf_counter()
        left = size
        while left > 0:
            n = min(left, len(block))
            sock.sendall(block[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""  # the sink closes after reading everything
        elapsed = time.perf_counter() - start
    assert received == [size]
    expected = size * 8 / 40e6  # 0.6 s
    assert 0.9 * expected <= elapsed <= 1.35 * expected, (elapsed, expected)
    assert emu.bytes_up == size


def test_rate_is_shared_by_the_connections_of_one_link(servers, emulators):
    size = 1_500_000
    server = servers(sender(size))
    emu = emulators(server.port, LinkSpec(rate_mbit=20, handshake=False))
    results = []

    def download():
        with connect(emu) as sock:
            results.append(read_all(sock))

    start = time.perf_counter()
    threads = [threading.Thread(target=download) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    elapsed = time.perf_counter() - start
    assert results == [size, size]
    expected = 2 * size * 8 / 20e6  # 1.2 s for both together, not 0.6 s
    assert 0.9 * expected <= elapsed <= 1.35 * expected, (elapsed, expected)


def test_queue_bounds_what_the_sender_gets_rid_of(servers, emulators):
    """Behind a slow link the emulator reads only its queue's worth ahead: the sender feels back-pressure."""
    size = 20_000_000
    server = servers(sender(size))
    emu = emulators(server.port, LinkSpec(rate_mbit=8, queue_ms=50, handshake=False))
    with connect(emu) as sock:
        sock.recv(1 << 16)
        time.sleep(0.5)
        conns = emu.connections()
        # 0.5 s at 1 MB/s delivered; the backlog held inside the emulator is a queue's worth (50 ms = 50 kB) plus
        # a socket read, not the 20 MB the server tried to send.
        assert len(conns) == 1
        assert 350_000 <= conns[0]["bytes_down"] <= 650_000, conns
        backlog = emu._conns[conns[0]["id"]].down.queued
        assert backlog <= 50_000 + (1 << 18) + 65536, backlog


# -- drops -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reset", "fin"])
def test_drop_after_bytes_cuts_the_connection(servers, emulators, mode):
    server = servers(sender(1_000_000))
    emu = emulators(server.port, LinkSpec(drop_after_bytes=100_000, drop_mode=mode, delay_ms=5))
    got = 0
    error = None
    with connect(emu) as sock:
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                got += len(data)
        except ConnectionResetError as exc:
            error = exc
    assert got == 100_000
    if mode == "reset":
        assert error is not None
    else:
        assert error is None
    assert emu.connections_cut == 1
    assert emu.bytes_down == 100_000
    # The server's side of the link was cut too.
    deadline = time.time() + 5
    while emu.stats()["connections_open"] and time.time() < deadline:
        time.sleep(0.01)
    assert emu.stats()["connections_open"] == 0


def test_drop_after_bytes_counts_both_directions(servers, emulators):
    server = servers(echo)
    emu = emulators(server.port, LinkSpec(drop_after_bytes=1000, handshake=False))
    with connect(emu) as sock:
        ping(sock, 400)  # 800 bytes across
        sock.sendall(b"x" * 400)  # 200 more are allowed up, then the link dies
        with pytest.raises((ConnectionResetError, ConnectionError)):
            while True:
                if not sock.recv(1 << 16):
                    raise ConnectionError("closed")
    assert emu.bytes_up + emu.bytes_down == 1000


def test_stall_keeps_the_connection_open_but_silent(servers, emulators):
    server = servers(echo)
    emu = emulators(server.port, LinkSpec(drop_after_s=0.3, drop_mode="stall", stall_timeout_s=1.5,
                                          handshake=False))
    with connect(emu, timeout=0.5) as sock:
        ping(sock)
        time.sleep(0.4)
        sock.sendall(b"x")
        with pytest.raises(socket.timeout):
            sock.recv(1)
        assert emu.stats()["connections_open"] == 1
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):  # gives up like TCP would (here after 1.5 s, not 15 min)
            sock.recv(1)
    assert emu.connections_cut == 1 and emu.stats()["connections_open"] == 0


def test_drop_probability_and_lifetime(servers, emulators):
    server = servers(echo)
    # p = 0.9 per second: a connection lives 0.43 s on average; P(alive after 5 s) = e^-11.5.
    emu = emulators(server.port, LinkSpec(drop_prob=0.9, seed=3, handshake=False))
    lifetimes = []
    for _ in range(3):
        with connect(emu) as sock:
            start = time.perf_counter()
            with pytest.raises((ConnectionResetError, ConnectionError, BrokenPipeError)):
                while time.perf_counter() - start < 5:
                    ping(sock)
                    time.sleep(0.01)
            lifetimes.append(time.perf_counter() - start)
    assert all(t < 5 for t in lifetimes), lifetimes
    assert emu.connections_cut == 3
    emu.set_link(LinkSpec(drop_after_s=0.25, handshake=False))
    with connect(emu) as sock:
        start = time.perf_counter()
        with pytest.raises((ConnectionResetError, ConnectionError, BrokenPipeError)):
            while True:
                ping(sock)
                time.sleep(0.01)
        assert 0.24 <= time.perf_counter() - start <= 0.6


def test_cut_all_and_live_link_change(servers, emulators):
    server = servers(echo)
    emu = emulators(server.port, LinkSpec(delay_ms=5, handshake=False))
    with connect(emu) as a, connect(emu) as b:
        ping(a), ping(b)
        emu.set_link(LinkSpec(delay_ms=40, handshake=False))
        assert statistics.median(round_trips(a, 3)) >= 79
        assert emu.cut_all() == 2
        for sock in (a, b):
            with pytest.raises((ConnectionResetError, ConnectionError, BrokenPipeError)):
                ping(sock)
    assert emu.connections_cut == 2


def test_unreachable_upstream_resets_the_client(emulators):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    emu = emulators(port, LinkSpec())
    with pytest.raises((ConnectionResetError, ConnectionError)):
        with connect(emu) as sock:  # the reset may come before connect() returns
            sock.sendall(b"x")
            if not sock.recv(1):
                raise ConnectionError("closed")
    assert emu.connect_failures == 1


# -- configuration, CLI, throughput ----------------------------------------------------------------------------
def test_spec_validation_and_cli_round_trip():
    with pytest.raises(ValueError):
        LinkSpec(delay_ms=-1)
    with pytest.raises(ValueError):
        LinkSpec(drop_mode="explode")
    spec = LinkSpec(delay_ms=80, jitter_ms=5, rate_mbit=100, down_rate_mbit=50, drop_prob=0.01,
                    drop_after_bytes=123, handshake=False, seed=4, drop_mode="stall", stall_timeout_s=30)
    args = build_parser().parse_args(["--upstream", "127.0.0.1:1", *spec_to_args(spec)])
    assert spec_from_args(args) == spec
    assert parse_hostport("[::1]:50") == ("::1", 50)
    assert spec.direction("down").rate == 50e6 / 8 and spec.rtt_ms == 160


def test_cli_serves_counts_and_stops_on_sigterm(servers, tmp_path):
    server = servers(echo)
    ready, stats = tmp_path / "ready.json", tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "heterorl.tools.linkem", "--listen", "127.0.0.1:0", "--upstream",
         f"127.0.0.1:{server.port}", "--delay-ms", "30", "--rate-mbit", "100", "--ready-file", str(ready),
         "--stats-file", str(stats), "--stats-interval-s", "0.2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.05)
        target = json.loads(ready.read_text())["listen"]
        with socket.create_connection(parse_hostport(target), timeout=10) as sock:
            round_trips(sock, 1)
            rtts = round_trips(sock, 5)
            ping(sock, 10_000)
        assert 59 <= statistics.median(rtts) <= 80, rtts
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    final = json.loads(stats.read_text())
    assert final["bytes_up"] == final["bytes_down"] == 10_006
    assert final["connections_total"] == 1
    assert "listening on" in out and "stopped" in out


def test_throughput_on_loopback():
    """What the emulator itself can carry (child process, loopback, 2 shared cores; about 3 s): well over 1 Gbit/s
    unshaped (5-9 Gbit/s on a quiet machine), and a 1 Gbit/s link delivers close to its rate (990 Mbit/s quiet;
    the lower bound leaves room for a busy machine)."""
    free = bench(LinkSpec(), 300)
    assert free["wire_bytes"] == 300_000_000
    assert free["mbit_s"] > 1000, free
    gig = bench(LinkSpec(rate_mbit=1000, delay_ms=5), 150)
    assert 600 <= gig["mbit_s"] <= 1010, gig


def test_grpc_unary_calls_and_a_reset_through_the_link(emulators):
    """HTTP/2 over the emulator: a unary call costs one round trip, and a cut link surfaces as UNAVAILABLE."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        emu = emulators(port, LinkSpec(delay_ms=40))
        with grpc.insecure_channel(emu.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            stub.Check(request, timeout=10)  # connection set-up, HTTP/2 preface and settings
            times = []
            for _ in range(5):
                start = time.perf_counter()
                assert stub.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
                times.append((time.perf_counter() - start) * 1e3)
            assert 79 <= statistics.median(times) <= 110, times
            # The link goes down: open connections are reset and new ones die at once.
            emu.set_link(LinkSpec(delay_ms=40, drop_after_bytes=0))
            emu.cut_all()
            with pytest.raises(grpc.RpcError) as err:  # fails fast; the long deadline only absorbs a loaded machine
                stub.Check(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # Back up: the channel reconnects through the link by itself.
            emu.set_link(LinkSpec(delay_ms=40))
            assert stub.Check(request, timeout=30, wait_for_ready=True).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert emu.connections_total >= 2
    finally:
        server.stop(0)
