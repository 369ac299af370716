"""Several processes (or Macs) as one: hosts files, MLX ring groups, launching and guarded comms.

We use MLX's own distributed layer (`mx.distributed`, ring backend over TCP) and its launcher
(`mlx.launch`); nothing here speaks a protocol of its own. This module knows:

- the hosts file (`load_hosts`): JSON, either a list of hosts or `{"backend": "ring", "envs": [...],
  "hosts": [...]}` — the same shape `mlx.launch --hostfile` reads, with optional keys of ours.
  A host is `{"ssh": "mac-studio.local", "ips": ["10.0.0.2"], "models_dir": "/Users/me/models",
  "memory_gb": 192, "python": "/Users/me/latent/.venv/bin/python"}`; `"host"` is accepted for
  `"ssh"`, `ips` defaults to `[ssh]` when that is an IP address. `memory_gb` (default: equal)
  sets each host's share of a pipeline's layers.
- `init_group()`: the world group when this process was launched as one rank of a job (env
  `MLX_RANK` + `MLX_HOSTFILE`, as `mlx.launch` sets them), else None (one process).
- `launch(hosts, argv)` runs `python argv...` once per host through `mlx.launch`;
  `spawn_local(n, argv)` starts n ranks on 127.0.0.1 directly (tests, benchmarks).
- `guard(seconds, what)`: a watchdog around a blocking collective. MLX's ring raises
  "connection to a peer was lost" when a peer's socket closes; a peer that hangs (or a host that
  vanishes without closing its socket) would block forever, so after `seconds` the process prints
  one `error:` line and exits with `EXIT_PEER_LOST`.
- small collectives on top of send/recv/all_sum: `broadcast_tree`, `broadcast_json`,
  `all_sum_tree`, and `ring_allreduce_bytes` (what a ring all-reduce moves per rank).
- `DataParallel(group)`: what the trainer calls to shard batches, sum gradients and agree.

It does not know models, training loops or front ends (engine/pipeline.py, engine/train/ use it).
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from engine.errors import LatentError

EXIT_PEER_LOST = 75  # a rank stopped because another one died or hung
LOCAL_HOSTS = ("127.0.0.1", "localhost")


class DistributedError(LatentError):
    """A hosts file is malformed, or a distributed job cannot start or continue."""


# --- hosts file ---------------------------------------------------------------------------------


@dataclass
class Host:
    ssh: str
    ips: list[str] = field(default_factory=list)
    models_dir: str | None = None
    memory_gb: float | None = None
    python: str | None = None

    @property
    def is_local(self) -> bool:
        return self.ssh in LOCAL_HOSTS


@dataclass
class Hosts:
    hosts: list[Host]
    backend: str = "ring"
    envs: list[str] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.hosts)

    def shares(self) -> list[float]:
        """Each host's fraction of the work: by `memory_gb` when every host gives it, else equal."""
        mem = [h.memory_gb for h in self.hosts]
        if all(m for m in mem):
            total = sum(mem)  # type: ignore[arg-type]
            return [m / total for m in mem]  # type: ignore[operator]
        return [1.0 / len(self.hosts)] * len(self.hosts)

    def to_mlx(self) -> dict[str, Any]:
        """The dict `mlx.launch --hostfile` reads (extra keys of ours dropped)."""
        return {
            "backend": self.backend,
            "envs": list(self.envs),
            "hosts": [{"ssh": h.ssh, "ips": h.ips} for h in self.hosts],
        }


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def parse_hosts(data: Any, where: str = "hosts file") -> Hosts:
    """Validate a hosts structure (see the module docstring); DistributedError names the fault."""
    backend, envs = "ring", []
    if isinstance(data, dict):
        if "hosts" not in data:
            raise DistributedError(f"{where}: no 'hosts' list")
        backend = data.get("backend") or "ring"
        envs = data.get("envs") or []
        entries = data["hosts"]
    else:
        entries = data
    if not isinstance(entries, list) or not entries:
        raise DistributedError(f"{where}: 'hosts' must be a non-empty list")
    if backend != "ring":
        raise DistributedError(f"{where}: backend {backend!r} is not supported; use 'ring'")
    if not isinstance(envs, list) or not all(isinstance(e, str) and "=" in e for e in envs):
        raise DistributedError(f"{where}: 'envs' must be a list of 'NAME=value' strings")
    hosts = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"ssh": e}
        if not isinstance(e, dict):
            raise DistributedError(f"{where}: host #{i} is not an object")
        name = e.get("ssh") or e.get("host")
        if not isinstance(name, str) or not name:
            raise DistributedError(f"{where}: host #{i} has no 'ssh' (or 'host') name")
        ips = e.get("ips")
        if ips is None:
            ips = [name] if _is_ip(name) else (["127.0.0.1"] if name == "localhost" else [])
        if not isinstance(ips, list) or not all(isinstance(x, str) and _is_ip(x) for x in ips):
            raise DistributedError(
                f"{where}: host #{i} ({name}): 'ips' must be a list of IP addresses"
            )
        if not ips:
            raise DistributedError(
                f"{where}: host #{i} ({name}): the ring backend needs its IP address ('ips')"
            )
        mem = e.get("memory_gb")
        if mem is not None and (
            isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0
        ):
            raise DistributedError(
                f"{where}: host #{i} ({name}): memory_gb={mem!r} is not a positive number"
            )
        hosts.append(Host(name, ips, e.get("models_dir"), mem, e.get("python")))
    return Hosts(hosts, backend, envs)


