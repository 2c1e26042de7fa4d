"""Separate hosts on one machine: Linux network namespaces joined by veth pairs, with the project's own addresses.

A `Cluster` makes a hub namespace holding a bridge (`br0`, address .1 of the subnet, 10.77.0.0/24 by default) and,
per `add_host(name)`, a namespace of that host's own with one interface `eth0` (.2, .3, ...) whose veth peer is
a port of the bridge. Every host reaches every other host and the hub at its address; nothing else exists in
these namespaces (no veth into the machine's own namespace, no default route), so traffic cannot leave them:

    with Cluster() as cluster:
        learner = cluster.add_host("learner")
        sampler = cluster.add_host("sampler-1", rate_mbit=20)      # tbf both ways on its veth pair
        srv = learner.popen([sys.executable, "-m", "heterorl.server.main", "--host", learner.addr, ...])
        emu = sampler.emulate_link((learner.addr, 50051), LinkSpec(delay_ms=80, rate_mbit=100))
        sampler.popen([..., "--learner", emu.target])               # 127.0.0.1:port inside the sampler's namespace

Delay, jitter and drops come from `heterorl.tools.linkem` (this kernel has no netem); bandwidth can come from
either the emulator or the kernel's tbf (`rate_mbit=` here).

Names are unique per run (`hrl-<pid>-<random>-<host>`), so parallel runs do not collide; interface names are
fixed (`eth0`, `br0`, `p<n>`) since each lives inside a namespace of the run's own. `close()` (also on leaving
the `with` block, and at exit for clusters still open) stops the processes `popen` started and any other
process left inside the namespaces, then deletes the namespaces; `sweep_stale()` deletes namespaces left by runs
whose process is gone (a run killed with SIGKILL cannot clean up after itself).

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; `netns_available()` says whether this machine permits
it and, if not, why, so tests can skip with a clear message.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Callable, Sequence

from heterorl.tools.procs import stop_processes

log = logging.getLogger(__name__)

PREFIX = "hrl"
DEFAULT_SUBNET = "10.77.0.0/24"
CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_STALE_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]{{6}}-")
_available: tuple[bool, str] | None = None


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def _tc(*args: str) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetnsError(f"tc {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def list_netns() -> list[str]:
    """Names in `ip netns list` (first word of each line)."""
    proc = _ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def netns_available() -> tuple[bool, str]:
    """(True, "") where this process may make namespaces, veth pairs and a bridge; else (False, why).

    The probe happens inside a throwaway namespace of its own (nothing touches the machine's own namespace) and is
    cached for the process.
    """
    global _available
    if _available is not None:
        return _available
    if not sys.platform.startswith("linux"):
        _available = (False, f"network namespaces need Linux (this is {sys.platform})")
    elif os.geteuid() != 0:
        _available = (False, "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN); this is uid "
                             f"{os.geteuid()}")
    elif shutil.which("ip") is None:
        _available = (False, "the `ip` command (iproute2) is not installed")
    else:
        probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
        try:
            _ip("netns", "add", probe, timeout=15)
        except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
            _available = (False, f"`ip netns add` failed: {exc}")
        else:
            try:
                _ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb", timeout=15)
                _ip("-n", probe, "link", "add", "br0", "type", "bridge", timeout=15)
                _ip("-n", probe, "link", "set", "lo", "up", timeout=15)
                run_in_netns(probe, lambda: socket.socket().close())
                _available = (True, "")
            except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
                _available = (False, f"namespaces work but veth/bridge/setns do not: {exc}")
            finally:
                _ip("netns", "del", probe, check=False)
    return _available


# -- running Python code inside a namespace --------------------------------------------------------------------
_libc = None


def _setns(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(netns: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `fn` on a fresh thread that has entered network namespace `netns`; return its result.

    A socket belongs to the namespace it was created in for its whole life, whatever thread uses it later, so
    this is how a process opens listening sockets or connections inside a namespace without moving itself.
    """
    box: dict[str, Any] = {}

    def main() -> None:
        try:
            _setns(f"/run/netns/{netns}")
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=main, name=f"netns {netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def netns_socket(netns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket in namespace `netns` (usable from any thread)."""
    return run_in_netns(netns, socket.socket, family, type)


# -- hosts and clusters ----------------------------------------------------------------------------------------
class Host:
    """One namespace of a cluster: `name`, `netns` (the namespace's name), `addr` (its IPv4 address)."""

    def __init__(self, cluster: "Cluster", name: str, netns: str, addr: str, ifname: str, peer: str | None):
        self.cluster, self.name, self.netns, self.addr = cluster, name, netns, addr
        self.ifname = ifname  # its interface ("eth0"; "br0" for the hub)
        self.peer = peer  # the bridge port in the hub that is this host's other end (None for the hub)
        self.rate_mbit: tuple[float | None, float | None] = (None, None)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.addr}, netns={self.netns!r})"

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.netns, *map(str, argv)]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start `argv` inside this namespace (`ip netns exec`, which execs it: the Popen's pid is the program's).
        The cluster stops it on close if it is still running."""
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self.cluster._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run `argv` inside this namespace to completion (output captured as text unless told otherwise)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), check=check, timeout=timeout, **kwargs)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call `fn` on a thread inside this namespace (sockets it makes stay in the namespace)."""
        return run_in_netns(self.netns, fn, *args, **kwargs)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return netns_socket(self.netns, family, type)

    def connect(self, address: tuple[str, int], timeout: float = 10) -> socket.socket:
        """A TCP connection opened from this host."""
        return self.call(socket.create_connection, address, timeout)

    def listen(self, port: int = 0, host: str | None = None, backlog: int = 128) -> socket.socket:
        """A listening TCP socket in this host (on its address unless `host` is given)."""
        sock = self.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.addr if host is None else host, port))
        sock.listen(backlog)
        return sock

    def set_rate(self, up_mbit: float | None, down_mbit: float | None = None, *, latency_ms: float = 400) -> None:
        """Cap this host's link with the kernel's tbf: `up_mbit` on what it sends, `down_mbit` (default the same)
        on what it receives; None removes a cap."""
        if self.peer is None:
            raise NetnsError("the hub has no link of its own to shape")
        down_mbit = up_mbit if down_mbit is None else down_mbit
        for netns, dev, rate in ((self.netns, self.ifname, up_mbit), (self.cluster.hub.netns, self.peer, down_mbit)):
            if rate:
                # tbf needs a bucket of at least one timer tick of data; 32 kbit suffices up to ~10 Mbit/s.
                burst = max(4096, int(rate * 1e6 / 8 / 100))
                _tc("-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}mbit",
                    "burst", str(burst), "latency", f"{latency_ms}ms")
            else:
                subprocess.run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
        self.rate_mbit = (up_mbit, down_mbit)

    def emulate_link(self, upstream: tuple[str, int] | str, link: Any = None, *, listen_port: int = 0,
                     listen_host: str = "127.0.0.1", name: str | None = None, process: bool = False,
                     **kwargs: Any) -> Any:
        """A `LinkEmulator` whose listening socket is in this host (127.0.0.1 by default: only this host's
        processes reach it) and whose upstream connections leave from this host to `upstream`.

        `process=False` runs it on a thread of this process (returned started; the cluster stops it on close);
        `process=True` runs `python -m heterorl.tools.linkem` inside this namespace and returns a `LinkProcess`
        (its `target`, and `stats()` read from its stats file).
        """
        from heterorl.tools.linkem import LinkEmulator, LinkSpec

        link = link or LinkSpec()
        if process:
            return LinkProcess.start(self, upstream, link, listen=f"{listen_host}:{listen_port}", name=name,
                                     **kwargs)
        emu = LinkEmulator((listen_host, listen_port), upstream, link, name=name or f"{self.name}-link",
                           listen_netns=self.netns, upstream_netns=self.netns, **kwargs)
        emu.start()
        self.cluster._emulators.append(emu)
        return emu


