"""An emulated cluster on one machine: one network namespace per worker, a rate-limited bridge.

Layout (everything lives in namespaces this module creates and deletes; nothing is added to the
root namespace, so the benchmark's traffic cannot reach any other network)::

    <prefix>hub   bridge br0, veth ends v0..v{N-1}      (tbf on every vN: the worker's download)
    <prefix>w0    eth0 10.213.0.1/24  (tbf on eth0: the worker's upload)
    <prefix>w1    eth0 10.213.0.2/24
    ...

Every link is limited in both directions by a token bucket (``tc qdisc ... tbf``): the worker's
egress on its ``eth0`` and the hub's egress towards the worker. A one-way delay is added with
``netem`` when the kernel has it (many minimal kernels do not; then the delay is refused with a
clear message rather than silently ignored).

Without root (or without ``ip netns``), :class:`LoopbackCluster` runs the same workers on
``127.0.0.1`` with no throttling and no per-worker interface counters, and says so.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBNET = "10.213.0"  # only ever assigned inside namespaces this module creates
IFNAME = "eth0"


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


def netns_available() -> tuple[bool, str]:
    """Whether this process may create network namespaces, veths and tbf qdiscs (needs root)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "not a POSIX system"
    if os.geteuid() != 0:
        return False, "not running as root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "iproute2 (ip, tc) not found"
    probe = f"lcbench-{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except (subprocess.SubprocessError, OSError) as err:
        return False, f"`ip netns add` failed: {getattr(err, 'stderr', '') or err}"
    try:
        _veth_with_qdisc(probe, "tbf rate 10mbit burst 32kb latency 50ms")
    except (subprocess.SubprocessError, OSError) as err:
        return False, f"veth/tbf unavailable: {getattr(err, 'stderr', '') or err}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return True, "root, ip netns, veth and tbf available"


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (needed for ``--delay-ms``)."""
    probe = f"lcbench-{os.getpid()}-netem"
    try:
        _run(["ip", "netns", "add", probe])
        _veth_with_qdisc(probe, "netem delay 1ms")
        return True
    except (subprocess.SubprocessError, OSError):
        return False
    finally:
        _run(["ip", "netns", "del", probe], check=False)


def _veth_with_qdisc(netns: str, qdisc: str) -> None:
    """A throwaway veth pair in ``netns`` with ``qdisc`` on one end; raises if either fails."""
    inside = ["ip", "netns", "exec", netns]
    _run([*inside, "ip", "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
    _run([*inside, "tc", "qdisc", "add", "dev", "p0", "root", *qdisc.split()])


def tbf_burst_bytes(rate_mbit: float) -> int:
    """Bucket depth: ~2 ms of traffic, at least 32 KiB (tbf needs >= one GSO packet plus MTU)."""
    return max(32 * 1024, int(rate_mbit * 1e6 / 8 * 0.002))


@dataclass
class NamespaceCluster:
    """``n`` worker namespaces on one bridge, every link limited to ``rate_mbit`` by tbf.

    Args:
        n: number of workers (namespaces).
        rate_mbit: link rate in Mbit/s, each direction of each worker's link; ``None``: no limit.
        delay_ms: one-way delay added by netem on each worker's egress (needs netem; 0: none).
        segment: cap every packet at one MTU (``gso_max_segs 1``) so interface counters include
            the per-packet TCP/IP/Ethernet headers of a real 1500-byte-MTU link; off lets veth pass
            64 KiB super-packets whose headers are counted once (cheaper on CPU, ~5% fewer bytes).
        queue_ms: tbf queue depth, in milliseconds of traffic at the link rate. A deeper queue
            lets a bulk transfer delay every small message behind it by up to this much
            (bufferbloat); a shallower one makes TCP lose and resend more.
    """

    n: int
    rate_mbit: float | None
    delay_ms: float = 0.0
    segment: bool = True
    queue_ms: float = 20.0
    prefix: str = field(default_factory=lambda: f"lcbench-{os.getpid()}-")
    created: list[str] = field(default_factory=list)
    #: True when every worker has its own namespace, throttled link and interface counters
    isolated: bool = True

    # -- names --------------------------------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{self.prefix}hub"

    def ns(self, rank: int) -> str:
        return f"{self.prefix}w{rank}"

    def addr(self, rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    @property
    def master_addr(self) -> str:
        return self.addr(0)

    @property
    def ifname(self) -> str:
        return IFNAME

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        delay = f", +{self.delay_ms:g} ms one-way (netem)" if self.delay_ms else ""
        return (
            f"{self.n} network namespaces on a bridge, tbf {rate} each direction of every link{delay}, "
            f"MTU 1500{', one segment per packet' if self.segment else ', GSO on'}"
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> NamespaceCluster:
        _register_cleanup(self)
        try:
            self._create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def _ip(self, ns: str, *args: str) -> None:
        _run(["ip", "netns", "exec", ns, *args])

    def _create(self) -> None:
        if not 1 <= self.n <= 250:
            raise ValueError(f"n must be in 1..250, got {self.n}")
        _run(["ip", "netns", "add", self.hub])
        self.created.append(self.hub)
        self._ip(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        self._ip(self.hub, "ip", "link", "set", "br0", "up")
        for r in range(self.n):
            ns = self.ns(r)
            _run(["ip", "netns", "add", ns])
            self.created.append(ns)
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    f"v{r}",
                    "netns",
                    self.hub,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    IFNAME,
                    "netns",
                    ns,
                ]
            )
            self._ip(self.hub, "ip", "link", "set", f"v{r}", "master", "br0")
            self._ip(ns, "ip", "addr", "add", f"{self.addr(r)}/24", "dev", IFNAME)
            for dev_ns, dev in ((ns, IFNAME), (self.hub, f"v{r}")):
                if self.segment:
                    self._ip(dev_ns, "ip", "link", "set", dev, "gso_max_segs", "1")
                self._ip(dev_ns, "ip", "link", "set", dev, "up")
                self._shape(dev_ns, dev, delay=self.delay_ms if dev_ns == ns else 0.0)
            self._ip(ns, "ip", "link", "set", "lo", "up")

    def _shape(self, ns: str, dev: str, delay: float) -> None:
        tbf: list[str] = []
        if self.rate_mbit is not None:
            burst = tbf_burst_bytes(self.rate_mbit)
            # latency bounds the queue (in time at the link rate)
            tbf = [
                "tbf",
                "rate",
                f"{self.rate_mbit:g}mbit",
                "burst",
                str(burst),
                "latency",
                f"{self.queue_ms:g}ms",
            ]
        if delay:
            self._ip(
                ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{delay:g}ms"
            )
            if tbf:
                self._ip(ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf)
        elif tbf:
            self._ip(ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf)

    def teardown(self) -> None:
        """Delete every namespace this cluster created (idempotent; veths go with them)."""
        while self.created:
            _run(["ip", "netns", "del", self.created.pop()], check=False)
        _CLUSTERS.discard(self)

    # -- running and counting -----------------------------------------------------------------
    def command(self, rank: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(rank), *argv]

    def tx_bytes(self, rank: int) -> int:
        """Bytes worker ``rank``'s interface transmitted (its namespace's ``eth0`` counter)."""
        out = _run(
            ["ip", "netns", "exec", self.ns(rank), "cat", f"/sys/class/net/{IFNAME}/statistics/tx_bytes"]
        )
        return int(out.stdout.strip())

    def __hash__(self) -> int:
        return id(self)


@dataclass
class LoopbackCluster:
    """Fallback without root: every worker on 127.0.0.1, unthrottled, no per-worker counters."""

    n: int
    rate_mbit: float | None = None
    delay_ms: float = 0.0
    isolated: bool = False

    master_addr = "127.0.0.1"
    ifname = "lo"

    def describe(self) -> str:
        return f"{self.n} processes on unthrottled loopback (fallback: no namespaces; links NOT rate-limited)"

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def teardown(self) -> None:
        pass

    def addr(self, rank: int) -> str:
        return self.master_addr

    def command(self, rank: int, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def tx_bytes(self, rank: int) -> int | None:
        return None  # loopback is shared with every other process on the machine


# -- cleanup on exit, error or Ctrl-C ---------------------------------------------------------
_CLUSTERS: set[NamespaceCluster] = set()
_INSTALLED = False


def _cleanup_all() -> None:
    for cluster in list(_CLUSTERS):
        cluster.teardown()


def _on_signal(signum: int, frame: object) -> None:
    _cleanup_all()
    sys.exit(128 + signum)


def _register_cleanup(cluster: NamespaceCluster) -> None:
    global _INSTALLED
    _CLUSTERS.add(cluster)
    if not _INSTALLED:
        atexit.register(_cleanup_all)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)
        _INSTALLED = True


def stale_namespaces(prefix: str = "lcbench-") -> list[str]:
    """Namespaces left by a benchmark that was killed with SIGKILL (``--cleanup`` removes them)."""
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    alive = []
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        alive.append(name)
    return alive


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait for every process until ``timeout`` seconds; returns exit codes (None: still running)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes
