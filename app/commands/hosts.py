"""`latent hosts check --hosts FILE [--model M]`: is every machine of a distributed job ready?

For each host of the hosts file (format: engine/distributed.py) it runs one small probe program
with that host's Python — directly for 127.0.0.1/localhost, through `ssh` (batch mode, 5 s connect
timeout) otherwise — which reports: reachable, Python and MLX versions, total and available
memory, whether the host's ring IPs belong to it, and whether the model's files are there (a
path, or a repo id under the host's `models_dir` or Hugging Face cache). Exit code 0 when every
host is ready. It never copies models; it says which host lacks them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

# Runs on each host with only the standard library (MLX/engine optional): prints one JSON line.
PROBE = r"""
import json, os, platform, socket, sys
from pathlib import Path
a = json.loads(sys.argv[1])
out = {"hostname": socket.gethostname(), "python": sys.version.split()[0], "platform": platform.system()}
try:
    import mlx.core as mx
    out["mlx"] = mx.__version__
except Exception:
    out["mlx"] = None
total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
avail = None
try:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
except OSError:
    try:
        import subprocess
        vm = subprocess.run(["vm_stat"], capture_output=True, text=True).stdout
        page = int(vm.split("page size of ")[1].split()[0])
        pages = {l.split(":")[0]: int(l.split(":")[1].strip(" .")) for l in vm.splitlines()[1:] if ":" in l}
        avail = page * (pages.get("Pages free", 0) + pages.get("Pages inactive", 0))
    except Exception:
        pass
out["memory_total"], out["memory_available"] = total, avail
ips = {}
for ip in a["ips"]:
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    try:
        s.bind((ip, 0)); ips[ip] = True
    except OSError:
        ips[ip] = False
    finally:
        s.close()
out["ips"] = ips
models_dir = a.get("models_dir")
if not models_dir:
    try:
        from engine.paths import models_dir as md
        models_dir = str(md())
    except Exception:
        home = Path(os.environ.get("LATENT_HOME") or Path.home() / ".local/share/latent-studio")
        models_dir = str(home / "models")
out["models_dir"] = models_dir
m = a.get("model")
if m:
    cands = [Path(m).expanduser()]
    if "/" in m and not Path(m).expanduser().is_absolute():
        org, name = m.split("/", 1)
        root = Path(models_dir).expanduser()
        cands += [root / org / name, root / (org + "--" + name), root / name, root / (name + "-GGUF"),
                  root / org / (name + "-GGUF")]
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface") / "hub")
        cands += sorted((hub / ("models--" + org + "--" + name) / "snapshots").glob("*"))
    found = None
    for c in cands:
        if c.is_file() and c.suffix == ".gguf":
            found = c
        elif c.is_dir() and ((c / "config.json").exists() and any(c.glob("*.safetensors")) or any(c.glob("*.gguf"))):
            found = c
        if found:
            break
    size = 0
    if found:
        files = [found] if found.is_file() else [f for f in found.iterdir() if f.is_file()]
        size = sum(f.stat().st_size for f in files)
    out["model"] = {"name": m, "path": str(found) if found else None, "bytes": size}
print(json.dumps(out))
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "hosts", help="check the machines of a distributed (multi-Mac) set-up"
    )
    sub = p.add_subparsers(dest="hosts_command", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="reachable? memory? model files present?")
    c.add_argument("--hosts", required=True, metavar="FILE", help="hosts file (JSON, see README)")
    c.add_argument("--model", "-m", help="a model folder/file path or repo id every host needs")
    c.add_argument("--json", action="store_true", help="print one JSON object per host")
    c.set_defaults(func=run_check)


def probe_host(host, model: str | None, timeout: float = 30.0) -> dict:
    """Run the probe on one host; {"reachable": False, "error": ...} when it cannot be run."""
    args = json.dumps({"ips": host.ips, "models_dir": host.models_dir, "model": model})
    if host.is_local:
        cmd = [host.python or sys.executable, "-c", PROBE, args]
    else:
        remote = shlex.join([host.python or "python3", "-c", PROBE, args])
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host.ssh, remote]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"host": host.ssh, "reachable": False, "error": str(e).splitlines()[0]}
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return {"host": host.ssh, "reachable": False, "error": why}
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"host": host.ssh, "reachable": False, "error": "the probe printed no report"}
    return {"host": host.ssh, "reachable": True, **info}


