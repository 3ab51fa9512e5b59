#!/usr/bin/env bash
# Start (or verify) a real one-node Slurm cluster on this machine, for development and CI.
#
#   scripts/slurm-single-node.sh            # install, configure, start; no-op when already healthy
#   scripts/slurm-single-node.sh --stop     # stop the daemons this script started (by their pid files)
#   scripts/slurm-single-node.sh --no-accounting   # skip slurmdbd even where it would work
#
# Runs as root on Debian 12 without systemd. Accounting goes through slurmdbd + MariaDB so that
# `sacct` answers the way it does on production clusters; when slurmdbd cannot be brought up within
# DBD_WAIT_SECONDS the cluster runs with accounting_storage/none and jobcomp/filetxt instead (the
# ccat-dagster Slurm backend then reads scontrol and the job-completion file).
# The last line printed on success is a one-line summary.
set -euo pipefail

readonly STATE_DIR=/run/ccat-slurm-single-node   # records which daemons THIS script started
readonly LOCK_FILE=/run/lock/ccat-slurm-single-node.lock
readonly CONF_DIR=/etc/slurm
readonly LOG_DIR=/var/log/slurm
readonly CTLD_SPOOL=/var/spool/slurmctld
readonly SLURMD_SPOOL=/var/spool/slurmd
readonly JOBCOMP_FILE=$LOG_DIR/jobcomp.log
readonly CLUSTER_NAME=ccat-dev
readonly PARTITION=debug
readonly DBD_PORT=6819
readonly DBD_DATABASE=slurm_acct_db
readonly DBD_DB_USER=slurm
readonly DBD_WAIT_SECONDS=15
readonly NODE_WAIT_SECONDS=30
readonly CTLD_PID_FILE=/run/slurmctld.pid
readonly SLURMD_PID_FILE=/run/slurmd.pid
readonly DBD_PID_FILE=/run/slurmdbd.pid
readonly MUNGED_PID_FILE=/run/munge/munged.pid

log() { echo "slurm-single-node: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

NODE=$(hostname -s)
readonly NODE

# --- small helpers ------------------------------------------------------------------------------

# pid_running PID: a live process, not a zombie (this machine's pid 1 may never collect orphans).
pid_running() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# pid_of PIDFILE NAME: prints the pid in PIDFILE if it is a running process whose command is NAME.
pid_of() {
    local pidfile=$1 name=$2 pid
    # The daemon may remove its pid file at any moment (it is stopping): a failed read means "not alive".
    pid=$(tr -dc '0-9' 2>/dev/null <"$pidfile") || return 1
    [[ -n $pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    pid_running "$pid" || return 1
    echo "$pid"
}

pid_alive() { pid_of "$1" "$2" >/dev/null; }

record_started() { mkdir -p "$STATE_DIR"; echo "$2" >"$STATE_DIR/$1.pidfile"; }

# stop_pid NAME PID: SIGTERM, then SIGKILL after 10 s.
stop_pid() {
    local name=$1 pid=$2
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        pid_running "$pid" || return 0
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# stop_recorded NAME: stop daemon NAME if (and only if) this script recorded starting it.
stop_recorded() {
    local name=$1 record=$STATE_DIR/$1.pidfile pid
    [[ -r $record ]] || return 0
    if pid=$(pid_of "$(cat "$record")" "$name"); then
        stop_pid "$name" "$pid"
        log "stopped $name (pid $pid)"
    fi
    rm -f "$record"
}

node_state() { sinfo --noheader --nodes="$NODE" --Node --format=%T 2>/dev/null | head -n1; }

current_accounting() {
    scontrol show config 2>/dev/null | awk -F' = ' '/^AccountingStorageType/ {print $2}'
}

# slurm_healthy WANT_ACCOUNTING: controller up, node usable, accounting as asked (yes: slurmdbd).
slurm_healthy() {
    local want_accounting=$1
    command -v sinfo >/dev/null 2>&1 || return 1
    [[ -r $CONF_DIR/slurm.conf ]] || return 1
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    case "$(node_state)" in
        idle | mixed | allocated | completing) ;;
        *) return 1 ;;
    esac
    local acct
    acct=$(current_accounting)
    if [[ $want_accounting == yes ]]; then
        # After an earlier fallback, try slurmdbd again (it may work now).
        [[ $acct == accounting_storage/slurmdbd ]]
    else
        [[ $acct == accounting_storage/none ]]
    fi
}

summary() {
    local acct cpus mem version
    acct=$(current_accounting)
    cpus=$(sinfo --noheader --nodes="$NODE" --Node --format=%c | head -n1)
    mem=$(sinfo --noheader --nodes="$NODE" --Node --format=%m | head -n1)
    version=$(sinfo --version | awk '{print $2}')
    case "$acct" in
        accounting_storage/slurmdbd) acct="slurmdbd (sacct works)" ;;
        *) acct="none (sacct disabled; use scontrol / $JOBCOMP_FILE)" ;;
    esac
    echo "slurm-single-node: UP node=$NODE state=$(node_state) cpus=$cpus memory_mib=$mem" \
        "partition=$PARTITION accounting=$acct slurm=$version"
}

