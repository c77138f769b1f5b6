"""An emulated cluster on one machine: N network namespaces joined by a rate-shaped link.

    python scripts/emulated_cluster.py --nodes 2 --rate-mbit 800 --log-dir logs/ -- CMD [ARGS...]
    python scripts/emulated_cluster.py --cleanup          # remove what a killed harness left

Each node is a Linux network namespace with loopback up and one interface holding an address
of a private subnet (10.213.0.1, .2, ... /24 by default) that exists only inside the
namespaces: nothing is routed to the host or beyond.  Two nodes are joined by a veth pair;
more nodes hang on a bridge in a hub namespace.  Every node's egress is shaped by a token
bucket (`tc qdisc ... tbf`) at --rate-mbit (0: unshaped).  CMD runs once in every namespace with

    NODE_RANK (0..N-1)  NNODES  MASTER_ADDR (node 0's address)  MASTER_PORT
    NODE_ADDR (its own address)  GLOO_SOCKET_IFNAME (its interface, so gloo binds to the link)

in its environment, e.g. `torchrun --nnodes $NNODES --node_rank $NODE_RANK ...` under
`bash -c`, or a script reading them.  The output of node r is streamed to stdout prefixed by
`[node r]` and stored in LOG_DIR/node<r>.log.  The exit status is 0 if every node exits 0;
otherwise that of the first node to fail, and the other nodes are stopped --grace seconds
later (a rank whose peer died usually waits in a collective until its timeout).

Teardown always runs (finally, SIGINT and SIGTERM): the nodes' processes are killed, then the
namespaces are deleted, which deletes their interfaces and qdiscs.  Namespaces are named
<prefix><pid>-<node> (hub: <prefix><pid>-hub) so several harnesses can run at once, and
--cleanup removes only those whose harness process is gone (--force: all with the prefix).

Needs root and iproute2 (`ip`, `tc`); says in one line what is missing.

Rate accuracy: the token bucket's burst is max(64 KiB, rate x 4 ms) and its queue holds
100 ms at the rate (--burst-kib / --queue-ms override).  A burst below what the link sends
per kernel timer tick makes tbf undershoot at high rates; a short queue drops packets and
TCP backs off below the rate.  tests/test_emulated_cluster.py measures a gloo all-reduce
against the shaped rate.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

DEFAULT_PREFIX = "emc"
DEFAULT_SUBNET = "10.213.0"
DEFAULT_PORT = 29500


class ClusterError(RuntimeError):
    """Set-up of the emulated cluster failed (the message is one line saying why)."""


def missing_requirements() -> Optional[str]:
    """One line saying what this machine lacks to build the cluster, or None."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    problems = []
    if os.geteuid() != 0:
        problems.append("root (network namespaces and tc need it)")
    if missing:
        problems.append(f"{' and '.join(missing)} from iproute2 (apt-get install iproute2)")
    return ("emulated_cluster: needs " + "; ".join(problems)) if problems else None


