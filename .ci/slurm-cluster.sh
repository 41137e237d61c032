#!/usr/bin/env bash
# A real, single-node, loopback-only SLURM cluster for lcnn's CI (Debian 12 packages, no systemd).
#
# Why: the SLURM profile (profiles/slurm) and the workflow's job routing can only be trusted once they
# have run through real slurmctld/slurmd/slurmdbd daemons, so tests/test_slurm.py starts this cluster.
#
# Usage (as root):
#   .ci/slurm-cluster.sh start    # install missing packages, write configs, start daemons, smoke test
#   .ci/slurm-cluster.sh stop     # stop, by PID, every daemon that `start` started (and nothing else)
#   .ci/slurm-cluster.sh status   # daemons, partitions, queue
#   .ci/slurm-cluster.sh env      # print the cluster's settings as KEY=VALUE lines (for tests)
#
# Exit codes: 0 ok; 1 a daemon or the smoke test failed; 2 usage;
#             3 this machine cannot host the cluster (not root, not Debian, no apt/dpkg, install failed):
#               the last line on stderr is then a one-line reason, which the test uses as its skip reason.
#
# What it builds: munge, MariaDB (unix socket only, no TCP), slurmdbd (so `sacct` works, which the
# snakemake SLURM plugin needs), slurmctld and slurmd, all bound to 127.0.0.1. One node carrying fake
# typed GPUs (GRES backed by /dev/fakegpuN char devices) and three partitions on that node:
#   $LCNN_SLURM_GPU_PARTITION   (default gpu)   training partition, GPUs of type $LCNN_SLURM_GPU_TYPE
#   $LCNN_SLURM_BENCH_PARTITION (default l40s)  benchmark partition, GPUs of type $LCNN_SLURM_BENCH_GPU_TYPE
#   $LCNN_SLURM_CPU_PARTITION   (default cpu)   CPU-only rules (the default partition)
# The node advertises a typical GPU-node shape (LCNN_SLURM_NODE_CPUS / LCNN_SLURM_NODE_MEM_MB, not
# enforced: no cgroups) so the profile's real requests (e.g. 8 CPUs per GPU) are accepted as written.
# Other knobs: LCNN_SLURM_GPUS (train GPUs, default 2), LCNN_SLURM_BENCH_GPUS (default 1),
# LCNN_SLURM_ACCOUNT (account created for the jobs, default lcnn_ci), LCNN_SLURM_CLUSTER (default lcnn).
set -euo pipefail

GPU_PARTITION="${LCNN_SLURM_GPU_PARTITION:-gpu}"
BENCH_PARTITION="${LCNN_SLURM_BENCH_PARTITION:-l40s}"
CPU_PARTITION="${LCNN_SLURM_CPU_PARTITION:-cpu}"
GPU_TYPE="${LCNN_SLURM_GPU_TYPE:-a100}"
BENCH_GPU_TYPE="${LCNN_SLURM_BENCH_GPU_TYPE:-l40s}"
NGPU="${LCNN_SLURM_GPUS:-2}"
NBENCH="${LCNN_SLURM_BENCH_GPUS:-1}"
ACCOUNT="${LCNN_SLURM_ACCOUNT:-lcnn_ci}"
CLUSTER="${LCNN_SLURM_CLUSTER:-lcnn}"
NODE_CPUS="${LCNN_SLURM_NODE_CPUS:-32}"
NODE_MEM_MB="${LCNN_SLURM_NODE_MEM_MB:-256000}"
LOGDIR=/var/log/slurm
STATE=/run/lcnn-slurm            # pid files of the daemons this script started (what `stop` stops)
DB_PASS=lcnn_slurmdb_ci          # MariaDB is reachable only through its unix socket; not a secret

log() { echo "[slurm-cluster $(date +%T)] $*" >&2; }
cannot() { echo "cannot start a SLURM cluster here: $*" >&2; exit 3; }
die() { log "ERROR: $*"; exit 1; }

wait_for() {  # wait_for <seconds> <cmd...>: poll every 0.3 s until cmd succeeds
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$end" ] && return 1
    sleep 0.3
  done
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

preflight() {
  [ "$(id -u)" = 0 ] || cannot "needs root (runs apt-get and system daemons); run as root or in a root container"
  [ -r /etc/debian_version ] || cannot "not a Debian/Ubuntu system (needs the Debian slurm-wlm packages)"
  command -v dpkg-query >/dev/null && command -v apt-get >/dev/null || cannot "dpkg/apt-get not found"
}

NODE="$(hostname -s 2>/dev/null || hostname)"

install_pkgs() {
  local p missing=()
  for p in munge slurmctld slurmd slurm-client slurmdbd mariadb-server; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && return
  log "installing: ${missing[*]}"
  # postinst scripts try to start services; without an init system that fails harmlessly.
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}"; } >"/tmp/lcnn-slurm-apt.log" 2>&1 \
    || cannot "apt-get install ${missing[*]} failed (offline? see /tmp/lcnn-slurm-apt.log)"
}

