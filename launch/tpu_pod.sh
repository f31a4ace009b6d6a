#!/usr/bin/env bash
# Runs one `python -m llamahome.launch` command on every host of a Cloud TPU pod slice
# (gcloud compute tpus tpu-vm ssh --worker=all). JAX finds the coordinator, the process count
# and each host's id itself on Cloud TPU, so the command is the same as on one machine.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --gin_file=gin/train/my_recipe.gin
#
# Variables:
#   TPU_NAME   the TPU VM / pod slice name                                    (required)
#   ZONE       its zone                                                        (required)
#   PROJECT    the Google Cloud project (default: gcloud's configured one)
#   REPO_DIR   where the repository is checked out on every host (default: ~/llamahome)
#   VENV       the virtualenv to activate on every host (default: $REPO_DIR/.venv)
#   LLAMAHOME_DRY_RUN=1  print the gcloud command and what each worker would run, with the
#              environment it runs under, and run nothing (no gcloud needed). The worker
#              count comes from ACCELERATOR_TYPE (e.g. v5p-64: 4 chips per host for v4/v5p,
#              8 for v5e/v6e) or WORKERS.
# Every host must have the same checkout, virtualenv and data paths (e.g. a GCS-fused or
# NFS runs dir, so that checkpoints written by all hosts land in one place). Ctrl-C stops the
# ssh sessions; `--worker=all` runs them in parallel and returns when all have finished.
#
# Plan first (README "Pods"): the same gin files with gin/jobs/plan.gin last and
# plan.topology set to the slice's accelerator type compile the run on your own machine and
# say whether it fits, before the slice is paid for.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the pod slice name}"
: "${ZONE:?set ZONE to the pod slice zone}"
repo_dir=${REPO_DIR:-'~/llamahome'}
venv=${VENV:-"$repo_dir/.venv"}
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")

args=$(printf ' %q' "$@")
command="cd $repo_dir && source $venv/bin/activate && python -m llamahome.launch$args"

# Hosts of a slice: N / 8 either way (rounded up): v4-N / v5p-N count TensorCores (2 per
# chip, 4 chips per host); v5e-N / v6e-N (v5litepod-N) count chips, 8 per host.
workers_of() {
  local type=$1 n=${1##*-}
  case "$type" in
    v4-*|v5p-*|v5e-*|v5litepod-*|v6e-*) echo $(( (n + 7) / 8 )) ;;
    *) echo "tpu_pod.sh: ACCELERATOR_TYPE=$type is not v4-N, v5p-N, v5e-N or v6e-N; set WORKERS" >&2
       return 2 ;;
  esac
}

if [[ "${LLAMAHOME_DRY_RUN:-0}" == 1 ]]; then
  if [[ -n "${WORKERS:-}" ]]; then
    workers=$WORKERS
  elif [[ -n "${ACCELERATOR_TYPE:-}" ]]; then
    workers=$(workers_of "$ACCELERATOR_TYPE")
  else
    echo "tpu_pod.sh: a dry run needs ACCELERATOR_TYPE (e.g. v5p-64) or WORKERS" >&2
    exit 2
  fi
  echo "dry run: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE ${project_flag[*]:+${project_flag[*]} }--worker=all --command <below>"
  for ((i = 0; i < workers; i++)); do
    # JAX reads the coordinator, process count and id from the TPU VM's metadata itself.
    echo "worker $i: env TPU_WORKER_ID=$i (from the TPU VM's metadata; process $i of $workers)"
    echo "worker $i: $command"
  done
  exit 0
fi

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" --worker=all \
  --command "$command"
