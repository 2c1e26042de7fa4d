"""Separate hosts in network namespaces, with the link emulator between them (skipped where not permitted)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from heterorl.tools.linkem import LinkSpec
from heterorl.tools.netns import Cluster, NetnsError, list_netns, netns_available, sweep_stale

REPO = Path(__file__).resolve().parent.parent
AVAILABLE, WHY = netns_available()
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"network namespaces not permitted here: {WHY}")

# A TCP echo server as a real process: listens on argv[1]:argv[2], prints READY, echoes every connection.
ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
print("READY", flush=True)
def serve(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# A client as a real process: connects to argv[1]:argv[2], times N one-byte round trips, prints them as JSON (ms).
PING_CLIENT = r"""
import json, socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
times = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter(); sock.sendall(b"p"); assert sock.recv(1) == b"p"
    times.append((time.perf_counter() - start) * 1e3)
print(json.dumps(times))
"""

# A bulk sender as a real process: serves argv[3] bytes to the first connection on argv[1]:argv[2].
BULK_SERVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("READY", flush=True)
conn, _ = srv.accept()
block, left = b"x" * 65536, int(sys.argv[3])
while left > 0:
    n = min(left, len(block)); conn.sendall(block[:n]); left -= n
conn.shutdown(socket.SHUT_WR); conn.recv(1); conn.close()
"""


def start_script(host, script, *args):
    proc = host.popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "READY", line + proc.stdout.read()
    return proc


def ours(cluster_prefix):
    return [name for name in list_netns() if name.startswith(cluster_prefix)]


@pytest.fixture
def cluster():
    if not AVAILABLE:
        pytest.skip(f"network namespaces not permitted here: {WHY}")
    with Cluster() as made:
        prefix = made.prefix
        yield made
    assert ours(prefix) == [], "the cluster left namespaces behind"


def client_rtts(host, addr, port, count=8):
    out = host.run([sys.executable, "-c", PING_CLIENT, addr, str(port), str(count)], timeout=60)
    return json.loads(out.stdout)


def test_available_says_why_not(tmp_path):
    """Without `ip` on the PATH the harness says so instead of failing (checked in a child process)."""
    out = subprocess.run([sys.executable, "-c", "from heterorl.tools.netns import netns_available as a; print(a())"],
                         cwd=REPO, env={**os.environ, "PATH": str(tmp_path)}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    if os.geteuid() == 0:
        assert out.stdout.strip() == "(False, 'the `ip` command (iproute2) is not installed')"
    else:
        assert out.stdout.startswith("(False, 'network namespaces need root")
    assert isinstance(AVAILABLE, bool) and (AVAILABLE or WHY)


@needs_netns
def test_echo_across_namespaces_through_an_emulator_in_the_hub(cluster):
    server, client = cluster.add_host("server"), cluster.add_host("client")
    assert (server.addr, client.addr, cluster.hub.addr) == ("10.77.0.2", "10.77.0.3", "10.77.0.1")
    start_script(server, ECHO_SERVER, server.addr, 7000)
    direct = client_rtts(client, server.addr, 7000)
    assert statistics.median(direct) < 10, direct
    # A third namespace (the hub) carries the link: the client dials the hub, the hub dials the server.
    emu = cluster.hub.emulate_link((server.addr, 7000), LinkSpec(delay_ms=30, handshake=False),
                                   listen_host=cluster.hub.addr)
    delayed = client_rtts(client, cluster.hub.addr, emu.address[1])
    assert 59 <= statistics.median(delayed) <= 80, delayed
    assert min(delayed) >= 59, delayed
    assert emu.bytes_up == emu.bytes_down == 8


@needs_netns
def test_emulator_process_in_the_servers_namespace(cluster):
    server, client = cluster.add_host("server"), cluster.add_host("client")
    start_script(server, ECHO_SERVER, "127.0.0.1", 7000)  # reachable only from inside the server's namespace
    link = server.emulate_link(("127.0.0.1", 7000), LinkSpec(delay_ms=20, down_delay_ms=40, handshake=False),
                               listen_host=server.addr, process=True)
    assert link.target.startswith(server.addr + ":")
    rtts = client_rtts(client, server.addr, int(link.target.rsplit(":", 1)[1]), count=6)
    assert 59 <= statistics.median(rtts) <= 80, rtts
    stats = link.stop()
    assert link.proc.returncode == 0
    assert stats["bytes_up"] == stats["bytes_down"] == 6 and stats["connections_total"] == 1


@needs_netns
def test_tbf_rate_limit_on_a_host(cluster):
    server = cluster.add_host("server")
    slow = cluster.add_host("slow", rate_mbit=20)
    size = 3_000_000
    start_script(server, BULK_SERVER, server.addr, 7001, size)

    def download():
        sock = slow.connect((server.addr, 7001))
        with sock:
            start = time.perf_counter()
            got = 0
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return got, time.perf_counter() - start
                got += len(data)

    got, elapsed = download()
    assert got == size
    expected = size * 8 / 20e6  # 1.2 s
    assert 0.85 * expected <= elapsed <= 1.4 * expected, (elapsed, expected)
    out = slow.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" in out and "20Mbit" in out


@needs_netns
def test_traffic_cannot_leave_the_namespaces(cluster):
    host = cluster.add_host("sampler-1")
    # No default route and no interface into the machine's own namespace: anything outside the subnet is
    # unreachable (checked without sending a packet).
    routed = host.run(["ip", "route", "get", "8.8.8.8"], check=False)
    assert routed.returncode != 0 and "unreachable" in routed.stderr.lower()
    links = host.run(["ip", "-o", "link"]).stdout
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == ["eth0", "lo"]
    hub_links = cluster.hub.run(["ip", "-o", "link"]).stdout
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in hub_links.splitlines()) == ["br0", "lo", "p1"]


