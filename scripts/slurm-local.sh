#!/usr/bin/env bash
# A one-node Slurm on this machine, for testing jobs/*.sbatch for real (Debian's slurm-wlm + munge).
#   bash scripts/slurm-local.sh start   # install if needed (root, apt), configure, start, wait until idle
#   bash scripts/slurm-local.sh stop    # stop exactly what `start` started, nothing else
# Exits non-zero with one line when Slurm cannot be had here; tests then skip with that reason.
#
# Everything this script writes lives in its state directory ($FLUID_SLURM_STATE, default
# /run/fluid-mpi-slurm): slurm.conf, the daemons' pid files, spool and logs. /etc/slurm is never
# touched, so a user's own Slurm configuration stays as it is. `start` refuses (one line) when a
# slurmctld/slurmd it did not start is running; `stop` signals only the pids recorded in the state
# directory, and only while the process there still has the expected name (no pid reuse accident).
# munged is started (and later stopped) only when none is running; a running one is used, never stopped.
# On success `start` prints, as its last line, SLURM_CONF=<path>: export it for sbatch/sinfo/scancel.
set -euo pipefail
action=${1:-start}
state=${FLUID_SLURM_STATE:-/run/fluid-mpi-slurm}
conf=$state/slurm.conf
host=$(hostname -s)

# pid recorded in $state/NAME.pid if that process is alive and named NAME, else nothing
our_pid() {
    local name=$1 pid
    pid=$(cat "$state/$name.pid" 2>/dev/null || true)
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ] && echo "$pid"
    return 0
}

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        pid=$(our_pid "$name")
        if [ -n "$pid" ]; then
            kill -TERM "$pid" 2>/dev/null || true
            # daemons save their state on SIGTERM: give them 10 s (50 × 0.2 s), then SIGKILL
            for _ in $(seq 1 50); do [ -n "$(our_pid "$name")" ] || break; sleep 0.2; done
            [ -z "$(our_pid "$name")" ] || kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$state/$name.pid"
    done
}

if [ "$action" = stop ]; then stop; exit 0; fi
if [ "$action" != start ]; then echo "usage: slurm-local.sh start|stop" >&2; exit 2; fi

# a Slurm daemon we did not start (a user's cluster, or one started by hand): leave it alone
for name in slurmctld slurmd; do
    mine=$(our_pid "$name")
    for pid in $(pgrep -x "$name" || true); do
        if [ "$pid" != "$mine" ]; then
            echo "slurm-local: a $name not started by this script is running (pid $pid); not touching it" >&2
            exit 1
        fi
    done
done
stop  # ours, left over from an interrupted run: start afresh

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "slurm-local: slurmctld/slurmd/munge not installed and cannot install them (need root and apt)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null; } ||
        { echo "slurm-local: apt-get could not install slurmd slurmctld slurm-client munge" >&2; exit 1; }
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm-local: starting a local Slurm needs root (SlurmUser=root)" >&2
    exit 1
fi
mkdir -p "$state/spool/ctld" "$state/spool/d" "$state/log"

# from here on, whatever fails stops what this run started
trap 'stop' ERR

# munge: a key (the Debian package makes one; create it only if missing), then the daemon as the munge user
if ! pgrep -x munged >/dev/null; then
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    runuser -u munge -- munged
    pgrep -x -n munged > "$state/munged.pid"
fi

cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024) - 512}' /proc/meminfo)
cat > "$conf" <<CONF
# written by fluid-mpi scripts/slurm-local.sh: a one-node test cluster
ClusterName=fluidtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF=$conf
slurmctld -f "$conf"
slurmd -f "$conf"
# the node registers within a few seconds; 30 s (30 × 1 s) is ample on a loaded 2-core machine
for _ in $(seq 1 30); do
    node_state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
    case "$node_state" in
        idle|mixed|allocated) echo "slurm-local: node $host $node_state"; echo "SLURM_CONF=$conf"; exit 0 ;;
    esac
    sleep 1
done
stop
echo "slurm-local: Slurm did not come up (node state '${node_state:-none}'); see $state/log/*.log" >&2
exit 1
