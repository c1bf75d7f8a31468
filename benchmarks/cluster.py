"""Emulated cluster on one machine: network namespaces, veth links, tbf.

Topology (nothing is created in the root namespace)::

    <prefix>-h0 [eth0 10.213.0.1] ──veth── p0 ┐
    <prefix>-h1 [eth0 10.213.0.2] ──veth── p1 ├─ br0 in <prefix>-sw
    ...                                       ┘

Each host namespace holds one JAX process; the switch namespace holds a
Linux bridge. A link of rate R is a ``tbf`` qdisc on both of its egresses
(host eth0: uplink, switch port: downlink), i.e. a full-duplex R link to a
non-blocking switch. This kernel has no netem, so there is no added delay.

Inside a namespace gloo resolves the machine's hostname to 127.0.0.1 (from
/etc/hosts) and its peers cannot connect. Each host namespace therefore gets
its own ``/etc/netns/<ns>/hosts`` mapping the hostname to its own address;
``ip netns exec`` bind-mounts it over /etc/hosts for that process only.

Everything is named after one unique prefix (``gqsgd-cl<hex>``) and torn down
in ``Cluster.close`` (also on Ctrl-C, SIGTERM and timeouts: see
``install_signal_handlers``): processes inside the namespaces are killed by
pid, the namespaces deleted (which deletes their veths and the bridge) and
the /etc/netns entries removed. ``python benchmarks/cluster.py --cleanup``
removes what a SIGKILLed run left behind.

All privileged actions go through a ``runner`` (argv -> CompletedProcess), so
the command construction and the clean-up logic are testable without root.
"""

import argparse
from collections.abc import Callable, Sequence
import contextlib
import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

PREFIX_ROOT = "gqsgd-cl"
_OWN_NS = re.compile(re.escape(PREFIX_ROOT) + r"[0-9a-f]+-(sw|h\d+)$")
SUBNET = "10.213.0"
COORDINATOR_PORT = 12357
LINE_TAG = "@@ "  # worker protocol lines: "@@ {json}"

Runner = Callable[[Sequence[str], bool], subprocess.CompletedProcess]


def run_command(
  argv: Sequence[str], check: bool = True
) -> subprocess.CompletedProcess:
  """The real runner: runs argv, captures text output, raises if check."""
  proc = subprocess.run(
    list(argv), capture_output=True, text=True, timeout=60, check=False
  )
  if check and proc.returncode != 0:
    raise RuntimeError(
      f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}"
    )
  return proc


def unique_prefix() -> str:
  return f"{PREFIX_ROOT}{os.getpid():x}{os.urandom(2).hex()}"


def root_problem() -> str | None:
  """Why the emulated cluster cannot run here, or None if it can."""
  if not sys.platform.startswith("linux"):
    return "network namespaces need Linux"
  if os.geteuid() != 0:
    return (
      "the emulated cluster needs root (network namespaces, veth, "
      "tc); run as root or with sudo"
    )
  for tool in ("ip", "tc"):
    if shutil.which(tool) is None:
      return f"`{tool}` (iproute2) is not installed"
  return None


def parse_rate(text: str) -> float | None:
  """'100mbit', '1gbit', '2.5gbit', '1e9' -> bits/s; 'unlimited' -> None."""
  t = text.strip().lower()
  if t in ("unlimited", "inf", "none", "0"):
    return None
  m = re.fullmatch(r"([\d.e+]+)\s*([kmg]?)(bit|bps)?(/s)?", t)
  if not m:
    raise ValueError(f"cannot parse link rate {text!r}")
  scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
  rate = float(m.group(1)) * scale
  if rate <= 0:
    raise ValueError(f"link rate must be > 0, got {text!r}")
  return rate


def rate_label(rate: float | None) -> str:
  if rate is None:
    return "unlimited"
  if rate >= 1e9:
    return f"{rate / 1e9:g} Gbit/s"
  return f"{rate / 1e6:g} Mbit/s"


