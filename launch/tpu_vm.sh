#!/usr/bin/env bash
# Runs an xray-dit config on a Cloud TPU VM (one host or a multi-host slice). See launch/README.md.
set -euo pipefail

readonly SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
# jax.distributed's coordinator port on Cloud TPU (the one JAX's own TPU cluster detection uses).
readonly COORDINATOR_PORT=8482
readonly REMOTE_REPO='~/xray-dit'
readonly REMOTE_VENV='~/xray-dit-venv'

usage() {
  cat <<'EOF'
Usage:
  launch/tpu_vm.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=gs://BUCKET/PATH [options] [-- MAIN_ARGS...]
  launch/tpu_vm.sh --name=NAME --zone=ZONE --delete [--project=PROJECT] [--dry-run]

Creates a Cloud TPU VM, copies this repository to every worker, installs it with jax[tpu], and runs
the same `python -m xray_dit.main --config=CONFIG --workdir=gs://...` on all workers at once.
Arguments after `--` go to xray_dit.main unchanged (e.g. --config.dit.train.steps=1000).
Rerunning with --skip-create --skip-setup resumes the run from its last checkpoint in the workdir.

Required:
  --name=NAME                 TPU VM name
  --zone=ZONE                 e.g. us-west4-a (must offer the accelerator type)
  --config=CONFIG             config file, relative to the repository root, e.g. configs/dit_base.py
  --workdir=gs://BUCKET/PATH  output folder; a bucket, because every worker writes there and the VM is temporary
Options:
  --accelerator-type=TYPE     default v5litepod-16 (4 hosts x 4 chips)
  --runtime-version=VERSION   TPU software version, default v2-alpha-tpuv5-lite (matches v5e)
  --project=PROJECT           Google Cloud project (default: gcloud's configured project)
  --spot                      create a Spot TPU VM (cheaper, preemptible; rerun to resume)
  --python=VERSION            Python for the venv on the workers, default 3.11
  --skip-create               use an existing TPU VM of that name
  --skip-setup                the code is already copied and installed on the workers
  --tensorboard               serve TensorBoard locally from the gs:// workdir while the run goes
                              (needs `pip install tensorboard gcsfs` here)
  --tensorboard-port=PORT     default 6006
  --delete-after              delete the TPU VM when the run ends, whether it succeeded or not
  --delete                    only delete the TPU VM
  --dry-run                   print every command instead of running it (also: DRY_RUN=1)
  -h, --help                  this text
EOF
}

die() {
  echo "error: $*" >&2
  echo "Run launch/tpu_vm.sh --help for the options." >&2
  exit 2
}

# Prints its arguments as one line a shell reads back into the same arguments (`--opt='value'` keeps
# the option name readable).
quote() {
  local arg words=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      words+=("$arg")
    elif [[ $arg =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      words+=("${BASH_REMATCH[1]}'$(single_quote_body "${BASH_REMATCH[2]}")'")
    else
      words+=("'$(single_quote_body "$arg")'")
    fi
  done
  printf '%s\n' "${words[*]}"
}

single_quote_body() {
  printf '%s' "${1//\'/\'\\\'\'}"
}

run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# A heading between the commands of a dry run.
step() {
  [[ $DRY_RUN == 0 ]] || echo "# $*"
}

# A pipeline or compound command, given as one string.
run_shell() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$1"
  else
    echo "+ $1" >&2
    bash -c "set -euo pipefail; $1"
  fi
}

NAME="" ZONE="" CONFIG="" WORKDIR="" PROJECT=""
ACCELERATOR_TYPE="v5litepod-16" RUNTIME_VERSION="v2-alpha-tpuv5-lite" PYTHON_VERSION="3.11"
SPOT=0 SKIP_CREATE=0 SKIP_SETUP=0 TENSORBOARD=0 TENSORBOARD_PORT=6006 DELETE_AFTER=0 DELETE_ONLY=0
DRY_RUN="${DRY_RUN:-0}"
MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --python=*) PYTHON_VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip-create) SKIP_CREATE=1 ;;
    --skip-setup) SKIP_SETUP=1 ;;
    --tensorboard) TENSORBOARD=1 ;;
    --tensorboard-port=*) TENSORBOARD_PORT="${1#*=}" ;;
    --delete-after) DELETE_AFTER=1 ;;
    --delete) DELETE_ONLY=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (arguments for xray_dit.main go after '--')" ;;
  esac
  shift