ensure_hostname_loopback() {
  # slurmd finds its NodeName from `hostname -s`; make that name resolve to loopback (first match wins).
  if ! getent ahostsv4 "$NODE" 2>/dev/null | awk '{print $1}' | grep -q '^127\.'; then
    log "mapping $NODE to 127.0.0.1 in /etc/hosts"
    { echo "127.0.0.1 $NODE"; cat /etc/hosts; } >/tmp/.lcnn-hosts && cat /tmp/.lcnn-hosts >/etc/hosts
  fi
}

# Writes the configs; prints "changed" when slurm.conf/gres.conf differ from what the daemons run with.
write_configs() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR" "$STATE"
  local i last=$(( NGPU + NBENCH - 1 )) parts=""
  # A GRES gpu without File= is dropped by slurmd and the node goes INVAL: give each fake GPU a device.
  for i in $(seq 0 "$last"); do [ -e "/dev/fakegpu$i" ] || mknod -m 666 "/dev/fakegpu$i" c 1 3; done
  local gres="gpu:${GPU_TYPE}:${NGPU}"
  local gres_conf="AutoDetect=off
NodeName=${NODE} Name=gpu Type=${GPU_TYPE} File=/dev/fakegpu[0-$(( NGPU - 1 ))]"
  if [ "$NBENCH" -gt 0 ]; then
    gres="${gres},gpu:${BENCH_GPU_TYPE}:${NBENCH}"
    gres_conf="${gres_conf}
NodeName=${NODE} Name=gpu Type=${BENCH_GPU_TYPE} File=/dev/fakegpu[${NGPU}-${last}]"
  fi
  for p in "$CPU_PARTITION" "$GPU_PARTITION" "$BENCH_PARTITION"; do
    [ -z "$p" ] && continue
    case " $parts " in *" $p "*) continue ;; esac   # same name given twice: one partition
    parts="${parts} ${p}"
  done
  local first=1 partition_lines=""
  for p in $parts; do
    partition_lines="${partition_lines}PartitionName=${p} Nodes=${NODE} Default=$([ $first = 1 ] && echo YES || echo NO) MaxTime=INFINITE State=UP
"
    first=0
  done
  cat >/tmp/.lcnn-slurm.conf <<EOF
# lcnn CI: single-node SLURM cluster on loopback (written by .ci/slurm-cluster.sh; do not edit)
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job that names no memory would take the whole node
DefMemPerCPU=1000
# trust the node shape below rather than the (smaller) CI machine
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# the scheduler runs often so tiny CI jobs start quickly
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
MailProg=/bin/true
CommunicationParameters=NoInAddrAny
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu,gres/gpu:${GPU_TYPE},gres/gpu:${BENCH_GPU_TYPE}
# store the job comment (the SLURM plugin writes rule_<name>_wildcards_<...> there) for sacct
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${NODE_CPUS} RealMemory=${NODE_MEM_MB} Gres=${gres} State=UNKNOWN
${partition_lines}
EOF
  printf '%s\n' "$gres_conf" >/tmp/.lcnn-gres.conf
  local changed=""
  cmp -s /tmp/.lcnn-slurm.conf /etc/slurm/slurm.conf || changed=1
  cmp -s /tmp/.lcnn-gres.conf /etc/slurm/gres.conf || changed=1
  mv /tmp/.lcnn-slurm.conf /etc/slurm/slurm.conf
  mv /tmp/.lcnn-gres.conf /etc/slurm/gres.conf
  cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=${LOGDIR}/slurmdbd.log
PidFile=/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
EOF
  chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a world-readable config
  [ -n "$changed" ] && echo changed || true
}

started() { cp -f "$1" "$STATE/$(basename "$1")" 2>/dev/null || true; }  # remember: we started it

start_munge() {
  pid_alive /run/munge/munged.pid && return
  [ -s /etc/munge/munge.key ] || {
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  }
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  wait_for 10 bash -c 'munge -n | unmunge' || die "munged did not start"
  started /run/munge/munged.pid
}

