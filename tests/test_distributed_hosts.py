"""The hosts file and `latent hosts check`, on 127.0.0.1 only.

Proves: a hosts file of ours is read by MLX's own launcher parser (`mlx.launch --hostfile`) with the
same hosts and IPs, and what we hand `mlx.launch` round-trips; malformed files fail with one line
naming the host and key; memory shares follow `memory_gb`; `latent hosts check` reports the
total memory /proc/meminfo gives, finds a model by path or by repo id under a host's
`models_dir`, says which host lacks it (exit 1), and calls a host whose Python cannot start
unreachable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.distributed import DistributedError, load_hosts, parse_hosts


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "hosts.json"
    p.write_text(json.dumps(data))
    return p


def test_mlx_launch_reads_our_hosts_file(tmp_path):
    from mlx._distributed_utils.common import Hostfile

    data = {
        "backend": "ring",
        "envs": ["OMP_NUM_THREADS=1"],
        "hosts": [
            {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "models_dir": "/tmp/m", "memory_gb": 16},
            {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "memory_gb": 48},
        ],
    }
    path = _write(tmp_path, data)
    theirs = Hostfile.from_file(str(path))
    ours = load_hosts(path)
    assert [(h.ssh_hostname, h.ips) for h in theirs.hosts] == [(h.ssh, h.ips) for h in ours.hosts]
    assert theirs.backend == ours.backend == "ring" and theirs.envs == ours.envs
    assert ours.shares() == [0.25, 0.75]
    again = _write(tmp_path, ours.to_mlx())
    assert [(h.ssh_hostname, h.ips) for h in Hostfile.from_file(str(again)).hosts] == [
        (h.ssh, h.ips) for h in ours.hosts
    ]


def test_defaults_and_aliases():
    hosts = parse_hosts([{"host": "127.0.0.1"}, "localhost"])
    assert [(h.ssh, h.ips, h.is_local) for h in hosts.hosts] == [
        ("127.0.0.1", ["127.0.0.1"], True),
        ("localhost", ["127.0.0.1"], True),
    ]
    assert hosts.shares() == [0.5, 0.5]  # no memory_gb: equal


@pytest.mark.parametrize(
    "data,words",
    [
        ({"hosts": []}, "non-empty list"),
        ({"nodes": []}, "no 'hosts'"),
        ([{"ssh": "mac-studio.local"}], "host #0 (mac-studio.local)"),
        ([{"ssh": "127.0.0.1", "ips": ["not-an-ip"]}], "'ips' must be a list of IP addresses"),
        ([{"ssh": "127.0.0.1", "memory_gb": -3}], "memory_gb=-3"),
        ([{"ips": ["127.0.0.1"]}], "host #0 has no 'ssh'"),
        ({"backend": "mpi", "hosts": ["127.0.0.1"]}, "backend 'mpi'"),
    ],
)
def test_malformed_hosts_files(data, words):
    with pytest.raises(DistributedError) as e:
        parse_hosts(data, "h.json")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_not_json(tmp_path):
    p = tmp_path / "h.json"
    p.write_text("{hosts: [")
    with pytest.raises(DistributedError, match="not JSON"):
        load_hosts(p)


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError


@pytest.fixture
def model_dirs(tmp_path):
    models = tmp_path / "models"
    folder = models / "acme" / "tiny"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    empty = tmp_path / "empty"
    empty.mkdir()
    return models, empty


def test_hosts_check_local(tmp_path, model_dirs, capsys):
    from app.cli import main

    models, empty = model_dirs
    path = _write(
        tmp_path,
        {
            "hosts": [
                {"ssh": "127.0.0.1", "models_dir": str(models), "memory_gb": 8},
                {"ssh": "127.0.0.1", "models_dir": str(empty), "memory_gb": 24},
            ]
        },
    )
    assert main(["hosts", "check", "--hosts", str(path), "--model", "acme/tiny", "--json"]) == 1
    reps = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["reachable"] for r in reps] == [True, True]
    assert reps[0]["memory_total"] == _meminfo_total()
    assert reps[0]["model"]["path"] == str(models / "acme" / "tiny")
    assert reps[0]["model"]["bytes"] == 4096 + 2 and reps[0]["problems"] == []
    assert reps[1]["model"]["path"] is None
    assert (
        "model acme/tiny not found" in reps[1]["problems"][0]
        and str(empty) in reps[1]["problems"][0]
    )
    assert [r["share"] for r in reps] == [0.25, 0.75]

    # by path every host finds it; the table says all ready
    folder = models / "acme" / "tiny"
    assert main(["hosts", "check", "--hosts", str(path), "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "all hosts ready" in out and out.count(str(folder)) == 2


def test_unreachable_host(tmp_path, capsys):
    from app.cli import main

    path = _write(tmp_path, [{"ssh": "127.0.0.1", "python": str(tmp_path / "no-python")}])
    assert main(["hosts", "check", "--hosts", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "unreachable" in out
