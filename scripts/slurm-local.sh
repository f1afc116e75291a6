#!/usr/bin/env bash
# A Slurm on this machine, for testing jobs/*.sbatch for real (Debian's slurm-wlm + munge).
#   bash scripts/slurm-local.sh start                  # one node (this machine): install if needed (root,
#                                                      # apt), configure, start, wait until idle
#   bash scripts/slurm-local.sh start --vcluster NAME  # one slurmd per node of the virtual cluster NAME
#                                                      # (`fluid-mpi vcluster up N --head`), slurmctld in head
#   bash scripts/slurm-local.sh stop [--vcluster NAME] # stop exactly what `start` started, nothing else
# Exits non-zero with one line when Slurm cannot be had here; tests then skip with that reason.
#
# Everything this script writes lives in its state directory ($FLUID_SLURM_STATE, default
# /run/fluid-mpi-slurm, or /run/fluid-mpi-slurm-NAME on a virtual cluster): slurm.conf, the daemons' pid
# files, spool and logs. /etc/slurm is never touched, so a user's own Slurm configuration stays as it is.
# `start` refuses (one line) when a slurmctld/slurmd it did not start is running in the network namespace
# where it would start its own; `stop` signals only the pids recorded in the state directory, and only
# while the process there still has the expected name (no pid reuse accident).
# One node: munged is started (and later stopped) only when none is running; a running one is used, never
# stopped. Virtual cluster: a munged of its own (own key and socket in the state directory, named in
# slurm.conf's AuthInfo), so it neither needs nor disturbs another one; `stop` removes the state directory.
# On success `start` prints, as its last line, SLURM_CONF=<path>: export it for sbatch/sinfo/scancel (on a
# virtual cluster, run them inside a host: `fluid-mpi vcluster --name NAME exec head -- sbatch ...`; the
# cluster's addresses are routed only there).
set -euo pipefail
action=${1:-start}
vc=
if [ "${2:-}" = --vcluster ]; then vc=${3:?usage: slurm-local.sh start|stop [--vcluster NAME]}; fi
if [ "$action" != start ] && [ "$action" != stop ]; then
    echo "usage: slurm-local.sh start|stop [--vcluster NAME]" >&2; exit 2
fi
state=${FLUID_SLURM_STATE:-/run/fluid-mpi-slurm${vc:+-$vc}}
conf=$state/slurm.conf
repo=$(cd "$(dirname "$0")/.." && pwd)
fluid_mpi=${FLUID_MPI_CLI:-$repo/.venv/bin/fluid-mpi}
vc_state=/run/fluid-mpi-vcluster/$vc/state.json

# pid recorded in FILE if that process is alive and named NAME, else nothing
pid_of() {
    local file=$1 name=$2 pid
    pid=$(cat "$file" 2>/dev/null || true)
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = "$name" ] && echo "$pid"
    return 0
}
our_pid() { pid_of "$state/$1.pid" "$1"; }