def tbf_params(
  rate: float,
  burst_ms: float = 1.0,
  latency_ms: float = 50.0,
  min_burst: int = 64 * 1024,
) -> list[str]:
  """tbf arguments for a rate in bits/s.

  The bucket holds ``burst_ms`` of traffic but at least 64 KiB, so one
  TSO/GSO segment passes without being split and the hrtimer-driven
  shaper keeps up at Gbit rates; ``latency`` bounds the queue (packets that
  would wait longer are dropped and TCP backs off).
  """
  burst = max(min_burst, int(rate / 8 * burst_ms / 1e3))
  return [
    "rate",
    f"{int(rate)}bit",
    "burst",
    str(burst),
    "latency",
    f"{latency_ms:g}ms",
  ]


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """Names and addresses of an emulated cluster of ``num_hosts`` hosts."""

  num_hosts: int
  prefix: str
  subnet: str = SUBNET
  mtu: int = 1500

  def __post_init__(self):
    if not 1 <= self.num_hosts <= 250:
      raise ValueError(f"num_hosts must be in [1, 250], got {self.num_hosts}")

  @property
  def switch(self) -> str:
    return f"{self.prefix}-sw"

  def host(self, i: int) -> str:
    return f"{self.prefix}-h{i}"

  def address(self, i: int) -> str:
    return f"{self.subnet}.{i + 1}"

  @property
  def namespaces(self) -> list[str]:
    return [self.host(i) for i in range(self.num_hosts)] + [self.switch]

  def coordinator(self, port: int = COORDINATOR_PORT) -> str:
    return f"{self.address(0)}:{port}"


def setup_commands(spec: ClusterSpec) -> list[list[str]]:
  """ip commands that build the namespaces, veths and the bridge."""
  sw = spec.switch
  cmds = [
    ["ip", "netns", "add", sw],
    ["ip", "-n", sw, "link", "set", "lo", "up"],
    ["ip", "-n", sw, "link", "add", "br0", "type", "bridge"],
    ["ip", "-n", sw, "link", "set", "br0", "up"],
  ]
  for i in range(spec.num_hosts):
    h = spec.host(i)
    cmds += [
      ["ip", "netns", "add", h],
      ["ip", "-n", h, "link", "set", "lo", "up"],
      # Both ends are created directly in their namespaces.
      [
        "ip",
        "link",
        "add",
        "eth0",
        "netns",
        h,
        "type",
        "veth",
        "peer",
        "name",
        f"p{i}",
        "netns",
        sw,
      ],
      ["ip", "-n", h, "link", "set", "eth0", "mtu", str(spec.mtu)],
      ["ip", "-n", sw, "link", "set", f"p{i}", "mtu", str(spec.mtu)],
      ["ip", "-n", sw, "link", "set", f"p{i}", "master", "br0"],
      ["ip", "-n", sw, "link", "set", f"p{i}", "up"],
      ["ip", "-n", h, "addr", "add", f"{spec.address(i)}/24", "dev", "eth0"],
      ["ip", "-n", h, "link", "set", "eth0", "up"],
    ]
  return cmds


def _links(spec: ClusterSpec):
  for i in range(spec.num_hosts):
    yield spec.host(i), "eth0"  # uplink
    yield spec.switch, f"p{i}"  # downlink


