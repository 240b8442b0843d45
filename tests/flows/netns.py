"""Hosts for cluster tests: network namespaces joined by a bridge, each with an address of its own.

Why namespaces: workers on other machines reach the Prefect server by its address, never through 127.0.0.1,
and a server restart or a dead machine must be survivable. Namespaces give each process group its own network
stack (its own loopback and ports) on one machine, so the test exercises real addresses without touching any
host outside it. Addresses come from 198.18.0.0/15 (reserved for network benchmarking, RFC 2544) and exist only
in the namespaces made here and on one veth end in the test's own namespace, so the test process can reach
them; everything is removed on ``close()``, which kills whatever still runs inside.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

SUBNET = "198.18.36"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (no ``ip``, not root, no CAP_NET_ADMIN), or None."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"n36probe{os.getpid() % 100000}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        veth = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if veth.returncode != 0:
            return f"cannot make a veth pair in a namespace: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class TestNetwork:
    """A bridge in a hub namespace, hosts hung on it, and the test's own end at ``<SUBNET>.1``."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.tag = f"n36{os.getpid() % 100000}"
        self.hub = f"{self.tag}-hub"
        self.root_link = f"{self.tag}r"
        self.hosts: dict[str, str] = {}
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "up0", "netns", self.hub)
        _ip("-n", self.hub, "link", "set", "up0", "master", "br0", "up")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")

    def add_host(self, name: str, octet: int) -> str:
        """A namespace ``<tag>-<name>`` with address ``<SUBNET>.<octet>``; returns that address."""
        namespace = f"{self.tag}-{name}"
        _ip("netns", "add", namespace)
        self.hosts[name] = namespace
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", self.hub, "link", "add", f"v{octet}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.hub, "link", "set", f"v{octet}", "master", "br0", "up")
        _ip("-n", namespace, "addr", "add", f"{SUBNET}.{octet}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        return f"{SUBNET}.{octet}"

    def command(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run on host ``name``."""
        return ["ip", "netns", "exec", self.hosts[name], *argv]

    def pids(self, name: str) -> list[int]:
        result = _ip("netns", "pids", self.hosts[name], check=False)
        return [int(pid) for pid in result.stdout.split() if pid.isdigit()]

    def kill_host(self, name: str) -> None:
        """Every process on host ``name`` SIGKILLed, as when the machine dies; waits until they are gone."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = self.pids(name)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)

    def close(self) -> None:
        """Kill what runs on the hosts, delete their namespaces, the hub and the test's veth end."""
        for name in list(self.hosts):
            self.kill_host(name)
            _ip("netns", "del", self.hosts.pop(name), check=False)
        _ip("netns", "del", self.hub, check=False)
        _ip("link", "del", self.root_link, check=False)
