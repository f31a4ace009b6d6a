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
# Every host must have the same checkout, virtualenv and data paths (e.g. a GCS-fused or
# NFS runs dir, so that checkpoints written by all hosts land in one place). Ctrl-C stops the
# ssh sessions; `--worker=all` runs them in parallel and returns when all have finished.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the pod slice name}"
: "${ZONE:?set ZONE to the pod slice zone}"
repo_dir=${REPO_DIR:-'~/llamahome'}
venv=${VENV:-"$repo_dir/.venv"}
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")

args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_flag[@]}" --worker=all \
  --command "cd $repo_dir && source $venv/bin/activate && python -m llamahome.launch$args"