@needs_netns
def test_parallel_clusters_do_not_collide():
    with Cluster() as one, Cluster() as two:
        assert one.prefix != two.prefix
        servers = [c.add_host("server") for c in (one, two)]
        clients = [c.add_host("client") for c in (one, two)]
        assert servers[0].addr == servers[1].addr  # same addresses, separate worlds
        for server in servers:
            start_script(server, ECHO_SERVER, server.addr, 7000)
        results = []

        def run(client, server):
            results.append(client_rtts(client, server.addr, 7000, count=3))
        threads = [threading.Thread(target=run, args=pair) for pair in zip(clients, servers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2
        prefixes = (one.prefix, two.prefix)
    assert not [n for n in list_netns() if n.startswith(prefixes)]


@needs_netns
def test_cleanup_stops_processes_and_deletes_namespaces(tmp_path):
    with Cluster() as made:
        host = made.add_host("learner")
        made.add_host("relay-1")
        prefix = made.prefix
        assert len(ours(prefix)) == 3
        # A process the harness started and a grandchild it cannot track (found through `ip netns pids`).
        pidfile = tmp_path / "grandchild.pid"
        proc = host.popen(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"])
        deadline = time.time() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.time() < deadline
            time.sleep(0.02)
        grandchild = int(pidfile.read_text())
        emu = made.hub.emulate_link((host.addr, 9), LinkSpec())
    assert ours(prefix) == []
    assert proc.poll() is not None
    deadline = time.time() + 5
    while os.path.exists(f"/proc/{grandchild}") and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{grandchild}") or "Z" in open(f"/proc/{grandchild}/stat").read().split()[2]
    assert emu._thread is None  # the emulator was stopped too
    made.close()  # twice is fine
    with pytest.raises(NetnsError):
        made.add_host("late")


@needs_netns
def test_stale_namespaces_of_dead_runs_are_swept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"hrl-{dead.pid}-abcdef-hub"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in sweep_stale()
        assert name not in list_netns()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@needs_netns
def test_bad_host_names_are_refused(cluster):
    for bad in ("hub", "", "a b", "x" * 40, "../etc"):
        with pytest.raises(ValueError):
            cluster.add_host(bad)
    cluster.add_host("sampler-1")
    with pytest.raises(ValueError):
        cluster.add_host("sampler-1")