done
[[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || die "DRY_RUN must be 0 or 1, got '$DRY_RUN'"

[[ -n $NAME ]] || die "missing --name=NAME: the name of the TPU VM to create (or use, or delete)"
[[ -n $ZONE ]] || die "missing --zone=ZONE, e.g. --zone=us-west4-a (a zone that offers $ACCELERATOR_TYPE)"
GCLOUD_SCOPE=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_SCOPE+=(--project="$PROJECT")

if [[ $DRY_RUN == 0 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or use --dry-run"
fi

delete_vm() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_SCOPE[@]}" --quiet
}

if [[ $DELETE_ONLY == 1 ]]; then
  delete_vm
  exit 0
fi

[[ -n $CONFIG ]] || die "missing --config=CONFIG, e.g. --config=configs/dit_base.py"
[[ -f $REPO_DIR/${CONFIG%%:*} ]] || die "config file '${CONFIG%%:*}' not found in $REPO_DIR (give it relative to the repository root)"
[[ -n $WORKDIR ]] || die "missing --workdir=gs://BUCKET/PATH: where checkpoints, TensorBoard and results go"
[[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path (got '$WORKDIR'): every TPU worker writes to it, and the VM's disks go away with the VM"
JAX_VERSION="$(sed -n 's/^jax==//p' "$REPO_DIR/requirements.txt")"
[[ -n $JAX_VERSION ]] || die "requirements.txt does not pin jax (jax==VERSION), so jax[tpu] cannot be matched to it"

cleanup() {
  [[ -z ${TENSORBOARD_PID:-} ]] || kill "$TENSORBOARD_PID" 2>/dev/null || true
  if [[ $DELETE_AFTER == 1 ]]; then
    delete_vm
  fi
}
trap cleanup EXIT

# ---- 1. The TPU VM ---------------------------------------------------------------------------------
if [[ $SKIP_CREATE == 0 ]]; then
  step "1. create the TPU VM"
  create=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_SCOPE[@]}" --accelerator-type="$ACCELERATOR_TYPE"
          --version="$RUNTIME_VERSION")
  [[ $SPOT == 0 ]] || create+=(--spot)
  run "${create[@]}"
fi

# Worker 0 hosts jax.distributed's coordinator. Setting its address is also what makes
# `sharding.maybe_initialize_distributed()` call `jax.distributed.initialize()`, which then reads the
# process count and index from the TPU metadata.
step "2. the coordinator: worker 0's internal IP"
if [[ $DRY_RUN == 1 ]]; then
  run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_SCOPE[@]}" '--format=value(networkEndpoints[0].ipAddress)'
  WORKER0_IP="WORKER0_IP"
else
  WORKER0_IP="$(run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_SCOPE[@]}" \
                '--format=value(networkEndpoints[0].ipAddress)')"
  [[ -n $WORKER0_IP ]] || die "could not read worker 0's IP address of TPU VM $NAME"
fi

# ---- 2. Code and dependencies on every worker --------------------------------------------------------
if [[ $SKIP_SETUP == 0 ]]; then
  step "3. pack the repository (tracked and new files, not ignored ones) and copy it to all workers"
  ARCHIVE="${TMPDIR:-/tmp}/xray-dit-$NAME.tar.gz"
  run_shell "cd $(quote "$REPO_DIR") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $(quote "$ARCHIVE") -T -"
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:xray-dit.tar.gz" "${GCLOUD_SCOPE[@]}" --worker=all

  # TPU VM images ship an older system Python; uv provides the one this project needs.
  step "4. install on all workers: a Python $PYTHON_VERSION venv, requirements.txt, jax[tpu]"
  setup="set -euo pipefail"
  setup+=" && rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf ~/xray-dit.tar.gz -C $REMOTE_REPO"
  setup+=" && export PATH=\$HOME/.local/bin:\$PATH"
  setup+=" && { command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  setup+=" && rm -rf $REMOTE_VENV && uv venv --seed --python $(quote "$PYTHON_VERSION") $REMOTE_VENV"
  setup+=" && $REMOTE_VENV/bin/pip install -r $REMOTE_REPO/requirements.txt"
  setup+=" && $REMOTE_VENV/bin/pip install -U \"jax[tpu]==$JAX_VERSION\""
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker=all --command="$setup"
fi

# ---- 3. TensorBoard, read straight from the bucket ------------------------------------------------
if [[ $TENSORBOARD == 1 ]]; then
  step "5. TensorBoard on http://localhost:$TENSORBOARD_PORT while the run goes (background)"
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(quote tensorboard --logdir="$WORKDIR" --port="$TENSORBOARD_PORT") &"
  else
    command -v tensorboard >/dev/null || die "tensorboard not found: pip install tensorboard gcsfs (gcsfs lets it read gs://)"
    echo "+ $(quote tensorboard --logdir="$WORKDIR" --port="$TENSORBOARD_PORT") &" >&2
    tensorboard --logdir="$WORKDIR" --port="$TENSORBOARD_PORT" >&2 &
    TENSORBOARD_PID=$!
  fi
fi

# ---- 4. The run: the same command on every worker -------------------------------------------------
step "6. run on all workers at once"
main_cmd="$(quote python -m xray_dit.main --config="$CONFIG" --workdir="$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})"
remote="cd $REMOTE_REPO && source $REMOTE_VENV/bin/activate"
remote+=" && export JAX_COORDINATOR_ADDRESS=$WORKER0_IP:$COORDINATOR_PORT && $main_cmd"
run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_SCOPE[@]}" --worker=all --command="$remote"
[[ $DELETE_AFTER == 0 ]] || step "7. delete the TPU VM (on exit)"