def _ip(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"emulated_cluster: `ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _tc(namespace: str, *args) -> None:
    proc = subprocess.run(["tc", "-n", namespace, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"emulated_cluster: `tc -n {namespace} {' '.join(args)}` failed: {proc.stderr.strip()}")


def list_namespaces() -> List[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def tbf_parameters(rate_mbit: float, burst_kib: Optional[float] = None, queue_ms: float = 100.0) -> Dict[str, int]:
    """Token-bucket settings for a rate: burst (bytes) and limit (bytes of queue)."""
    rate_bytes = rate_mbit * 1e6 / 8
    burst = int(burst_kib * 1024) if burst_kib else max(64 * 1024, int(rate_bytes * 0.004))
    limit = burst + int(rate_bytes * queue_ms / 1000)
    return {"burst": burst, "limit": limit}


def namespace_pids(namespace: str) -> List[int]:
    out = _ip("netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill(pids: Sequence[int], sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def delete_namespace(namespace: str) -> None:
    """Kill every process inside `namespace`, then delete it (its interfaces and qdiscs go too)."""
    for _ in range(50):
        pids = namespace_pids(namespace)
        if not pids:
            break
        _kill(pids)
        time.sleep(0.05)
    _ip("netns", "del", namespace, check=False)


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the harness that created namespace `name` (<prefix><pid>-...) still runs (a pid
    recycled by a process that is not Python does not count)."""
    m = re.match(re.escape(prefix) + r"(\d+)-", name)
    try:
        with open(f"/proc/{m.group(1)}/cmdline", "rb") as f:
            return b"python" in f.read()
    except (AttributeError, OSError):
        return False


def cleanup(prefix: str = DEFAULT_PREFIX, force: bool = False) -> List[str]:
    """Delete the namespaces named <prefix><pid>-* whose harness is gone (all of them with
    force); returns their names."""
    removed = []
    for name in list_namespaces():
        if re.match(re.escape(prefix) + r"\d+-", name) and (force or not _owner_alive(name, prefix)):
            delete_namespace(name)
            removed.append(name)
    return removed


class EmulatedCluster:
    """N namespaces with a shaped link; a context manager (teardown on exit, always).

    with EmulatedCluster(nodes=2, rate_mbit=800) as cluster:
        status = cluster.run(["python", "worker.py"], log_dir="logs")
    """

    def __init__(self, nodes: int = 2, rate_mbit: float = 0.0, prefix: str = DEFAULT_PREFIX,
                 subnet: str = DEFAULT_SUBNET, master_port: int = DEFAULT_PORT,
                 burst_kib: Optional[float] = None, queue_ms: float = 100.0):
        if nodes < 2:
            raise ClusterError(f"emulated_cluster: --nodes must be at least 2 (got {nodes})")
        if nodes > 250:
            raise ClusterError(f"emulated_cluster: --nodes must be at most 250 (one /24 subnet; got {nodes})")
        if rate_mbit < 0:
            raise ClusterError(f"emulated_cluster: --rate-mbit must be >= 0 (0: unshaped; got {rate_mbit})")
        if not re.fullmatch(r"10\.\d{1,3}\.\d{1,3}", subnet):
            raise ClusterError(f"emulated_cluster: --subnet must be the first three octets of a 10.x.y.0/24 "
                               f"private subnet, e.g. {DEFAULT_SUBNET} (got {subnet})")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise ClusterError(f"emulated_cluster: --prefix must be 1-6 lower-case letters or digits, "
                               f"starting with a letter (got {prefix!r})")
        self.nodes, self.rate_mbit, self.prefix = nodes, rate_mbit, prefix
        self.master_port = master_port
        self.tbf = tbf_parameters(rate_mbit, burst_kib, queue_ms) if rate_mbit > 0 else None
        tag = f"{prefix}{os.getpid()}-"
        self.namespaces = [f"{tag}{r}" for r in range(nodes)]
        self.hub = f"{tag}hub" if nodes > 2 else None
        self.interfaces = [f"emc{r}" for r in range(nodes)]
        self.addresses = [f"{subnet}.{r + 1}" for r in range(nodes)]
        self._created: List[str] = []
        self._procs: List[subprocess.Popen] = []

    # ---- set-up and teardown ----
    def setup(self) -> "EmulatedCluster":
        problem = missing_requirements()
        if problem:
            raise ClusterError(problem)
        try:
            for ns in self.namespaces + ([self.hub] if self.hub else []):
                _ip("netns", "add", ns)
                self._created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            if self.hub is None:
                a, b = self.namespaces
                _ip("link", "add", self.interfaces[0], "netns", a, "type", "veth",
                    "peer", "name", self.interfaces[1], "netns", b)
            else:
                _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
                _ip("-n", self.hub, "link", "set", "br0", "up")
                for r, ns in enumerate(self.namespaces):
                    port = f"port{r}"
                    _ip("link", "add", self.interfaces[r], "netns", ns, "type", "veth",
                        "peer", "name", port, "netns", self.hub)
                    _ip("-n", self.hub, "link", "set", port, "master", "br0")
                    _ip("-n", self.hub, "link", "set", port, "up")
            for r, ns in enumerate(self.namespaces):
                _ip("-n", ns, "addr", "add", f"{self.addresses[r]}/24", "dev", self.interfaces[r])
                _ip("-n", ns, "link", "set", self.interfaces[r], "up")
                if self.tbf:
                    _tc(ns, "qdisc", "replace", "dev", self.interfaces[r], "root", "tbf",
                        "rate", f"{self.rate_mbit}mbit", "burst", str(self.tbf["burst"]),
                        "limit", str(self.tbf["limit"]))
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                _kill_group(proc)
        for ns in reversed(self._created):
            delete_namespace(ns)
        self._created = []
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.teardown()
        return False

    # ---- running ----
    def node_env(self, rank: int) -> Dict[str, str]:
        return {"NODE_RANK": str(rank), "NNODES": str(self.nodes), "MASTER_ADDR": self.addresses[0],
                "MASTER_PORT": str(self.master_port), "NODE_ADDR": self.addresses[rank],
                "GLOO_SOCKET_IFNAME": self.interfaces[rank]}

    def run(self, cmd: Sequence[str], log_dir: Optional[str] = None, env: Optional[Dict[str, str]] = None,
            grace: float = 10.0, timeout: Optional[float] = None, quiet: bool = False) -> int:
        """Run cmd on every node; returns 0 or the status of the first node to fail (124 on timeout)."""
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        threads = []
        for rank, ns in enumerate(self.namespaces):
            node_env = dict(os.environ, **(env or {}), **self.node_env(rank))
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=node_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self._procs.append(proc)
            log = os.path.join(log_dir, f"node{rank}.log") if log_dir else None
            t = threading.Thread(target=_stream, args=(proc.stdout, rank, log, quiet), daemon=True)
            t.start()
            threads.append(t)
        procs = self._procs[-self.nodes:]
        status, failed_at, start = 0, None, time.monotonic()
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            for p in procs:
                if status == 0 and p.poll() not in (None, 0):
                    status, failed_at = _exit_status(p.returncode), now
            if failed_at is not None and now - failed_at > grace:
                break
            if timeout is not None and now - start > timeout:
                status = status or 124
                break
            time.sleep(0.1)
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
            p.wait()
            if status == 0 and p.returncode != 0:
                status = _exit_status(p.returncode)
        for t in threads:
            t.join(timeout=5)
        return status


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the node's session, SIGKILL it 3 s later (its namespace is emptied afterwards)."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stream(pipe, rank: int, log_path: Optional[str], quiet: bool) -> None:
    log = open(log_path, "ab") if log_path else None
    try:
        for line in iter(pipe.readline, b""):
            if log:
                log.write(line)
                log.flush()
            if not quiet:
                sys.stdout.write(f"[node {rank}] " + line.decode(errors="replace"))
                sys.stdout.flush()
    finally:
        if log:
            log.close()


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def run_cluster(cmd: Sequence[str], **kwargs) -> int:
    """Build a cluster, run cmd on it and tear it down, also on SIGINT/SIGTERM (exit 130/143)."""
    run_args = {k: kwargs.pop(k) for k in ("log_dir", "env", "grace", "timeout", "quiet") if k in kwargs}
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = EmulatedCluster(**kwargs)
    try:
        cluster.setup()
        return cluster.run(cmd, **run_args)
    except (_Terminated, KeyboardInterrupt) as e:
        signum = e.args[0] if isinstance(e, _Terminated) else signal.SIGINT
        print(f"emulated_cluster: stopped by {signal.Signals(signum).name}; tearing down", file=sys.stderr)
        return 128 + signum
    finally:
        # a second Ctrl-C must not interrupt the teardown
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        cluster.teardown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] -- CMD [ARGS...]  |  %(prog)s --cleanup [--force]")
    p.add_argument("--nodes", type=int, default=2, help="emulated nodes (network namespaces), >= 2")
    p.add_argument("--rate-mbit", type=float, default=0.0, help="egress rate of every node, Mbit/s (0: unshaped)")
    p.add_argument("--burst-kib", type=float, help="token-bucket burst (default: max(64 KiB, 4 ms at the rate))")
    p.add_argument("--queue-ms", type=float, default=100.0, help="token-bucket queue, ms at the rate")
    p.add_argument("--log-dir", help="store node r's output in LOG_DIR/node<r>.log")
    p.add_argument("--master-port", type=int, default=DEFAULT_PORT)
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help="first three octets of the nodes' 10.x.y.0/24")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="namespace name prefix (names: PREFIX<pid>-<node>)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds the other nodes get after one fails")
    p.add_argument("--timeout", type=float, help="stop every node after this many seconds (exit 124)")
    p.add_argument("--quiet", action="store_true", help="store the logs only, do not stream them")
    p.add_argument("--cleanup", action="store_true", help="delete leftover namespaces of harnesses that are gone")
    p.add_argument("--force", action="store_true", help="with --cleanup: also those of running harnesses")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...], run on every node")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    problem = missing_requirements()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.cleanup:
        removed = cleanup(args.prefix, args.force)
        print(f"emulated_cluster: removed {len(removed)} namespace(s){': ' + ' '.join(removed) if removed else ''}")
        return 0
    if not cmd:
        print("emulated_cluster: no command given: put it after --, e.g. -- python worker.py", file=sys.stderr)
        return 2
    try:
        return run_cluster(cmd, nodes=args.nodes, rate_mbit=args.rate_mbit, prefix=args.prefix,
                           subnet=args.subnet, master_port=args.master_port, burst_kib=args.burst_kib,
                           queue_ms=args.queue_ms, log_dir=args.log_dir, grace=args.grace,
                           timeout=args.timeout, quiet=args.quiet)
    except ClusterError as e:
        print(str(e), file=sys.stderr)
        return 2


def cli_main(argv=None):
    """The command line: the exit status is main's."""
    sys.exit(main(argv))


if __name__ == "__main__":
    cli_main()