def _gb(n: int | None) -> str:
    return f"{n / 2**30:.1f}" if n else "?"


def host_problems(rep: dict, model: str | None) -> list[str]:
    if not rep["reachable"]:
        return [f"unreachable ({rep.get('error')})"]
    out = []
    if not rep.get("mlx"):
        out.append("MLX is not installed for this Python")
    bad = [ip for ip, ok in rep.get("ips", {}).items() if not ok]
    if bad:
        out.append(f"IP {', '.join(bad)} is not an address of this host")
    if model and not (rep.get("model") or {}).get("path"):
        out.append(
            f"model {model} not found (models_dir {rep.get('models_dir')}); copy or download it there"
        )
    return out


def run_check(args: argparse.Namespace) -> int:
    from engine.distributed import load_hosts

    hosts = load_hosts(args.hosts)
    shares = hosts.shares()
    ok = True
    if not args.json:
        print(
            f"{'rank':<5}{'host':<22}{'reachable':<11}{'memory GB free/total':<22}{'mlx':<9}{'share':<7}model"
        )
    for rank, (host, share) in enumerate(zip(hosts.hosts, shares)):
        rep = probe_host(host, args.model)
        problems = host_problems(rep, args.model)
        ok &= not problems
        rep.update(rank=rank, share=share, problems=problems)
        if args.json:
            print(json.dumps(rep))
            continue
        model = (rep.get("model") or {}) if rep["reachable"] else {}
        mtxt = (
            f"{model['path']} ({model['bytes'] / 2**20:.0f} MiB)"
            if model.get("path")
            else ("missing" if args.model else "-")
        )
        mem = (
            f"{_gb(rep.get('memory_available'))}/{_gb(rep.get('memory_total'))}"
            if rep["reachable"]
            else "-"
        )
        print(
            f"{rank:<5}{host.ssh:<22}{'yes' if rep['reachable'] else 'NO':<11}{mem:<22}"
            f"{rep.get('mlx') or '-':<9}{share:<7.2f}{mtxt}"
        )
        for p in problems:
            print(f"     ! {p}")
    if not args.json:
        print("all hosts ready" if ok else "some hosts are not ready (see !)")
    return 0 if ok else 1


def pipeline_engine_or_exit(model: str, hosts_file: str, adapter: str | None = None):
    """The `--hosts` path of `latent generate/chat/serve`: pipeline-parallel over the hosts.

    Not yet a rank: re-run this command line on every host through `mlx.launch`, then exit with
    its code. Rank 0: an `Engine` on this rank's stage (the others stop when this process exits).
    Other ranks: serve forward passes until rank 0 is done, then exit.
    """
    import atexit

    from engine.distributed import DistributedError, in_job, init_group, load_hosts, relaunch_cli
    from engine.pipeline import load_stage
    from engine.session import Engine

    if adapter:
        raise DistributedError(
            "--adapter is not supported with --hosts yet (fuse it: latent finetune --export)"
        )
    if not in_job():
        sys.exit(relaunch_cli(hosts_file))
    group = init_group()
    if group is None:
        raise DistributedError(f"{hosts_file}: a pipeline needs at least two hosts")
    loaded = load_stage(model, group, load_hosts(hosts_file).shares())
    stage = loaded.model
    if group.rank() != 0:
        stage.serve_forever()
        sys.exit(0)
    stage.full_logits = False  # generation reads only the last position
    atexit.register(stage.close)
    print(
        f"pipeline over {group.size()} processes; rank 0 holds layers "
        f"{stage.layer_range[0]}-{stage.layer_range[1] - 1}",
        file=sys.stderr,
    )
    engine = Engine()
    engine.attach(loaded)
    engine.prefix_cache.max_entries = 1  # the workers mirror one cached conversation
    return engine
