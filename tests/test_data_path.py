"""A host that answers ssh but cannot reach the others (its data cable pulled, the launch agent still
getting in): `fluid-mpi launch` must leave it out and go on, and take it back when its data path works
again. The probe's data path check on loopback, then the real fault on a virtual cluster (root)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import namespaces_refused

from fluid_mpi.cluster.data_path import DataPathListener

PY = sys.executable
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
NAME = f"d{os.getpid() % 10**6}"


def test_probe_command_succeeds_while_listening_and_fails_after():
    listener = DataPathListener("127.0.0.1")
    try:
        assert subprocess.run(listener.probe_command(PY), timeout=10).returncode == 0
    finally:
        listener.close()
    # nothing listens on that port any more: the connection is refused, the probe says so
    assert subprocess.run(listener.probe_command(PY), capture_output=True, timeout=10).returncode != 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """node1..node3 and head for the module, torn down whatever happens."""
    refused = namespaces_refused("virtual-cluster tests", f"{NAME}-probe")
    if refused:
        pytest.skip(refused)
    if not (SHARED / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"full MNIST not found at {SHARED} (the run must last long enough to inject a fault)")
    from fluid_mpi.vcluster import fault_runs

    tmp = tmp_path_factory.mktemp("vc")
    try:
        r = fault_runs.vcl(NAME, "up", "3", "--hostfile", str(tmp / "hosts"), "--head")
        assert r.returncode == 0, r.stderr
        yield tmp
    finally:
        fault_runs.vcl(NAME, "down")


@pytest.mark.mpi
@pytest.mark.full_mnist
def test_data_cable_pulled_host_left_out_then_rejoins(cluster, ckpts):
    from fluid_mpi.vcluster import fault_runs

    vcl = lambda *a: fault_runs.vcl(NAME, *a)  # noqa: E731
    run = fault_runs.Launch(NAME, cluster, 3, ["-c", str(ckpts("fluid", 3)), "--mode", "ht", "-b", "1",
                                               "--rank-timeout", "2", "--repeat", "2"], data_dir=str(SHARED))
    t_fault = run.wait_answers(1000)
    assert vcl("cable", "node3", "down", "--data-only").returncode == 0
    # the agent still gets in: the old probe found the host alive and relaunched on it until it gave up
    assert subprocess.run([fault_runs.PY, "-m", "fluid_mpi.cli", "vcluster", "--name", NAME, "exec", "node3",
                           "--", "true"], timeout=30).returncode == 0
    next_s = run.next_answer_after(t_fault)
    assert next_s is not None and next_s < 15, next_s  # two missed data probes, then the relaunch
    relaunch = run.events_of("relaunch")[0]
    assert relaunch["hosts"] == ["node1", "node2"], relaunch
    t_back = time.time()
    assert vcl("cable", "node3", "up").returncode == 0
    code, out, err = run.finish(120)
    assert code == 0, err[-2000:]
    indices = [json.loads(line)["index"] for line in run.preds.read_text().splitlines()]
    assert sorted(indices) == list(range(20000)), "every input answered exactly once"
    lost = run.events_of("host_lost")
    assert [(e["host"], e["excluded"]) for e in lost] == [("node3", True)], lost
    rejoin = run.events_of("rejoin")
    assert rejoin and rejoin[0]["host"] == "node3" and rejoin[0]["t"] - t_back < 20, rejoin
    assert run.events_of("start")[-1]["ranks"] == 3
