"""``fluid-mpi bench cluster``: the paper's comparison over TCP between the hosts of the virtual
cluster (network namespaces on this one machine, see docs/vcluster.md), for several links (tbf rate
shaping; netem delay/loss is not in this kernel) and compute speeds (CFS quota per host).

One rank per host (node1..nodeK), mpirun inside ``head`` through the vcluster's launch agent, with
``--map-by node --mca btl tcp,self --mca coll ^han``. Every run's bytes on the wire between the ranks'
hosts are measured from the switch ports' counters (``ip -s link`` in the switch namespace) before and
after the run, not computed: the sum of what the nodes sent, minus what ``head`` received (mpirun's own
traffic). Settings run one after the other; within a setting the repetitions go round-robin over the
scenarios, and every ratio is taken within that setting."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..vcluster import emulator as vcluster
from ..vcluster.links import CMD_TIMEOUT
from ..model import data
from ..cluster.mpirun import find_mpirun, mpi_env

# its own vcluster instance, never the user's (fmpi) nor test_vcluster's (t<pid>); $FLUID_MPI_BENCH_VCLUSTER
# overrides it (test_bench does, so that a test never touches a bench running beside it)
VC_NAME = "fmbench"
# (link label, tbf rate or None, CPUs per host or None = full speed); Pi-class compute with Pi 3 Ethernet last
SETTINGS = [("unshaped", None, None), ("1 Gbit/s", "1gbit", None), ("100 Mbit/s", "100mbit", None),
            ("unshaped", None, 0.5), ("unshaped", None, 0.25), ("100 Mbit/s", "100mbit", 0.25)]
QUICK_SETTINGS = [("unshaped", None, None), ("100 Mbit/s", "100mbit", 0.5)]
# Wall-time budgets of `bench cluster` (its own line in the goals table), measured × 1.5: the full one (6
# settings × 3 repetitions × 5 rows = 90 mpiruns) took 666 s (wall_s; 13 min 47 s with the training of the three
# checkpoints) with the machine's load at 6-7; --quick (2 settings × 5 rows, 1,000 inputs at full
# speed) took 48.6 s and 43.3 s with the load at 3-5. test_bench asserts the quick bound.
CLUSTER_BUDGET_S = 1000.0
CLUSTER_QUICK_BUDGET_S = 75.0
# One run across the namespaces: start-up (torch import at 0.25 CPU: ~10 s) + a few seconds of inputs;
# a run cut at this bound is recorded with returncode None
CLUSTER_RUN_TIMEOUT_S = 180.0


def scenarios(ckpts: dict[str, Path], k: int) -> list[tuple[str, str, list[str]]]:
    st, dy, fl = (["-c", str(Path(ckpts[f]).resolve())] for f in ("static", "dynamic", "fluid"))
    return [("static", "split", st), ("dynamic", f"width {k}", dy), ("dynamic", "width 1", dy + ["--width", "1"]),
            ("fluid", "HT", fl + ["--mode", "ht"]), ("fluid", "HA", fl + ["--mode", "ha"])]


def port_bytes(vc: vcluster.VCluster) -> dict[str, tuple[int, int]]:
    """Per host, (bytes it sent, bytes it received), from its switch port (rx of the port = sent by the host)."""
    out = subprocess.run(["ip", "-n", vc.switch, "-s", "-j", "link", "show"], capture_output=True, text=True,
                         timeout=CMD_TIMEOUT, check=True).stdout
    by_port = {link["ifname"]: link["stats64"] for link in json.loads(out) if "stats64" in link}
    return {h: (by_port[vc.veth(h)]["rx"]["bytes"], by_port[vc.veth(h)]["tx"]["bytes"])
            for h in vcluster.hosts(vc.name, include_head=True) if vc.veth(h) in by_port}


def throttling(vc: vcluster.VCluster) -> tuple[int, int]:
    """(CFS periods, periods throttled) summed over the ranks' hosts (cgroup v1 ``cpu.stat``): whether a
    ``--cpus`` quota actually bound, or the machine's other load kept the ranks below it anyway."""
    periods = throttled = 0
    for host in vcluster.hosts(vc.name):
        with contextlib.suppress(OSError):
            stat = dict(line.split() for line in (vc.cgroup("cpu", host) / "cpu.stat").read_text().splitlines())
            periods, throttled = periods + int(stat["nr_periods"]), throttled + int(stat["nr_throttled"])
    return periods, throttled