def load_hosts(path: str | os.PathLike) -> Hosts:
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise DistributedError(f"{p}: cannot read hosts file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DistributedError(f"{p}: not JSON (line {e.lineno}: {e.msg})") from None
    hosts = parse_hosts(data, str(p))
    hosts.path = p
    return hosts


# --- groups and launching -----------------------------------------------------------------------


def in_job() -> bool:
    """True when this process is one rank of a launched job."""
    return "MLX_RANK" in os.environ and bool(os.environ.get("MLX_HOSTFILE"))


def init_group() -> mx.distributed.Group | None:
    """The ring group of this job (None when not launched as a rank, or a job of one)."""
    if not in_job():
        return None
    try:
        group = mx.distributed.init(strict=True, backend="ring")
    except RuntimeError as e:
        raise DistributedError(f"cannot join the ring ({str(e).splitlines()[0]})") from None
    return group if group.size() > 1 else None


def free_ports(n: int) -> list[int]:
    """n TCP ports on 127.0.0.1 that were free a moment ago."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ring_file(n: int, folder: str | os.PathLike | None = None) -> Path:
    """A ring address file (what `mlx.launch` hands each rank as MLX_HOSTFILE) for n local ranks."""
    addrs = [[f"127.0.0.1:{p}"] for p in free_ports(n)]
    fd, name = tempfile.mkstemp(prefix="latent-ring-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(addrs, f)
    return Path(name)


def spawn_local(
    n: int, argv: list[str], env: dict[str, str] | None = None, **popen: Any
) -> list[subprocess.Popen]:
    """Start `python argv...` as ranks 0..n-1 of one ring on 127.0.0.1; returns the processes."""
    ring = ring_file(n)
    atexit.register(ring.unlink, missing_ok=True)  # the ranks read it when they join
    procs = []
    for r in range(n):
        e = {**os.environ, **(env or {}), "MLX_RANK": str(r), "MLX_HOSTFILE": str(ring)}
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, **popen))
    return procs


def launch(hosts: Hosts, argv: list[str], python: str | None = None) -> int:
    """Run `python argv...` on every host through `mlx.launch` (ssh for remote ones); its exit code."""
    fd, name = tempfile.mkstemp(prefix="latent-hosts-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(hosts.to_mlx(), f)
    py = python or next((h.python for h in hosts.hosts if h.python), None) or sys.executable
    cmd = [
        sys.executable,
        "-c",
        "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
        "--hostfile",
        name,
        "--backend",
        "ring",
        "--python",
        py,
        "--cwd",
        os.getcwd(),
        "--starting-port",
        str(free_ports(1)[0]),
        "--",
        *argv,
    ]
    # mlx.launch exits 0 whatever its ranks did; its warnings on stderr say which one failed
    failed = False
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
        for line in proc.stderr:  # type: ignore[union-attr]
            sys.stderr.write(line)
            sys.stderr.flush()
            if "Node with rank" in line and ("exited with code" in line or "was killed" in line):
                failed = True
        code = proc.wait()
    finally:
        os.unlink(name)
    return code or (1 if failed else 0)


def relaunch_cli(hosts_file: str, argv: list[str] | None = None) -> int:
    """Re-run this `latent ...` command line as one rank per host (the `--hosts` front door)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return launch(load_hosts(hosts_file), ["-m", "app.cli", *argv])


# --- guarded collectives ------------------------------------------------------------------------


def _abort(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)


class guard:
    """`with guard(30, "rank 1's activations"): mx.eval(...)` — exit with one line if it hangs,
    and turn MLX's "peer was lost" into a DistributedError."""

    def __init__(self, seconds: float | None, what: str):
        self.seconds, self.what = seconds, what
        self._timer: threading.Timer | None = None

    def __enter__(self) -> guard:
        if self.seconds:
            rank = os.environ.get("MLX_RANK", "?")
            msg = (
                f"rank {rank}: no answer for {self.seconds:g} s while waiting for {self.what}; "
                "another process is gone or stuck, stopping"
            )
            self._timer = threading.Timer(self.seconds, _abort, (msg,))
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        if kind is RuntimeError and "[ring]" in str(value):
            rank = os.environ.get("MLX_RANK", "?")
            raise DistributedError(
                f"rank {rank}: lost the connection to another process while waiting for "
                f"{self.what} ({str(value).splitlines()[0]})"
            ) from None
        return False


def default_timeout() -> float:
    """Seconds a rank waits on a peer before giving up (LATENT_DIST_TIMEOUT, default 120)."""
    return float(os.environ.get("LATENT_DIST_TIMEOUT", "120"))


def all_sum_tree(
    tree: Any, group: mx.distributed.Group, what: str = "gradients", timeout: float | None = None
) -> Any:
    """Element-wise sum of a tree of arrays over all ranks (evaluated), under a watchdog."""
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
    # one message per dtype instead of one per tensor: the ring pipelines big buffers well
    summed: dict[str, mx.array] = {}
    for dtype in sorted({v.dtype for _, v in flat}, key=str):
        part = [(k, v) for k, v in flat if v.dtype == dtype]
        buf = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in part]), group=group)
        offsets = [0]
        for _, v in part:
            offsets.append(offsets[-1] + v.size)
        for (k, v), a, b in zip(part, offsets, offsets[1:]):
            summed[k] = buf[a:b].reshape(v.shape)
    with guard(default_timeout() if timeout is None else timeout, what):
        mx.eval(list(summed.values()))
    return tree_unflatten([(k, summed[k]) for k, _ in flat])