class LinkProcess:
    """`python -m heterorl.tools.linkem` running inside a host's namespace."""

    def __init__(self, proc: subprocess.Popen, target: str, stats_file: str, log_file: str):
        self.proc, self.target, self.stats_file, self.log_file = proc, target, stats_file, log_file

    @classmethod
    def start(cls, host: Host, upstream: tuple[str, int] | str, link: Any, *, listen: str, name: str | None = None,
              timeout: float = 30, stats_interval_s: float = 0.5) -> "LinkProcess":
        import json

        from heterorl.tools.linkem import spec_to_args

        if not isinstance(upstream, str):
            upstream = f"{upstream[0]}:{upstream[1]}"
        base = os.path.join(host.cluster.workdir, f"linkem-{host.name}-{len(host.cluster._procs)}")
        ready, stats, logf = base + ".ready.json", base + ".stats.json", base + ".log"
        argv = [sys.executable, "-m", "heterorl.tools.linkem", "--listen", listen, "--upstream", upstream,
                *spec_to_args(link), "--ready-file", ready, "--stats-file", stats,
                "--stats-interval-s", str(stats_interval_s), "--name", name or f"{host.name}-link"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(),
                                                                          os.environ.get("PYTHONPATH")]))}
        with open(logf, "w") as log_fh:
            proc = host.popen(argv, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.time() + timeout
        while not os.path.exists(ready):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise NetnsError(f"linkem in {host.name} did not start:\n{open(logf).read()}")
            time.sleep(0.02)
        with open(ready) as fh:
            target = json.load(fh)["listen"]
        return cls(proc, target, stats, logf)

    def stats(self) -> dict[str, Any]:
        import json

        with open(self.stats_file) as fh:
            return json.load(fh)

    def stop(self, timeout: float = 10) -> dict[str, Any]:
        """SIGTERM, wait, and return the final stats."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.stats()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_clusters: "weakref.WeakSet[Cluster]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for cluster in list(_clusters):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            log.exception("netns: cleanup at exit failed")


class Cluster:
    """A hub namespace with a bridge and one namespace per host (see the module doc)."""

    def __init__(self, subnet: str = DEFAULT_SUBNET, *, sweep: bool = True, workdir: str | None = None):
        ok, why = netns_available()
        if not ok:
            raise NetnsError(f"network namespaces are not available here: {why}")
        if sweep:
            sweep_stale()
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.version != 4 or self.subnet.num_addresses < 4:
            raise ValueError(f"need an IPv4 subnet with room for hosts, got {subnet}")
        self.prefix = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}"
        import tempfile

        self.workdir = workdir or tempfile.mkdtemp(prefix=f"{self.prefix}-")
        self._addrs = iter(self.subnet.hosts())
        self._procs: list[subprocess.Popen] = []
        self._emulators: list[Any] = []
        self._netns: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.closed = False
        _clusters.add(self)
        try:
            hub_ns = self._new_netns("hub")
            addr = str(next(self._addrs))
            _ip("-n", hub_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", hub_ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "br0")
            _ip("-n", hub_ns, "link", "set", "br0", "up")
            self.hub = Host(self, "hub", hub_ns, addr, "br0", None)
        except BaseException:
            self.close()
            raise

    def _new_netns(self, name: str) -> str:
        netns = f"{self.prefix}-{name}"
        _ip("netns", "add", netns)
        self._netns.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def add_host(self, name: str, *, rate_mbit: float | None = None, down_rate_mbit: float | None = None) -> Host:
        """A new namespace `name` on the bridge with the next address of the subnet; `rate_mbit` caps what it
        sends and `down_rate_mbit` (default the same) what it receives, with tbf."""
        if self.closed:
            raise NetnsError("cluster is closed")
        if not _NAME_RE.match(name) or name == "hub" or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r} (letters, digits, _ . -; not 'hub')")
        try:
            addr = str(next(self._addrs))
        except StopIteration:
            raise NetnsError(f"subnet {self.subnet} is full") from None
        netns = self._new_netns(name)
        peer = f"p{len(self.hosts) + 1}"
        hub = self.hub.netns
        _ip("-n", hub, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", hub, "link", "set", peer, "master", "br0")
        _ip("-n", hub, "link", "set", peer, "up")
        _ip("-n", netns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        host = Host(self, name, netns, addr, "eth0", peer)
        self.hosts[name] = host
        if rate_mbit or down_rate_mbit:
            host.set_rate(rate_mbit, down_rate_mbit if down_rate_mbit is not None else rate_mbit)
        log.info("netns: host %s at %s (namespace %s)", name, addr, netns)
        return host

    def __getitem__(self, name: str) -> Host:
        return self.hub if name == "hub" else self.hosts[name]

    @property
    def namespaces(self) -> list[str]:
        """The namespaces this cluster made and has not deleted yet."""
        return list(self._netns)

    def close(self) -> None:
        """Stop what runs in the namespaces, then delete them. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for emu in self._emulators:
            try:
                emu.stop()
            except Exception:  # noqa: BLE001
                log.exception("netns: stopping a link emulator failed")
        stop_processes(self._procs, 10)
        for netns in reversed(self._netns):
            _kill_netns_pids(netns)
            _ip("netns", "del", netns, check=False)
        self._netns.clear()
        _clusters.discard(self)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - a safety net; close() is the way
        if not getattr(self, "closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001
                pass


def _kill_netns_pids(netns: str) -> None:
    """Kill the processes still inside `netns` (children of what `popen` started, which it cannot track)."""
    proc = _ip("netns", "pids", netns, check=False)
    pids = [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if not pids:
            return
        deadline = time.time() + 3
        while time.time() < deadline:
            pids = [pid for pid in pids if _alive(pid)]
            if not pids:
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sweep_stale() -> list[str]:
    """Delete namespaces named by this module for a process that no longer exists; returns their names."""
    removed = []
    for name in list_netns():
        match = _STALE_RE.match(name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    if removed:
        log.info("netns: removed %d stale namespaces: %s", len(removed), ", ".join(removed))
    return removed