def run_on_cluster(vc: vcluster.VCluster, k: int, hostfile: Path, args: list[str], out_dir: Path, name: str,
                   timeout: float) -> tuple[int | None, dict | None, int, str]:
    """``mpirun`` inside ``head`` over TCP, one rank per node; returns (exit code or None when cut at
    ``timeout``, the summary, bytes sent between the ranks' hosts during the run, the end of stderr)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, preds, events = (out_dir / f"{name}{ext}" for ext in (".json", ".jsonl", ".events.jsonl"))
    for stale in (summary, preds, events):
        stale.unlink(missing_ok=True)
    cmd = [find_mpirun(), "--hostfile", str(hostfile), "-np", str(k), "--map-by", "node", "--mca", "btl",
           "tcp,self", "--mca", "coll", "^han", "--with-ft", "ulfm", sys.executable, "-m", "fluid_mpi.cli", "infer",
           *args, "--summary", str(summary), "--predictions", str(preds), "--events", str(events), "-q"]
    before = port_bytes(vc)
    proc = subprocess.Popen([vcluster.agent_path(vc.name), vcluster.HEAD, shlex.join(cmd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=vcluster.mpirun_env(mpi_env(), vc.name),
                            start_new_session=True, cwd=str(Path.cwd()))
    try:
        err = proc.communicate(timeout=timeout)[1]
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for host in vcluster.hosts(vc.name):  # the ranks and daemons left on the nodes
            for pid in vc.pids(host):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        err = proc.communicate()[1] + f"\n(cut at {timeout:g} s)"
        rc = None
    after = port_bytes(vc)
    sent = sum(after[h][0] - before[h][0] for h in after if h != vcluster.HEAD)
    to_head = after[vcluster.HEAD][1] - before[vcluster.HEAD][1] if vcluster.HEAD in after else 0
    s = json.loads(summary.read_text()) if summary.exists() else None
    (out_dir / f"{name}.stderr").write_text(err)
    return rc, s, max(0, sent - to_head), " ".join(err.strip().splitlines()[-2:])[-300:]


def run_cluster(cfg, ckpts: dict[str, Path], bar) -> dict:
    """Every setting's rows; the vcluster is always taken down at the end."""
    k, quick = cfg.parts, cfg.quick
    settings, reps = (QUICK_SETTINGS, 1) if quick else (SETTINGS, cfg.cluster_reps)
    probe = cfg.cluster_probe_images
    data_args = ["--data-dir", str(Path(cfg.data_dir).resolve())] if cfg.data_dir else []
    n_test = len(data.load_split(cfg.data_dir, "test"))
    out_dir, t0 = (cfg.out / "cluster").resolve(), time.perf_counter()
    hostfile = out_dir / "hosts"
    out_dir.mkdir(parents=True, exist_ok=True)
    vc = vcluster.VCluster(os.environ.get("FLUID_MPI_BENCH_VCLUSTER") or VC_NAME)
    result = {"reps": reps, "probe_images": probe, "window_s": cfg.window_s, "batch": 64, "settings": [],
              "budget_s": CLUSTER_QUICK_BUDGET_S if quick else CLUSTER_BUDGET_S}
    scen = scenarios(ckpts, k)
    try:
        vc.up(k, str(hostfile), head=True)
        for link, rate, cpus in settings:
            vc.shape(None, rate=rate)  # rate None: no shaping
            for host in vcluster.hosts(vc.name):  # the ranks' hosts; head only runs mpirun
                vc.slow(host, cpus or 0)
            got, images, load, cfs = {}, {}, [], throttling(vc)
            for rep in range(reps):
                load.append(round(os.getloadavg()[0], 2))
                start = rep % len(scen)
                for family, variant, args in scen[start:] + scen[:start]:
                    bar.set_description(f"cluster {link}, {cpus or 'full'} CPU: {family} {variant} ({rep + 1}/{reps})")
                    n = images.get((family, variant), math.ceil(probe * (cpus or 1)))
                    limit = ["--limit", str(min(n, n_test))] + (["--repeat", str(math.ceil(n / n_test))]
                                                                if n > n_test else [])
                    rc, s, wire, err = run_on_cluster(vc, k, hostfile, args + data_args + ["-b", "64"] + limit, out_dir,
                                                 f"{family}-{variant}".replace(" ", ""), CLUSTER_RUN_TIMEOUT_S)
                    s = s or {}
                    got.setdefault((family, variant), []).append((s, rc, wire, err))
                    rate_ = s.get("images_per_s") or 0
                    if rep == 0 and reps > 1 and rate_:  # later repetitions last about window_s
                        images[(family, variant)] = max(n, min(cfg.max_images, int(cfg.window_s * rate_)))
                    bar.update(1)
            periods, throttled = (a - b for a, b in zip(throttling(vc), cfs))
            result["settings"].append({**_setting(link, rate, cpus, got, k), "load_avg": load,
                                       "throttled": round(throttled / periods, 3) if cpus and periods else None})
    finally:
        vc.down()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def _setting(link: str, rate: str | None, cpus: float | None, got: dict, k: int) -> dict:
    rows = []
    for (family, variant), runs in got.items():
        rates = [s.get("images_per_s") or 0.0 for s, _, _, _ in runs]
        per_image = [w / s["answered"] for s, _, w, _ in runs if s.get("answered")]
        rows.append({"family": family, "variant": variant, "images_per_s": statistics.median(rates),
                     "min": min(rates), "max": max(rates), "runs": rates, "returncodes": [rc for _, rc, _, _ in runs],
                     "images": [s.get("answered") for s, _, _, _ in runs],
                     "errors": [e for s, rc, _, e in runs if rc != 0 or s.get("status") != "ok"],
                     "bytes_per_image": round(statistics.median(per_image), 1) if per_image else None,
                     "latency_ms": (runs[-1][0].get("latency_ms") or {}),
                     "status": next((s.get("status", "no summary") for s, _, _, _ in runs
                                     if s.get("status") != "ok"), "ok")})
    tp = {(r["family"], r["variant"]): r for r in rows}
    ht = tp[("fluid", "HT")]["runs"]
    dyn = [max(a, b) for a, b in zip(tp[("dynamic", f"width {k}")]["runs"], tp[("dynamic", "width 1")]["runs"])]
    ratio = lambda a, b: round(a / max(b, 1e-9), 3)  # noqa: E731
    q = {"fluid_ht_over_static": ratio(tp[("fluid", "HT")]["images_per_s"], tp[("static", "split")]["images_per_s"]),
         "fluid_ht_over_dynamic_best": ratio(tp[("fluid", "HT")]["images_per_s"], max(
             tp[("dynamic", f"width {k}")]["images_per_s"], tp[("dynamic", "width 1")]["images_per_s"])),
         "fluid_ht_over_static_min": min(ratio(h, s) for h, s in zip(ht, tp[("static", "split")]["runs"])),
         "fluid_ht_over_dynamic_best_min": min(ratio(h, d) for h, d in zip(ht, dyn))}
    return {"link": link, "rate": rate, "cpus": cpus, "rows": rows, "ratios": q}


def merge_into_report(cluster: dict, out: Path) -> bool:
    """Put the cluster figures into ``out/results.json`` (when the main bench wrote one) and rewrite the
    report; also keep them in ``out/cluster.json``, which the main bench picks up when run later."""
    (out / "cluster.json").write_text(json.dumps(cluster, indent=2) + "\n")
    main = out / "results.json"
    if not main.exists():
        return False
    from .report import write_report

    r = json.loads(main.read_text())
    r["cluster"] = cluster
    write_report(r, out)
    return True