def rate_commands(
  spec: ClusterSpec, rate: float | None, **tbf_kwargs
) -> list[tuple[list[str], bool]]:
  """(argv, check) pairs that set every link to ``rate`` (None: no shaper)."""
  if rate is None:  # deleting an absent qdisc fails: do not check
    return [
      (["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], False)
      for ns, dev in _links(spec)
    ]
  params = tbf_params(rate, **tbf_kwargs)
  return [
    (
      ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf"] + params,
      True,
    )
    for ns, dev in _links(spec)
  ]


def hosts_file(spec: ClusterSpec, i: int, hostname: str) -> str:
  """/etc/hosts of host i: the machine's hostname is this host's address."""
  lines = [
    "127.0.0.1 localhost",
    "::1 localhost",
    f"{spec.address(i)} {hostname}",
  ]
  lines += [f"{spec.address(j)} {spec.host(j)}" for j in range(spec.num_hosts)]
  return "\n".join(lines) + "\n"


def own_namespaces(listing: str) -> list[str]:
  """Namespaces of ours (any run) in the output of `ip netns list`."""
  names = [line.split()[0] for line in listing.splitlines() if line.strip()]
  return [n for n in names if _OWN_NS.match(n)]


def teardown(
  namespaces: Sequence[str],
  runner: Runner = run_command,
  etc_netns: str = "/etc/netns",
  log=None,
  kill: Callable[[int, int], None] = os.kill,
) -> list[str]:
  """Kills every process in the namespaces, deletes them and their files.

  Never raises; returns the problems it met (empty if all went well).
  Only namespaces named by ``_OWN_NS`` are touched.
  """
  problems = []
  for ns in namespaces:
    if not _OWN_NS.match(ns):
      problems.append(f"refusing to touch foreign namespace {ns!r}")
      continue
    try:
      pids = runner(["ip", "netns", "pids", ns], False).stdout.split()
      for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
          kill(int(pid), signal.SIGKILL)
      proc = runner(["ip", "netns", "del", ns], False)
      if proc.returncode != 0 and "No such file" not in (proc.stderr or ""):
        problems.append(f"ip netns del {ns}: {proc.stderr.strip()}")
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"{ns}: {e!r}")
    path = os.path.join(etc_netns, ns)
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
  if log is not None and problems:
    log.write("[cluster] teardown problems: " + "; ".join(problems) + "\n")
  return problems


class Cluster:
  """An emulated cluster; use as a context manager (always torn down)."""

  def __init__(
    self,
    spec: ClusterSpec,
    *,
    runner: Runner = run_command,
    etc_netns: str = "/etc/netns",
    hostname: str | None = None,
    log=None,
    kill: Callable[[int, int], None] = os.kill,
  ):
    self.spec = spec
    self.runner = runner
    self.etc_netns = etc_netns
    self.hostname = hostname or socket.gethostname()
    self.log = log or sys.stderr
    self.kill = kill
    self.rate: float | None = None
    self.closed = False

  def __enter__(self):
    try:
      self.build()
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc):
    self.close()

  def build(self):
    self._made_etc_netns = not os.path.isdir(self.etc_netns)
    for argv in setup_commands(self.spec):
      self.runner(argv, True)
    for i in range(self.spec.num_hosts):
      d = os.path.join(self.etc_netns, self.spec.host(i))
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, "hosts"), "w") as f:
        f.write(hosts_file(self.spec, i, self.hostname))

  def set_rate(self, rate: float | None, **tbf_kwargs):
    for argv, check in rate_commands(self.spec, rate, **tbf_kwargs):
      self.runner(argv, check)
    self.rate = rate

  def exec_argv(self, i: int) -> list[str]:
    """Prefix that runs a command inside host i's namespace."""
    return ["ip", "netns", "exec", self.spec.host(i)]

  def close(self) -> list[str]:
    if self.closed:
      return []
    self.closed = True
    problems = teardown(
      self.spec.namespaces, self.runner, self.etc_netns, self.log, self.kill
    )
    if getattr(self, "_made_etc_netns", False):
      # only if we created it and it is empty again
      with contextlib.suppress(OSError):
        os.rmdir(self.etc_netns)
    return problems


class _Interrupted(KeyboardInterrupt):
  pass


def install_signal_handlers(timeout_seconds: float | None = None):
  """SIGTERM/SIGHUP (and SIGALRM after ``timeout_seconds``) raise in the
  main thread, so ``finally`` blocks tear the cluster down."""

  def handler(signum, frame):
    del frame
    raise _Interrupted(f"signal {signal.Signals(signum).name}")

  for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
    signal.signal(sig, handler)
  if timeout_seconds:
    signal.alarm(int(timeout_seconds))


class WorkerError(RuntimeError):
  pass