def broadcast_tree(
    tree: Any, group: mx.distributed.Group, root: int = 0, what: str = "weights"
) -> Any:
    """Rank `root`'s values of a tree whose structure and shapes every rank already shares."""
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])  # same order on every rank
    me = group.rank()
    layout = [[k, list(v.shape), str(v.dtype)] for k, v in flat]
    if broadcast_json(layout, group, root) != layout:
        raise DistributedError(f"rank {me}: {what} differ in layout from rank {root}'s")
    out = []
    for k, v in flat:
        v = v if me == root else mx.zeros_like(v)
        if v.dtype == mx.bool_:
            v = v.astype(mx.uint8)
        out.append((k, mx.distributed.all_sum(v, group=group).astype(dict(flat)[k].dtype)))
    with guard(default_timeout(), what):
        mx.eval([v for _, v in out])
    return tree_unflatten(out)


def broadcast_json(obj: Any, group: mx.distributed.Group, root: int = 0) -> Any:
    """Rank `root`'s JSON-able object on every rank (length, then the UTF-8 bytes)."""
    me = group.rank()
    raw = json.dumps(obj).encode() if me == root else b""
    n = mx.array([len(raw) if me == root else 0], dtype=mx.int32)
    with guard(default_timeout(), "a message from rank 0"):
        n = int(mx.distributed.all_sum(n, group=group).item())
        buf = mx.array(list(raw), dtype=mx.int32) if me == root else mx.zeros((n,), mx.int32)
        buf = mx.distributed.all_sum(buf, group=group)
        mx.eval(buf)
    return json.loads(bytes(buf.tolist()).decode())


def ring_allreduce_bytes(payload_bytes: int, n: int) -> int:
    """Bytes each rank sends in a ring all-reduce of `payload_bytes`: 2(n-1)/n of it."""
    return 0 if n <= 1 else int(2 * (n - 1) * payload_bytes // n)


# --- data-parallel training ---------------------------------------------------------------------


class DataParallel:
    """One rank's view of a data-parallel fine-tune (used by engine/train/trainer.py).

    Every rank builds the same dataset and starts from the same adapter; each step's chunks are
    split across ranks (`shard`), each rank sums its own gradients, loss and token counts, and
    `reduce` adds them up over the ring (`all_sum`), so every rank divides the same totals and
    applies the same update as one process with the whole batch. Rank 0 alone writes files.
    """

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def shard(self, batch: list) -> list:
        return batch[self.rank :: self.size]

    def reduce(self, grads: Any, like: Any, loss_sum: float, count: float, n_tokens: int):
        """(grads, loss_sum, count, n_tokens) summed over ranks; `like` shapes a rank's zero grads."""
        if grads is None:  # this rank had no chunk this step
            grads = tree_unflatten([(k, mx.zeros_like(v)) for k, v in tree_flatten(like)])
        stats = mx.array([loss_sum, count, n_tokens], dtype=mx.float32)
        grads, stats = all_sum_tree((grads, stats), self.group, "the other ranks' gradients")
        loss_sum, count, n_tokens = stats.tolist()
        return grads, loss_sum, count, int(round(n_tokens))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a cancel seen by one stops all)."""
        x = mx.distributed.all_sum(mx.array([int(bool(flag))], dtype=mx.int32), group=self.group)
        with guard(default_timeout(), "the other ranks"):
            mx.eval(x)
        return x.item() > 0

    def check_same(self, what: str, value: Any) -> None:
        """Raise on every rank whose `value` differs from rank 0's (e.g. a data fingerprint)."""
        ref = broadcast_json(value, self.group)
        bad = int(json.loads(json.dumps(value)) != ref)
        if self.any(bool(bad)):
            raise DistributedError(
                f"{what} differs between ranks (rank {self.rank}: {value}, rank 0: {ref})"
                if bad
                else f"{what} differs on another rank; every host needs the same files"
            )

    def sync(self, tree: Any, what: str) -> Any:
        return broadcast_tree(tree, self.group, 0, what)

    def share(self, obj: Any) -> Any:
        return broadcast_json(obj, self.group)
