#!/usr/bin/env bash
# A one-node Slurm on this machine, for testing jobs/*.sbatch for real (Debian's slurm-wlm + munge).
#   bash scripts/slurm-local.sh start   # install if needed (root, apt), configure, start, wait until idle
#   bash scripts/slurm-local.sh stop
# Exits non-zero with one line when Slurm cannot be had here; tests then skip with that reason.
set -euo pipefail
action=${1:-start}
host=$(hostname -s)
conf=/etc/slurm/slurm.conf

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
}

if [ "$action" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "slurm-local: slurmctld/slurmd/munge not installed and cannot install them (need root and apt)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null; }
fi

# munge: a key, then the daemon as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key 2>/dev/null || true
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
pgrep -x munged >/dev/null || runuser -u munge -- munged

cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024) - 512}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
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
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
rm -f /etc/slurm/cgroup.conf

stop
sleep 0.5
slurmctld
slurmd
for _ in $(seq 1 30); do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in idle|mixed|allocated) echo "slurm-local: node $host $state"; exit 0 ;; esac
    sleep 1
done
echo "slurm-local: Slurm did not come up (node state '${state:-none}'); see /var/log/slurm/*.log" >&2
exit 1
