"""The launch scripts: syntax, dry runs (what they would run), real runs against fake gcloud/srun, usage errors."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import REPO_ROOT

TPU_SCRIPT = REPO_ROOT / "launch" / "tpu_vm.sh"
SLURM_SCRIPT = REPO_ROOT / "launch" / "slurm_gpu.sbatch"
CONFIG, GS_WORKDIR, SHARED_WORKDIR = "configs/dit_base.py", "gs://bucket/runs/dit", "/shared/runs/dit"
OVERRIDES = ["--config.dit.train.steps=10", "--config.mesh.shape=(1,-1,1)"]
MAIN = ["python", "-m", "xray_dit.main", f"--config={CONFIG}"]
TPU_REQUIRED = ["--name=xr-tpu", "--zone=us-west4-a", f"--config={CONFIG}", f"--workdir={GS_WORKDIR}"]
FAKE_IP = "10.128.0.7"

# Records its arguments (and what the scripts set up for it) as one JSON line per call.
FAKE_TOOL = f"""#!{sys.executable}
import json, os, sys, time
name = os.path.basename(sys.argv[0])
record = {{"tool": name, "args": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_PLATFORMS")}}}}
with open(os.environ["FAKE_TOOL_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
if name == "gcloud" and "describe" in sys.argv:
    print("{FAKE_IP}")
if name == "gcloud" and any("xray_dit.main" in a for a in sys.argv) and os.path.exists(
        os.path.join(os.path.dirname(sys.argv[0]), "tensorboard")):
    # The real run lasts long enough for a TensorBoard started before it to come up: wait for the fake one to
    # have started, or the launcher's exit could stop it before it recorded its call.
    deadline = time.time() + 30
    while time.time() < deadline and '"tool": "tensorboard"' not in open(os.environ["FAKE_TOOL_LOG"]).read():
        time.sleep(0.05)
if name == "scontrol":
    print("headnode\\nsecondnode")
if name == "tensorboard":
    time.sleep(120)   # a server: the launcher must stop it when it exits
"""


def _env(tmp_path, fake_tools=(), **extra):
    """The caller's environment without any SLURM job or DRY_RUN, with fake tools first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "DRY_RUN"}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in fake_tools:
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_TOOL_LOG=str(tmp_path / "calls.jsonl"),
               TMPDIR=str(tmp_path), **extra)
    return env


def _run(script, *args, env, timeout=60):
    return subprocess.run(["bash", str(script), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _calls(tmp_path):
    log = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _commands(stdout):
    """The dry run's commands (comment lines dropped), each split as a shell would split it."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _remote_command(argv):
    return next(a for a in argv if a.startswith("--command=")).split("=", 1)[1]


def _and_list(command):
    """`a && b && c` → [[a...], [b...], [c...]] (the remote commands joined with &&)."""
    parts, current = [], []
    for token in shlex.split(command):
        if token == "&&":
            parts.append(current)
            current = []
        else:
            current.append(token)
    return parts + [current]


def _jax_version():
    return re.search(r"^jax==(\S+)$", (REPO_ROOT / "requirements.txt").read_text(), re.M).group(1)


@pytest.mark.parametrize("script", [TPU_SCRIPT, SLURM_SCRIPT], ids=["tpu_vm", "slurm_gpu"])
def test_scripts_are_valid_bash_and_have_help(script, tmp_path):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    shown = _run(script, "--help", env=_env(tmp_path))
    assert shown.returncode == 0 and "--config=CONFIG" in shown.stdout and "--dry-run" in shown.stdout


# --------------------------------------------------------------------------------------------------
# Cloud TPU VM
# --------------------------------------------------------------------------------------------------
def test_tpu_dry_run_creates_copies_installs_and_runs_the_same_command_on_all_workers(tmp_path):
    result = _run(TPU_SCRIPT, "--dry-run", *TPU_REQUIRED, "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                  "--spot", "--tensorboard", "--delete-after", "--", *OVERRIDES, env=_env(tmp_path, ["gcloud"]))
    assert result.returncode == 0, result.stderr
    assert _calls(tmp_path) == [], "a dry run must not run gcloud"
    commands = _commands(result.stdout)
    gcloud = [c[4:] for c in commands if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    assert [c[0] for c in gcloud] == ["create", "describe", "scp", "ssh", "ssh", "delete"]
    create, _, scp, install, run, delete = gcloud
    assert create == ["create", "xr-tpu", "--zone=us-west4-a", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]
    archive = str(tmp_path / "xray-dit-xr-tpu.tar.gz")
    assert scp == ["scp", archive, "xr-tpu:xray-dit.tar.gz", "--zone=us-west4-a", "--worker=all"]
    pack = next(c for c in commands if "tar" in c)
    assert "ls-files" in pack and archive in pack

    assert "--worker=all" in install
    setup = _and_list(_remote_command(install))
    assert ["tar", "-xzf", "~/xray-dit.tar.gz", "-C", "~/xray-dit"] in setup
    assert ["~/xray-dit-venv/bin/pip", "install", "-r", "~/xray-dit/requirements.txt"] in setup
    assert ["~/xray-dit-venv/bin/pip", "install", "-U", f"jax[tpu]=={_jax_version()}"] in setup

    assert "--worker=all" in run
    remote = _and_list(_remote_command(run))
    assert remote[-1] == MAIN + [f"--workdir={GS_WORKDIR}", *OVERRIDES]
    assert ["export", "JAX_COORDINATOR_ADDRESS=WORKER0_IP:8482"] in remote

    assert ["tensorboard", f"--logdir={GS_WORKDIR}", "--port=6006"] in [c[:3] for c in commands]
    assert delete == ["delete", "xr-tpu", "--zone=us-west4-a", "--quiet"]


def test_tpu_dry_run_by_environment_variable_matches_the_flag(tmp_path):
    by_flag = _run(TPU_SCRIPT, "--dry-run", *TPU_REQUIRED, env=_env(tmp_path))
    by_env = _run(TPU_SCRIPT, *TPU_REQUIRED, env=_env(tmp_path, DRY_RUN="1"))
    assert by_flag.returncode == by_env.returncode == 0, by_env.stderr
    assert by_env.stdout == by_flag.stdout and "tpu-vm create" in by_env.stdout


def test_tpu_real_run_executes_exactly_the_dry_run_commands(tmp_path):
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("the launcher packs the repository with git ls-files; this checkout is not a git repository")
    args = [*TPU_REQUIRED, "--project=my-project", "--tensorboard", "--delete-after", "--", *OVERRIDES]
    env = _env(tmp_path, ["gcloud", "tensorboard"])
    planned = _run(TPU_SCRIPT, "--dry-run", *args, env=env)
    real = _run(TPU_SCRIPT, *args, env=env)   # hangs (→ timeout) if it failed to stop TensorBoard
    assert planned.returncode == 0 and real.returncode == 0, real.stderr
    calls = _calls(tmp_path)
    expected_gcloud = [[a.replace("WORKER0_IP", FAKE_IP) for a in c[1:]]
                       for c in _commands(planned.stdout) if c[0] == "gcloud"]
    assert [c["args"] for c in calls if c["tool"] == "gcloud"] == expected_gcloud
    assert all("--project=my-project" in args for args in expected_gcloud)
    assert [c["args"] for c in calls if c["tool"] == "tensorboard"] == [[f"--logdir={GS_WORKDIR}", "--port=6006"]]
    with tarfile.open(tmp_path / "xray-dit-xr-tpu.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"xray_dit/main.py", "requirements.txt", CONFIG} <= names
    assert not any(n.startswith(("test_artifacts/", ".git/", "workdir")) for n in names)


def test_tpu_delete_only_deletes(tmp_path):
    result = _run(TPU_SCRIPT, "--dry-run", "--name=xr-tpu", "--zone=us-west4-a", "--delete", env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert _commands(result.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "xr-tpu",
                                         "--zone=us-west4-a", "--quiet"]]


@pytest.mark.parametrize("drop, add, message", [
    ("--name=xr-tpu", [], "missing --name"),
    ("--zone=us-west4-a", [], "missing --zone"),
    (f"--config={CONFIG}", [], "missing --config"),
    (f"--workdir={GS_WORKDIR}", [], "missing --workdir"),
    (f"--workdir={GS_WORKDIR}", ["--workdir=/tmp/run"], "must be a gs:// path"),
    (f"--config={CONFIG}", ["--config=configs/nope.py"], "'configs/nope.py' not found"),
    (None, ["--acelerator-type=v4-8"], "unknown option '--acelerator-type=v4-8'"),
])
def test_tpu_usage_errors_are_clear(tmp_path, drop, add, message):
    args = [a for a in TPU_REQUIRED if a != drop] + add
    result = _run(TPU_SCRIPT, "--dry-run", *args, env=_env(tmp_path, ["gcloud"]))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == "" and _calls(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------------
SRUN = ["srun", "--kill-on-bad-exit=1", *MAIN, f"--workdir={SHARED_WORKDIR}", *OVERRIDES]
SLURM_ARGS = [f"--config={CONFIG}", f"--workdir={SHARED_WORKDIR}", "--", *OVERRIDES]
IN_JOB = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8",
              SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO_ROOT))


def _exports(stdout):
    return dict(c[1].split("=", 1) for c in _commands(stdout) if c[0] == "export")


def test_sbatch_asks_for_one_task_per_gpu_with_all_node_gpus_visible():
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SLURM_SCRIPT.read_text(), re.M))
    assert header["ntasks-per-node"] == header["gpus-per-node"]
    assert "gpus-per-task" not in header   # it would hide the node's other GPUs from JAX's SLURM detection


def test_slurm_dry_run_outside_slurm_prints_environment_and_srun(tmp_path):
    if shutil.which("scontrol"):
        pytest.skip("scontrol is installed here, so the dry run asks it instead of parsing the node list")
    result = _run(SLURM_SCRIPT, "--dry-run", *SLURM_ARGS, env=_env(tmp_path, ["srun"]))
    assert result.returncode == 0, result.stderr
    assert _calls(tmp_path) == [], "a dry run must not run srun"
    commands = _commands(result.stdout)
    assert commands[-1] == SRUN
    assert ["cd", str(REPO_ROOT)] in commands
    assert _exports(result.stdout) == {"JAX_COORDINATOR_ADDRESS": "node001:20000", "JAX_PLATFORMS": "cuda"}


@pytest.mark.parametrize("nodelist, head", [("gpu[07-09,12],cpu3", "gpu07"), ("a1,a2", "a1"), ("solo", "solo")])
def test_slurm_dry_run_reads_the_first_node_of_a_node_list(tmp_path, nodelist, head):
    if shutil.which("scontrol"):
        pytest.skip("scontrol is installed here, so the dry run asks it instead of parsing the node list")
    env = _env(tmp_path, **dict(IN_JOB, SLURM_JOB_NODELIST=nodelist))
    result = _run(SLURM_SCRIPT, "--dry-run", *SLURM_ARGS, env=env)
    assert result.returncode == 0, result.stderr
    assert _exports(result.stdout)["JAX_COORDINATOR_ADDRESS"] == f"{head}:24242"


def test_slurm_job_runs_srun_with_coordinator_from_scontrol(tmp_path):
    env = _env(tmp_path, ["scontrol", "srun"], **IN_JOB)
    planned = _run(SLURM_SCRIPT, "--dry-run", "--port=31337", *SLURM_ARGS, env=env)
    assert planned.returncode == 0, planned.stderr
    assert _exports(planned.stdout)["JAX_COORDINATOR_ADDRESS"] == "headnode:31337"
    assert [c["tool"] for c in _calls(tmp_path)] == ["scontrol"]

    real = _run(SLURM_SCRIPT, "--port=31337", *SLURM_ARGS, env=env)
    assert real.returncode == 0, real.stderr
    scontrol, srun = _calls(tmp_path)[1:]
    assert scontrol["args"] == ["show", "hostnames", "gpu[07-08]"]
    assert ["srun", *srun["args"]] == _commands(planned.stdout)[-1] == SRUN
    assert srun["cwd"] == str(REPO_ROOT)
    assert srun["env"] == {"JAX_COORDINATOR_ADDRESS": "headnode:31337", "JAX_PLATFORMS": "cuda"}


@pytest.mark.parametrize("args, job, message", [
    ([f"--workdir={SHARED_WORKDIR}"], IN_JOB, "missing --config"),
    ([f"--config={CONFIG}"], IN_JOB, "missing --workdir"),
    (SLURM_ARGS, {}, "not inside a SLURM job"),
    (SLURM_ARGS, dict(IN_JOB, SLURM_NTASKS_PER_NODE="1"), "submit with --ntasks-per-node=8"),
    (SLURM_ARGS, dict(IN_JOB, SLURM_SUBMIT_DIR="/"), "not the xray-dit repository root"),
])
def test_slurm_usage_errors_are_clear(tmp_path, args, job, message):
    result = _run(SLURM_SCRIPT, *args, env=_env(tmp_path, ["scontrol", "srun"], **job))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "srun" not in [c["tool"] for c in _calls(tmp_path)]