start_mariadb() {
  if ! pid_alive /run/mysqld/mysqld.pid; then
    install -d -o mysql -g root -m 0755 /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    # unix socket only (/run/mysqld/mysqld.sock): no TCP listener at all
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mysqld.pid \
      --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 >"$LOGDIR/mariadbd.out" 2>&1 </dev/null &
    wait_for 60 mysqladmin ping || { tail "$LOGDIR/mariadbd.out" >&2; die "mariadbd did not start"; }
    wait_for 10 test -s /run/mysqld/mysqld.pid
    started /run/mysqld/mysqld.pid
  fi
  mysql -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start_slurmdbd() {
  if ! pid_alive /run/slurmdbd.pid; then
    /usr/sbin/slurmdbd
    # sacctmgr answers once slurmdbd is connected to MariaDB and listening on 6819
    wait_for 60 sacctmgr -n show cluster || { tail "$LOGDIR/slurmdbd.log" >&2; die "slurmdbd did not start"; }
    started /run/slurmdbd.pid
  fi
  # The cluster must be registered before slurmctld starts; then the jobs' account and user association.
  sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacctmgr -n -P show account format=account | grep -qx "$ACCOUNT" \
    || sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="lcnn CI" >/dev/null
  sacctmgr -n -P show assoc where user=root account="$ACCOUNT" cluster="$CLUSTER" format=user | grep -qx root \
    || sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
}

stop_pidfile() {  # stop_pidfile <pidfile>: TERM, wait up to 30 s, then KILL
  local pid
  pid_alive "$1" || return 0
  pid="$(cat "$1")"; kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.3; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  log "stopped $(basename "$1" .pid) (pid $pid)"
}

start_slurm() {
  local changed="$1" st end
  if [ -n "$changed" ] && { pid_alive /run/slurmctld.pid || pid_alive /run/slurmd.pid; }; then
    log "configuration changed: restarting slurmctld and slurmd"
    stop_pidfile /run/slurmd.pid; stop_pidfile /run/slurmctld.pid
  fi
  pid_alive /run/slurmctld.pid || { /usr/sbin/slurmctld; started /run/slurmctld.pid; }
  pid_alive /run/slurmd.pid || { /usr/sbin/slurmd; started /run/slurmd.pid; }
  end=$(( $(date +%s) + 60 ))
  while :; do
    st="$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1 || true)"
    case "$st" in
      idle|mix|alloc|comp) break ;;
      drain*|down*|inval*|drng*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    [ "$(date +%s)" -ge "$end" ] && { sinfo -R >&2; tail "$LOGDIR/slurmd.log" >&2; die "node not idle: '$st'"; }
    sleep 0.3
  done
}

smoke_test() {
  local jid p
  for p in $(sinfo -h -o '%R'); do   # every partition accepts and runs a job
    srun -p "$p" -A "$ACCOUNT" -t 1 -n 1 true || die "srun in partition $p failed"
  done
  jid=$(sbatch --parsable -p "$GPU_PARTITION" -A "$ACCOUNT" -t 1 --gpus=1 -o /dev/null \
    --wrap 'test -n "$SLURM_JOB_ID" && test -n "$CUDA_VISIBLE_DEVICES"')
  wait_for 60 bash -c "sacct -X -n -P -o State -j $jid | grep -qx COMPLETED" \
    || { sacct -j "$jid" >&2; die "sacct did not report job $jid COMPLETED"; }
}

print_env() {
  cat <<EOF
LCNN_SLURM_GPU_PARTITION=${GPU_PARTITION}
LCNN_SLURM_BENCH_PARTITION=${BENCH_PARTITION}
LCNN_SLURM_CPU_PARTITION=${CPU_PARTITION}
LCNN_SLURM_GPU_TYPE=${GPU_TYPE}
LCNN_SLURM_BENCH_GPU_TYPE=${BENCH_GPU_TYPE}
LCNN_SLURM_ACCOUNT=${ACCOUNT}
LCNN_SLURM_CLUSTER=${CLUSTER}
EOF
}

case "${1:-}" in
  start)
    T0=$(date +%s.%N)
    preflight
    install_pkgs; T1=$(date +%s.%N)
    ensure_hostname_loopback
    changed="$(write_configs)"
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurm "$changed"
    smoke_test; T2=$(date +%s.%N)
    log "$(awk -v a="$T0" -v b="$T1" -v c="$T2" 'BEGIN { printf "up in %.1fs (install %.1fs, daemons+smoke %.1fs)", c-a, b-a, c-b }'):" \
        "partitions $(sinfo -h -o '%R' | tr '\n' ' ')account ${ACCOUNT}"
    ;;
  stop)
    # Only what `start` started, newest first: our copy of its pid file must still name the live daemon,
    # so a daemon someone else runs (or a recycled pid) is left alone.
    for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid /run/mysqld/mysqld.pid /run/munge/munged.pid; do
      ours="$STATE/$(basename "$f")"
      [ -s "$ours" ] || continue
      if pid_alive "$f" && [ "$(cat "$f")" = "$(cat "$ours")" ]; then stop_pidfile "$f"; fi
      rm -f "$ours"
    done
    ;;
  status)
    for f in /run/munge/munged.pid /run/mysqld/mysqld.pid /run/slurmdbd.pid /run/slurmctld.pid /run/slurmd.pid; do
      if pid_alive "$f"; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
      else echo "$(basename "$f" .pid): not running"; fi
    done
    pid_alive /run/slurmctld.pid && { sinfo -o '%P %a %D %t %G'; squeue; }
    ;;
  env) print_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
