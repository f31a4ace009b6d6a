#!/usr/bin/env bash
# Starts N processes of one `python -m llamahome.launch` command on this machine, as the N hosts
# of a pod would run it: for testing multi-host code paths, or for one process per GPU.
#
#   launch/local.sh N --gin_file=gin/train/tiny_cpu.gin --gin_param=train.steps=10
#
#   # CPU: 2 processes x 4 fake devices, FSDP over the 8 (collectives over gloo / TCP)
#   JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
#     launch/local.sh 2 --gin_file=gin/train/tiny_cpu.gin
#
# Variables (all optional):
#   LLAMAHOME_PORT                 coordinator port on 127.0.0.1 (default: a free port)
#   LLAMAHOME_DEVICES_PER_PROCESS  give process i the accelerators i*D ... i*D+D-1
#                                  (sets LLAMAHOME_LOCAL_DEVICE_IDS; leave unset on CPU)
#   LLAMAHOME_KILL_GRACE_S         seconds between SIGTERM and SIGKILL when one fails (10)
#   PYTHON                         the interpreter (default: python)
#   LLAMAHOME_DRY_RUN=1            print what each process would run, with its environment,
#                                  and start nothing
# Each process gets LLAMAHOME_COORDINATOR=127.0.0.1:PORT, LLAMAHOME_NUM_PROCESSES=N and its own
# LLAMAHOME_PROCESS_ID (see llamahome/parallel/distributed.py). Every process prints to this
# terminal; only process 0 logs below warning level.
#
# If one process fails, the others are stopped and the script exits with its status. Ctrl-C
# (or SIGTERM) is passed on as SIGTERM: training saves a checkpoint and stops; a second Ctrl-C
# kills every process. Running the same command again resumes from the last checkpoint.
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [llamahome.launch flags...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
port=${LLAMAHOME_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

if [[ "${LLAMAHOME_DRY_RUN:-0}" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    ids=
    if [[ -n "${LLAMAHOME_DEVICES_PER_PROCESS:-}" ]]; then
      d=$LLAMAHOME_DEVICES_PER_PROCESS
      ids=" LLAMAHOME_LOCAL_DEVICE_IDS=$(seq -s, $((i * d)) $((i * d + d - 1)))"
    fi
    echo "process $i: env LLAMAHOME_COORDINATOR=127.0.0.1:$port LLAMAHOME_NUM_PROCESSES=$num_processes LLAMAHOME_PROCESS_ID=$i$ids"
    echo "process $i: $python -m llamahome.launch$(printf ' %q' "$@")"
  done
  exit 0
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  if [[ -n "${LLAMAHOME_DEVICES_PER_PROCESS:-}" ]]; then
    d=$LLAMAHOME_DEVICES_PER_PROCESS
    export LLAMAHOME_LOCAL_DEVICE_IDS=$(seq -s, $((i * d)) $((i * d + d - 1)))
  fi
  LLAMAHOME_COORDINATOR="127.0.0.1:$port" LLAMAHOME_NUM_PROCESSES=$num_processes \
    LLAMAHOME_PROCESS_ID=$i "$python" -m llamahome.launch "$@" &
  pids+=($!)
done

signal_all() {  # signal_all SIGNAL: to every process still running
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}

interrupted=0
on_interrupt() {
  if ((interrupted)); then
    echo "local.sh: killing all $num_processes processes" >&2
    signal_all KILL
  else
    interrupted=1
    echo "local.sh: stopping all $num_processes processes (they save a checkpoint; Ctrl-C again to kill)" >&2
    signal_all TERM
  fi
}
trap on_interrupt INT TERM

killer=
trap '[[ -n "$killer" ]] && kill "$killer" 2>/dev/null' EXIT
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  unset done_pid
  wait -n -p done_pid "${running[@]}"
  code=$?
  if [[ -z "${done_pid:-}" ]]; then
    continue  # a trapped signal interrupted the wait
  fi
  still=()
  for pid in "${running[@]}"; do [[ $pid != "$done_pid" ]] && still+=("$pid"); done
  running=("${still[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    if ((${#running[@]} > 0)); then
      echo "local.sh: a process exited with status $code; stopping the other ${#running[@]}" >&2
      signal_all TERM  # one blocked in a collective cannot act on it: kill after a grace period
      (sleep "${LLAMAHOME_KILL_GRACE_S:-10}" && signal_all KILL) &
      killer=$!
    fi
  fi
done
exit "$status"