# SIGTERM to the process in pid file $1 (named $2); daemons save their state on SIGTERM: give them 10 s
# (50 × 0.2 s), then SIGKILL
stop_pidfile() {
    local file=$1 name=$2 pid
    pid=$(pid_of "$file" "$name")
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do [ -n "$(pid_of "$file" "$name")" ] || break; sleep 0.2; done
        [ -z "$(pid_of "$file" "$name")" ] || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

stop() {
    local f
    for f in "$state"/slurmd*.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
    stop_pidfile "$state/slurmctld.pid" slurmctld
    stop_pidfile "$state/munged.pid" munged
    if [ -n "$vc" ]; then rm -rf "$state"; fi  # its own directory: nothing of it is left behind
    return 0
}

if [ "$action" = stop ]; then stop; exit 0; fi

# the network namespace a process is in ("net:[INODE]"), or the one named NS (ip netns)
netns_of_pid() { readlink "/proc/$1/ns/net" 2>/dev/null || true; }
netns_named() { echo "net:[$(stat -L -c %i "/run/netns/$1")]"; }

# a Slurm daemon we did not start (a user's cluster, or one started by hand) in a namespace where ours
# would run (same ports): leave it alone
if [ -n "$vc" ]; then
    [ -s "$vc_state" ] || { echo "slurm-local: no virtual cluster $vc (fluid-mpi vcluster --name $vc up N --head)" >&2; exit 1; }
    mapfile -t vhosts < <(python3 -c 'import json,sys; print("\n".join(json.load(open(sys.argv[1]))["hosts"]))' "$vc_state")
    printf '%s\n' "${vhosts[@]}" | grep -qx head ||
        { echo "slurm-local: virtual cluster $vc has no head host (up N --head): slurmctld runs there" >&2; exit 1; }
    spaces=$(for h in "${vhosts[@]}"; do netns_named "$vc-$h"; done)
else
    spaces=$(netns_of_pid $$)
fi
for name in slurmctld slurmd; do
    for pid in $(pgrep -x "$name" || true); do
        grep -qxF "$(netns_of_pid "$pid")" <<< "$spaces" || continue
        grep -qx "$pid" < <(cat "$state"/"$name"*.pid 2>/dev/null) && continue
        echo "slurm-local: a $name not started by this script is running (pid $pid); not touching it" >&2
        exit 1
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
mkdir -p "$state/spool" "$state/log"

# from here on, whatever fails stops what this run started, after showing the daemons' last words
# (on a virtual cluster `stop` removes the logs with the state directory)
fail() {
    local f
    for f in "$state"/log/*.log "$state"/munge/munged.log; do
        [ -s "$f" ] && { echo "--- $f" >&2; tail -n 5 "$f" >&2; }
    done
    stop
}
trap 'fail' ERR

auth_info=
if [ -n "$vc" ]; then
    # a munged of our own: its key, socket, pid, seed and log in $state/munge (owned by munge, as munged
    # insists); munged's socket is a filesystem path, so every namespace reaches it
    m=$state/munge
    mkdir -p "$m" && chmod 711 "$m"  # munged: the socket's directory must be searchable by all
    dd if=/dev/urandom bs=1 count=1024 of="$m/munge.key" status=none
    chmod 400 "$m/munge.key"
    chown -R munge:munge "$m"
    runuser -u munge -- munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
        --pid-file="$m/munged.pid" --seed-file="$m/munged.seed" --log-file="$m/munged.log"
    cp "$m/munged.pid" "$state/munged.pid"
    auth_info="AuthInfo=socket=$m/munge.socket"
elif ! munge -n </dev/null >/dev/null 2>&1; then
    # no munged answers on the default socket (one serving a virtual cluster's own socket does not count)
    # munge: a key (the Debian package makes one; create it only if missing), then the daemon as the munge user
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    runuser -u munge -- munged
    cp /run/munge/munged.pid "$state/munged.pid"  # its default pid file: exactly the one started here
fi

cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024) - 512}' /proc/meminfo)
common_conf() {  # $1: SlurmctldHost; the rest of the settings both shapes share
    cat <<CONF
ClusterName=fluidtest
SlurmctldHost=$1
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
${auth_info}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
StateSaveLocation=$state/spool/ctld
SlurmctldPidFile=$state/slurmctld.pid
SlurmctldLogFile=$state/log/slurmctld.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
CONF
}

if [ -z "$vc" ]; then
    host=$(hostname -s)
    nodes=$host
    mkdir -p "$state/spool/ctld" "$state/spool/d"
    {
        echo "# written by fluid-mpi scripts/slurm-local.sh: a one-node test cluster"
        common_conf "$host"
        cat <<CONF
SlurmdSpoolDir=$state/spool/d
SlurmdPidFile=$state/slurmd.pid
SlurmdLogFile=$state/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    } > "$conf"
    export SLURM_CONF=$conf
    slurmctld -f "$conf"
    slurmd -f "$conf"
    in_vc() { "$@"; }
else
    nodes=$(printf '%s\n' "${vhosts[@]}" | grep -vx head | paste -sd, -)
    addr() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["hosts"][sys.argv[2]]["addr"])' "$vc_state" "$1"; }
    mkdir -p "$state/spool/ctld" "$state/cgroup"
    # slurmd 22.05 always initialises a cgroup plugin, and `ip netns exec` (the vcluster agent) remounts
    # /sys without the cgroup mounts. With proctrack/linuxproc and task/none no cgroup is ever made, so
    # point it at an empty directory on /run's tmpfs (read as cgroup v1), not at the machine's cgroups.
    printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=%s\n' "$state/cgroup" > "$state/cgroup.conf"
    {
        echo "# written by fluid-mpi scripts/slurm-local.sh --vcluster $vc: one node per virtual host"
        common_conf "head($(addr head))"
        # a powered-off node is noticed (DOWN) within SlurmdTimeout: slurmctld pings every third of it.
        # 10 s: quick for a test, yet a node busy on a loaded 2-core machine still answers in time.
        # MessageTimeout 5 s (default 10): an RPC to a node that is gone fails sooner.
        cat <<CONF
SlurmdTimeout=10
MessageTimeout=5
SlurmdSpoolDir=$state/spool/%n
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdLogFile=$state/log/slurmd-%n.log
CONF
        for h in "${vhosts[@]}"; do
            [ "$h" = head ] && continue
            mkdir -p "$state/spool/$h"
            # all nodes share this machine's cores; OverSubscribe lets the jobs' steps overlap as on one node
            echo "NodeName=$h NodeAddr=$(addr "$h") CPUs=$cpus RealMemory=$((mem / 4)) State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    } > "$conf"
    export SLURM_CONF=$conf
    in_vc() { "$fluid_mpi" vcluster --name "$vc" exec head -- env SLURM_CONF="$conf" "$@"; }
    "$fluid_mpi" vcluster --name "$vc" exec head -- slurmctld -f "$conf"
    for h in "${vhosts[@]}"; do
        [ "$h" = head ] || "$fluid_mpi" vcluster --name "$vc" exec "$h" -- slurmd -f "$conf" -N "$h"
    done
fi
# the nodes register within a few seconds; 60 s (60 × 1 s) is ample for a few nodes on a loaded 2-core machine
want=$(tr ',' '\n' <<< "$nodes" | wc -l)
for _ in $(seq 1 60); do
    up=$(in_vc sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|mixed|allocated)$/' | sort -u | wc -l || true)
    if [ "$up" -ge "$want" ]; then echo "slurm-local: $want node(s) up: $nodes"; echo "SLURM_CONF=$conf"; exit 0; fi
    sleep 1
done
node_state=$(in_vc sinfo -h -N -o '%N %T' 2>/dev/null | paste -sd' ' - || true)
fail
echo "slurm-local: Slurm did not come up (nodes: '${node_state:-none}'); see $state/log/*.log" >&2
exit 1
