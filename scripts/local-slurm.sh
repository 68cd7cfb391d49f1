#!/usr/bin/env bash
# A single-node SLURM on this machine, for the project's cluster tests and for trying the cluster paths:
# munge, slurmctld and slurmd, one partition with this machine's cores and memory, accounting off.
# The daemons run in their own network namespace whose only interface is loopback, so nothing they open
# can be reached from beyond this machine's localhost (SLURM has no setting to bind its ports to one
# address). Clients, and everything the jobs start, run in the same namespace: use `run`.
# Everything else lives in one folder (configuration, munge key, state, logs, pid files).
#
#   scripts/local-slurm.sh start        install when missing (root + apt), start, wait until the node is idle
#   scripts/local-slurm.sh run CMD...   run a client (sbatch, squeue, facecanon-data build --cluster slurm)
#   scripts/local-slurm.sh status       the daemons this script started and the node state
#   scripts/local-slurm.sh stop         end exactly the daemons it started and remove its namespace
#
# Settings (environment): FACECANON_SLURM_DIR (default /tmp/facecanon-slurm), FACECANON_SLURM_PORT (16817;
# slurmd uses the next port), FACECANON_SLURM_NETNS (facecanon-slurm). Needs root. Exit status 3 when SLURM
# is missing and cannot be installed here, or when this machine cannot make a network namespace.
set -euo pipefail
DIR=${FACECANON_SLURM_DIR:-/tmp/facecanon-slurm}
PORT=${FACECANON_SLURM_PORT:-16817}
NETNS=${FACECANON_SLURM_NETNS:-facecanon-slurm}
CONF=$DIR/slurm.conf
DAEMONS=(slurmd slurmctld munged)  # stop order

in_ns() {  # in_ns CMD...: run CMD in the namespace (network only: `ip netns exec` would remount /sys,
           # hiding the cgroup file system slurmd reads), with the configuration
  nsenter --net="/var/run/netns/$NETNS" env SLURM_CONF="$CONF" "$@"
}

make_namespace() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: local SLURM needs root (its daemons and their network namespace)" >&2
    exit 3
  fi
  if ! ip netns list 2>/dev/null | grep -qw "$NETNS"; then
    ip netns add "$NETNS" || { echo "error: cannot create network namespace $NETNS" >&2; exit 3; }
    touch "$DIR/netns.created"
  fi
  in_ns ip link set lo up
  # SLURM resolves its listening address with AI_ADDRCONFIG, which finds nothing where only 127.0.0.1 is
  # configured: one private address on this namespace's loopback satisfies it (no route leads there).
  in_ns ip addr replace 10.254.0.1/32 dev lo
}

running() {  # running NAME: its pid file names a live process
  local pidfile=$DIR/$1.pid
  [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

install_when_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "error: SLURM is not installed and cannot be installed here (needs root and apt-get):" \
         "apt-get install slurm-wlm munge" >&2
    exit 3
  fi
  echo "installing slurm-wlm and munge (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && apt-get install -y -qq slurm-wlm munge >/dev/null || {
      echo "error: apt-get install slurm-wlm munge failed" >&2; exit 3; }
  fi
}

cores() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }  # nproc obeys OMP_NUM_THREADS; SLURM needs the cores

write_config() {
  local cpus mem_mb
  cpus=$(cores)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # leave 1 GiB to the system
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/logs"
  chmod 700 "$DIR"
  if [ ! -s "$DIR/munge.key" ]; then
    head -c 1024 /dev/urandom > "$DIR/munge.key"
    chmod 400 "$DIR/munge.key"
  fi
  cat > "$CONF" <<EOF
# Written by scripts/local-slurm.sh: one node (this machine), one partition, accounting off.
ClusterName=facecanon
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/logs/slurmctld.log
SlurmdLogFile=$DIR/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_when_missing
  if running slurmctld && running slurmd && running munged; then
    echo "already running; clients: $0 run sbatch ..."
    return
  fi
  write_config
  make_namespace
  running munged || in_ns munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" \
      --pid-file="$DIR/munged.pid" --log-file="$DIR/logs/munged.log" --seed-file="$DIR/munged.seed"
  running slurmctld || in_ns slurmctld -f "$CONF"
  running slurmd || in_ns slurmd -f "$CONF" -N localhost
  for _ in $(seq 60); do
    state=$(in_ns sinfo -h -N -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
      echo "SLURM up: partition local on localhost ($(cores) CPUs), network namespace $NETNS;" \
           "clients: $0 run sbatch ..."
      return
    fi
    sleep 1
  done
  echo "error: the node did not become idle within 60 s (state: ${state:-none}); logs in $DIR/logs" >&2
  stop
  exit 1
}

stop() {
  if running slurmctld; then  # end this instance's jobs first: a job step outlives its daemons otherwise
    in_ns scancel --quiet --partition=local 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(in_ns squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for name in "${DAEMONS[@]}"; do
    if running "$name"; then
      pid=$(cat "$DIR/$name.pid")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      echo "stopped $name ($pid)"
    fi
    rm -f "$DIR/$name.pid"
  done
  pkill -9 -f "$DIR/spool/" 2>/dev/null || true  # job scripts (and so their steps) of jobs still running
  if [ -e "$DIR/netns.created" ]; then
    ip netns delete "$NETNS" 2>/dev/null || true
    rm -f "$DIR/netns.created"
    echo "removed network namespace $NETNS"
  fi
}

status() {
  local all=0
  for name in "${DAEMONS[@]}"; do
    if running "$name"; then echo "$name: running ($(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; all=1; fi
  done
  [ "$all" = 0 ] && in_ns sinfo -N
  return "$all"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  run) shift; [ $# -gt 0 ] || { echo "usage: $0 run CMD [ARGS...]" >&2; exit 2; }; in_ns "$@" ;;
  *) echo "usage: $0 start|run CMD...|status|stop" >&2; exit 2 ;;
esac
