#!/usr/bin/env bash
# A Slurm job array of hpo workers: every array task joins the same study.
#
#   export HPO_STORAGE='postgresql://hpo:PASSWORD@dbhost:5432/hpo'   # read by hpo run
#   export MLFLOW_TRACKING_URI='http://mlflow-host:5000'             # read by hpo run
#   export HPO_DATA_DIR=/shared/data                                 # MNIST's IDX files
#   sbatch deploy/slurm.sh search_spaces/mnist.yaml
#
# The password stays in the environment (not on the command line, where `ps` shows it). Each
# task runs HPO_WORKERS trials at once on its node (default 1 per GPU); n_trials in the spec is
# the total across all of them. A pre-empted task loses only its running trials: the others fail
# them by heartbeat after 2 minutes and run their configurations again.
#SBATCH --job-name=hpo
#SBATCH --array=0-7
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --output=hpo-%A_%a.out
set -euo pipefail
: "${HPO_STORAGE:?set HPO_STORAGE to the PostgreSQL URL of the study}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to the MLflow server}"
spec="${1:-search_spaces/mnist.yaml}"
workers=()
[ -n "${HPO_WORKERS:-}" ] && workers=(--workers "$HPO_WORKERS")
srun hpo run "$spec" "${workers[@]}"
