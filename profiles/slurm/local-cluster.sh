#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine, to run the workflow through
# `--profile profiles/slurm` without a real cluster (tests/test_slurm.py uses it).
#
#   bash profiles/slurm/local-cluster.sh install   # Debian's slurm-wlm + munge, if missing (root, apt)
#   bash profiles/slurm/local-cluster.sh start     # install if needed, then munged, slurmctld, slurmd
#   bash profiles/slurm/local-cluster.sh status    # exit 0 when the node takes jobs
#   bash profiles/slurm/local-cluster.sh stop      # shut the daemons down
#
# Its slurm.conf is /etc/slurm/slurm.conf, the one place every SLURM command finds without help
# (the executor's job step drops SLURM_CONF before its inner srun); a slurm.conf this script did
# not write is never touched: `start` refuses instead. Daemon state, logs and the munge socket
# live in BALANCEDBIO_SLURM_DIR (default /var/tmp/balancedbio-slurm).
# One node (this machine's CPUs and memory, read from `slurmd -C`) in two partitions, `cpu` (the
# default) and `gpu`, the names profiles/slurm and config/paper.yaml use. It has no GPUs: a job
# asking for `gpu=N` (N > 0) is refused by sbatch. No accounting database: use
# `--slurm-status-command squeue --slurm-no-account` (profiles/slurm/README.md); MinJobAge is an
# hour so that squeue still reports finished jobs. Every daemon runs as root (slurmd must).
# Idempotent: `start` on a running cluster only checks it, `stop` on a stopped one does nothing.
set -euo pipefail

NODE=localhost
STATE_DIR=${BALANCEDBIO_SLURM_DIR:-/var/tmp/balancedbio-slurm}
CONF=/etc/slurm/slurm.conf
HEADER="# Written by profiles/slurm/local-cluster.sh: one node, no accounting. Do not edit; rerun the script."
MUNGE_SOCKET="$STATE_DIR/munge.socket"
# One list of what this needs, used by `install` (and so by `make slurm`).
PACKAGES=(slurm-wlm munge)
COMMANDS=(slurmctld slurmd sbatch squeue scontrol sinfo munged munge)

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

# The state folder ends up in slurm.conf and in file paths: a plain absolute path only.
[[ "$STATE_DIR" =~ ^/[A-Za-z0-9_./-]+$ ]] || die "BALANCEDBIO_SLURM_DIR must be a plain absolute path, got '$STATE_DIR'"

missing_commands() {
    local name
    for name in "${COMMANDS[@]}"; do command -v "$name" >/dev/null 2>&1 || echo "$name"; done
}