class Workers:
  """One process per host namespace, talking a line protocol.

  Workers print ``@@ {json}`` lines (other output goes to ``log`` with a
  ``[rank]`` prefix) and read JSON commands from stdin.
  """

  def __init__(
    self,
    cluster: Cluster,
    argv: Sequence[str],
    *,
    env: dict | None = None,
    log=None,
    nice: int = 0,
    popen=subprocess.Popen,
  ):
    self.cluster = cluster
    # A negative nice value (root only) keeps other jobs on a shared
    # machine from setting the pace of a timing run.
    self.argv = (["nice", "-n", str(nice)] if nice else []) + list(argv)
    self.env = env or {}
    self.log = log or sys.stderr
    self.popen = popen
    self.procs = []
    self.lines = queue.Queue()
    self.tails = {}

  def command(self, rank: int) -> tuple[list[str], dict]:
    spec = self.cluster.spec
    env = dict(os.environ, **self.env)
    env.update(
      {
        "GQSGD_COORDINATOR": spec.coordinator(),
        "GQSGD_NUM_PROCESSES": str(spec.num_hosts),
        "GQSGD_PROCESS_ID": str(rank),
        "GQSGD_LOCAL_DEVICES": "1",
        "PYTHONUNBUFFERED": "1",
      }
    )
    return self.cluster.exec_argv(rank) + self.argv, env

  def start(self):
    for rank in range(self.cluster.spec.num_hosts):
      argv, env = self.command(rank)
      proc = self.popen(
        argv,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
      )
      self.procs.append(proc)
      self.tails[rank] = []
      threading.Thread(
        target=self._pump, args=(rank, proc.stdout), daemon=True
      ).start()

  def _pump(self, rank, stream):
    for line in iter(stream.readline, ""):
      if line.startswith(LINE_TAG):
        self.lines.put((rank, json.loads(line[len(LINE_TAG) :])))
      else:
        tail = self.tails[rank]
        tail.append(line.rstrip())
        del tail[:-40]
        self.log.write(f"[{rank}] {line}")
        self.log.flush()
    self.lines.put((rank, None))  # end of output

  def send(self, message: dict):
    text = json.dumps(message) + "\n"
    for proc in self.procs:
      proc.stdin.write(text)
      proc.stdin.flush()

  def expect(self, tag: str, timeout: float) -> dict:
    """Waits for one ``tag`` message from every rank: {rank: message}."""
    got = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(self.procs):
      left = deadline - time.monotonic()
      if left <= 0:
        missing = sorted(set(range(len(self.procs))) - set(got))
        raise WorkerError(
          f"timed out after {timeout:.0f} s waiting for "
          f"'{tag}' from ranks {missing}"
        )
      try:
        rank, msg = self.lines.get(timeout=min(left, 1.0))
      except queue.Empty:
        continue
      if msg is None:
        code = self.procs[rank].wait()
        tail = "\n".join(self.tails[rank][-15:])
        raise WorkerError(
          f"worker {rank} exited with code {code} while "
          f"waiting for '{tag}'; last output:\n{tail}"
        )
      if msg.get("tag") == "error":
        raise WorkerError(f"worker {rank}: {msg.get('message')}")
      if msg.get("tag") == tag:
        got[rank] = msg
    return got

  def stop(self, grace: float = 10.0):
    for proc in self.procs:
      with contextlib.suppress(OSError, ValueError):
        proc.stdin.close()
    deadline = time.monotonic() + grace
    for proc in self.procs:
      with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in self.procs:
      if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--cleanup",
    action="store_true",
    help="remove namespaces left by killed runs",
  )
  parser.add_argument(
    "--list", action="store_true", help="list namespaces of this harness"
  )
  args = parser.parse_args()
  problem = root_problem()
  if problem:
    print(f"skipped: {problem}")
    return
  names = own_namespaces(run_command(["ip", "netns", "list"], False).stdout)
  if args.cleanup:
    problems = teardown(names, log=sys.stderr)
    print(
      f"removed {len(names) - len(problems)} namespaces"
      + (f"; problems: {problems}" if problems else "")
    )
  else:
    print("\n".join(names) or "no namespaces of this harness")


if __name__ == "__main__":
  main()