# --- installation -------------------------------------------------------------------------------

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine has no package lists yet; retry once after `apt-get update`.
    if ! apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
        log "apt-get install $* failed; running apt-get update and retrying"
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends "$@" >/dev/null
    fi
}

ensure_packages() {
    local need=()
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 || need+=(slurm-wlm)
    command -v munged >/dev/null 2>&1 || need+=(munge)
    if ((${#need[@]})); then
        log "installing ${need[*]}"
        apt_install "${need[@]}"
    fi
}

# ensure_accounting_packages: slurmdbd and a MariaDB server; returns 1 (-> no accounting) if they cannot be had.
ensure_accounting_packages() {
    local need=()
    command -v slurmdbd >/dev/null 2>&1 || need+=(slurmdbd)
    [[ -x /usr/sbin/mariadbd || -x /usr/sbin/mysqld ]] || need+=(mariadb-server)
    ((${#need[@]})) || return 0
    log "installing ${need[*]}"
    (apt_install "${need[@]}") || { log "could not install ${need[*]}"; return 1; }
}

# --- munge --------------------------------------------------------------------------------------

ensure_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    runuser -u munge -- munged --force 9>&-
    record_started munged "$MUNGED_PID_FILE"
    for _ in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not answer within 5 s (see /var/log/munge/munged.log)"
}

# --- accounting (MariaDB + slurmdbd) ------------------------------------------------------------

mariadb_client() { if command -v mariadb >/dev/null 2>&1; then mariadb "$@"; else mysql "$@"; fi; }

ensure_mariadb() {
    mariadb_client -e 'SELECT 1' >/dev/null 2>&1 && return 0
    log "MariaDB does not answer; starting it"
    if [[ -x /etc/init.d/mariadb ]]; then
        /etc/init.d/mariadb start >/dev/null 2>&1 9>&- || true
        record_started_mariadb=yes
    fi
    for _ in $(seq 1 50); do
        mariadb_client -e 'SELECT 1' >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

dbd_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$DBD_PORT") 2>/dev/null; }

# try_start_slurmdbd: returns 0 when slurmdbd answers on its port within DBD_WAIT_SECONDS.
try_start_slurmdbd() {
    ensure_accounting_packages || return 1
    ensure_mariadb || { log "MariaDB unavailable"; return 1; }
    local password=""
    if [[ -r $CONF_DIR/slurmdbd.conf ]]; then
        password=$(awk -F= '/^StoragePass=/ {print $2}' "$CONF_DIR/slurmdbd.conf")
    fi
    # Hex only, so it needs no quoting in SQL or in the config file.
    [[ $password =~ ^[0-9a-f]{32}$ ]] || password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    mariadb_client <<SQL || { log "could not create the accounting database"; return 1; }
CREATE DATABASE IF NOT EXISTS $DBD_DATABASE;
CREATE USER IF NOT EXISTS '$DBD_DB_USER'@'localhost' IDENTIFIED BY '$password';
ALTER USER '$DBD_DB_USER'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON $DBD_DATABASE.* TO '$DBD_DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
    local tmp
    tmp=$(mktemp "$CONF_DIR/.slurmdbd.conf.XXXXXX")
    chmod 0600 "$tmp"
    cat >"$tmp" <<EOF
# Written by scripts/slurm-single-node.sh (ccat-dagster); rewritten on every run.
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$DBD_PID_FILE
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DBD_DB_USER
StoragePass=$password
StorageLoc=$DBD_DATABASE
EOF
    mv -f "$tmp" "$CONF_DIR/slurmdbd.conf"

    if ! pid_alive "$DBD_PID_FILE" slurmdbd; then
        slurmdbd 9>&- || { log "slurmdbd failed to start (see $LOG_DIR/slurmdbd.log)"; return 1; }
        record_started slurmdbd "$DBD_PID_FILE"
    fi
    local deadline=$((SECONDS + DBD_WAIT_SECONDS))
    until dbd_port_open; do
        if ((SECONDS >= deadline)); then
            log "slurmdbd did not open port $DBD_PORT within ${DBD_WAIT_SECONDS} s (see $LOG_DIR/slurmdbd.log)"
            stop_recorded slurmdbd
            return 1
        fi
        sleep 0.2
    done
    # Register the cluster up front so the first jobs are recorded even before slurmctld's own
    # registration round-trip.
    if ! sacctmgr --noheader --parsable2 list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
        sacctmgr --immediate add cluster "$CLUSTER_NAME" >/dev/null 2>&1 || true
    fi
    return 0
}

# --- slurm.conf ---------------------------------------------------------------------------------

write_slurm_conf() {
    local accounting=$1 cpus total_mib headroom real_mib def_mem acct_lines tmp
    cpus=$(nproc)
    total_mib=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [[ -n $total_mib ]] || total_mib=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    # Leave headroom for the OS and the daemons: 10 %, at least 512 MiB (half on tiny machines).
    headroom=$((total_mib / 10))
    ((headroom >= 512)) || headroom=512
    real_mib=$((total_mib - headroom))
    ((real_mib >= 256)) || real_mib=$((total_mib / 2))
    # Without DefMemPerCPU a job without --mem takes the whole node's memory and jobs run one at a time.
    def_mem=$((real_mib / cpus))

    if [[ $accounting == slurmdbd ]]; then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT"
    else
        acct_lines="AccountingStorageType=accounting_storage/none"
    fi

    mkdir -p "$CONF_DIR" "$LOG_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL"
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
# Written by scripts/slurm-single-node.sh (ccat-dagster); rewritten on every run.
ClusterName=$CLUSTER_NAME
# Explicit loopback addresses: no dependence on the machine's host name resolving.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# The default 3 s batch_sched_delay makes many short jobs wait for nothing.
SchedulerParameters=batch_sched_delay=0
# Reject at submission what can never run (e.g. more CPUs than the node has) instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for 5 minutes (what status falls back to without sacct).
MinJobAge=300
# Seconds between SIGTERM and SIGKILL on cancel / time limit; short so tests do not wait 30 s.
KillWait=5
InactiveLimit=0
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID_FILE
SlurmdPidFile=$SLURMD_PID_FILE
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_FILE
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
# Without cgroups this is what enforces --mem (the job ends OUT_OF_MEMORY), as on production clusters.
JobAcctGatherParams=OverMemoryKill
$acct_lines
DefMemPerCPU=$def_mem
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mib State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    if [[ -r $CONF_DIR/slurm.conf ]] && cmp -s "$tmp" "$CONF_DIR/slurm.conf"; then
        rm -f "$tmp"
        return 1 # unchanged
    fi
    mv -f "$tmp" "$CONF_DIR/slurm.conf"
    return 0 # changed
}

# --- start / stop -------------------------------------------------------------------------------

start_slurm_daemons() {
    local conf_changed=$1
    if [[ $conf_changed == yes ]]; then
        # A running daemon would keep the old configuration (accounting type needs a restart).
        local name pidfile pid
        for name in slurmd slurmctld; do
            pidfile=$SLURMD_PID_FILE
            [[ $name == slurmctld ]] && pidfile=$CTLD_PID_FILE
            if pid=$(pid_of "$pidfile" "$name"); then
                log "configuration changed; restarting $name"
                stop_pid "$name" "$pid"
            fi
        done
    fi
    if ! pid_alive "$CTLD_PID_FILE" slurmctld; then
        slurmctld 9>&- || die "slurmctld failed to start (see $LOG_DIR/slurmctld.log)"
        record_started slurmctld "$CTLD_PID_FILE"
    fi
    if ! pid_alive "$SLURMD_PID_FILE" slurmd; then
        slurmd 9>&- || die "slurmd failed to start (see $LOG_DIR/slurmd.log)"
        record_started slurmd "$SLURMD_PID_FILE"
    fi
}

wait_for_idle_node() {
    local deadline=$((SECONDS + NODE_WAIT_SECONDS)) state resumed=no
    while true; do
        state=$(node_state || true)
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            drain* | down*)
                # A node left drained/down by an earlier unclean stop: return it to service once.
                if [[ $resumed == no ]]; then
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=yes
                fi
                ;;
        esac
        if ((SECONDS >= deadline)); then
            log "last lines of $LOG_DIR/slurmctld.log:"
            tail -n 15 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null || true
            log "last lines of $LOG_DIR/slurmd.log:"
            tail -n 15 "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
            die "node $NODE not idle after ${NODE_WAIT_SECONDS} s (sinfo state: '${state:-no answer}')"
        fi
        sleep 0.3
    done
}

do_stop() {
    stop_recorded slurmd
    stop_recorded slurmctld
    stop_recorded slurmdbd
    stop_recorded munged
    if [[ -r $STATE_DIR/mariadb.started ]]; then
        /etc/init.d/mariadb stop >/dev/null 2>&1 || true
        rm -f "$STATE_DIR/mariadb.started"
        log "stopped MariaDB"
    fi
    echo "slurm-single-node: stopped the daemons this script had started"
}

do_start() {
    local want_accounting=$1
    if slurm_healthy "$want_accounting"; then
        summary
        return 0
    fi
    ensure_packages
    ensure_munge
    local accounting=none
    record_started_mariadb=no
    if [[ $want_accounting == yes ]]; then
        if try_start_slurmdbd; then
            accounting=slurmdbd
        else
            log "WARNING: falling back to accounting_storage/none + jobcomp/filetxt (sacct will be disabled)"
        fi
    fi
    if [[ $record_started_mariadb == yes ]]; then
        mkdir -p "$STATE_DIR"
        touch "$STATE_DIR/mariadb.started"
    fi
    local changed=no
    if write_slurm_conf "$accounting"; then changed=yes; fi
    start_slurm_daemons "$changed"
    wait_for_idle_node
    summary
}

main() {
    local action=start want_accounting=yes
    while (($#)); do
        case "$1" in
            --stop) action=stop ;;
            --no-accounting) want_accounting=no ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown argument '$1'" ;;
        esac
        shift
    done
    ((EUID == 0)) || die "must run as root (it installs packages and starts system daemons)"
    mkdir -p "$(dirname "$LOCK_FILE")"
    # fd 9 holds the lock; every daemon is started with 9>&- so it does not keep the lock forever.
    exec 9>"$LOCK_FILE"
    flock -w 120 9 || die "another slurm-single-node.sh holds $LOCK_FILE for more than 120 s"
    if [[ $action == stop ]]; then do_stop; else do_start "$want_accounting"; fi
}

main "$@"