install_packages() {
    [[ -z "$(missing_commands)" ]] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing $(missing_commands | tr '\n' ' ')and no apt-get to install ${PACKAGES[*]}"
    [[ $EUID -eq 0 ]] || die "missing $(missing_commands | tr '\n' ' ')and installing ${PACKAGES[*]} needs root"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt (another `make` target) instead of failing on its lock.
    local apt=(apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${PACKAGES[@]}")
    "${apt[@]}" >&2 || { apt-get update -qq -o DPkg::Lock::Timeout=600 >&2 && "${apt[@]}" >&2; } ||
        die "apt-get could not install ${PACKAGES[*]} (no network to the Debian mirror?)"
    [[ -z "$(missing_commands)" ]] || die "still missing after the install: $(missing_commands | tr '\n' ' ')"
}

# A number from `slurmd -C` (NodeName=... CPUs=2 ... RealMemory=24105).
node_value() {
    local value
    value=$(slurmd -C | sed -n "s/.*[[:space:]]$1=\([0-9][0-9]*\).*/\1/p" | head -n 1)
    [[ "$value" =~ ^[0-9]+$ ]] || die "slurmd -C reported no $1"
    echo "$value"
}

conf_is_ours() { [[ "$(head -n 1 "$CONF" 2>/dev/null)" == "$HEADER" ]]; }

write_config() {
    local cpus memory
    cpus=$(node_value CPUs)
    memory=$(node_value RealMemory)
    if [[ -e "$CONF" ]] && ! conf_is_ours; then
        die "$CONF exists and was not written by this script: this machine has its own SLURM; use it"
    fi
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" "$(dirname "$CONF")"
    # Written beside, then moved: a running daemon never reads half a file.
    cat >"$CONF.tmp" <<EOF
$HEADER
ClusterName=balancedbio-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
# No cgroups (containers often have none): processes tracked by parent id, bound to their CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
# Finished jobs stay visible to squeue for an hour: the executor's status command without sacct.
MinJobAge=3600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

# The pid in a daemon's pid file, if that process is alive.
running_pid() {
    local pid
    [[ -f "$1" ]] || return 1
    pid=$(head -n 1 "$1")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

node_state() { sinfo --noheader --nodes="$NODE" --format=%t 2>/dev/null | head -n 1; }

node_takes_jobs() {
    case "$(node_state)" in idle* | mix* | alloc* | comp*) return 0 ;; *) return 1 ;; esac
}

start() {
    install_packages
    [[ $EUID -eq 0 ]] || die "slurmd runs as root: run this as root"
    mkdir -p "$STATE_DIR"
    # A running controller keeps its file; otherwise this machine's CPUs and memory, read now.
    if ! running_pid "$STATE_DIR/slurmctld.pid" >/dev/null || [[ ! -f "$CONF" ]]; then write_config; fi

    if ! running_pid "$STATE_DIR/munged.pid" >/dev/null; then
        [[ -s /etc/munge/munge.key ]] || die "no /etc/munge/munge.key (Debian's munge package creates it)"
        # --force: run as root and accept the container's permissions.
        munged --force --socket="$MUNGE_SOCKET" --pid-file="$STATE_DIR/munged.pid" \
            --log-file="$STATE_DIR/munged.log" --seed-file="$STATE_DIR/munged.seed" ||
            die "munged did not start (see $STATE_DIR/munged.log)"
    fi
    munge --socket="$MUNGE_SOCKET" -n </dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null ||
        die "munge cannot encode and decode a credential (see $STATE_DIR/munged.log)"

    if ! running_pid "$STATE_DIR/slurmctld.pid" >/dev/null; then
        slurmctld -f "$CONF" || die "slurmctld did not start (see $STATE_DIR/slurmctld.log)"
    fi
    if ! running_pid "$STATE_DIR/slurmd.pid" >/dev/null; then
        slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start (see $STATE_DIR/slurmd.log)"
    fi

    local waited=0
    until node_takes_jobs; do
        case "$(node_state)" in
            drain* | down* | fail* | inval*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        ((waited < 60)) || die "node $NODE is '$(node_state)' after 60 s (see $STATE_DIR/slurmctld.log and slurmd.log)"
        sleep 1
        waited=$((waited + 1))
    done
    log "node $NODE takes jobs ($(node_value CPUs) CPUs, $(node_value RealMemory) MB; partitions cpu and gpu)"
}

stop_daemon() {
    local name=$1 pid waited=0
    pid=$(running_pid "$STATE_DIR/$name.pid") || return 0
    kill "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        ((waited < 30)) || { log "$name ($pid) did not stop in 30 s: killing it"; kill -9 "$pid"; break; }
        sleep 1
        waited=$((waited + 1))
    done
    log "stopped $name ($pid)"
}

stop() {
    # Running jobs first, so that no job outlives its daemons.
    if running_pid "$STATE_DIR/slurmctld.pid" >/dev/null; then
        scancel --user="$(id -un)" 2>/dev/null || true
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    # Without it, SLURM commands here say there is no cluster instead of waiting for a dead one.
    if conf_is_ours; then rm -f "$CONF"; fi
}

case "${1:-}" in
    install) install_packages ;;
    start) start ;;
    stop) stop ;;
    status) node_takes_jobs || die "no node takes jobs (state: '$(node_state)')"; log "node $NODE takes jobs" ;;
    *) die "usage: $0 install|start|status|stop" ;;
esac
