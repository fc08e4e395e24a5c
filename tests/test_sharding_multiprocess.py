"""Two CPU processes (gloo collectives) train the tiny DiT with the real loop exactly like one process.

The workers get the environment `srun` gives each task plus the JAX_COORDINATOR_ADDRESS that
launch/slurm_gpu.sbatch exports, so they join through `sharding.maybe_initialize_distributed()`, as
`xray_dit.main` does on a cluster. Parameters are FSDP-sharded over the devices of both processes, so
each process writes only its part of every checkpoint.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import multiprocess_worker as worker
from xray_dit import checkpoint as ckpt_lib
from xray_dit import sharding
from xray_dit.train import loop

WORKER = REPO_ROOT / "tests" / "helpers" / "multiprocess_worker.py"
NUM_PROCESSES, DEVICES_PER_PROCESS, STEPS = 2, 2, 4
TIMEOUT_S = 300   # generous: the 2 shared CPU cores may be busy; a healthy run takes well under a minute


def _srun_like_env(process_id: int, port: int) -> dict:
    """What srun gives task `process_id` of a one-node job, plus what launch/slurm_gpu.sbatch exports."""
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(NUM_PROCESSES),
        "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id),
    })
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(workdir) -> dict[int, list[float]]:
    from tests.helpers.events import read_events
    losses: dict[int, list[float]] = {}
    for event in read_events(workdir / "tensorboard"):
        for value in event.summary.value:
            if value.tag == "dit/train/loss":
                losses.setdefault(event.step, []).append(value.simple_value)
    return losses


def _one_process_reference(workdir):
    """The same run on 4 of this process's devices, its batches in the order two processes assemble them."""
    config = worker.tiny_config(STEPS)
    data = worker.latent_data(int(config.dit.train.batch_size), seed=int(config.seed),
                              as_process_count=NUM_PROCESSES)
    mesh = sharding.make_mesh(worker.MESH_SHAPE, devices=jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS])
    return loop.train(config, workdir, worker.tiny_dit_task(config, data), mesh=mesh)


def test_process_global_order_matches_strided_sharding():
    stream = np.arange(8)
    local = [stream[p::2] for p in range(2)]           # what process p reads of one global batch of 8
    np.testing.assert_array_equal(np.concatenate(local), stream[worker.process_global_order(8, 2)])


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_four_devices(tmp_path):
    port = _free_port()
    shared_workdir = tmp_path / "two_processes"
    logs = [tmp_path / f"process_{i}.log" for i in range(NUM_PROCESSES)]
    procs = []
    for i in range(NUM_PROCESSES):
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(shared_workdir), str(STEPS)],
                                          cwd=REPO_ROOT, env=_srun_like_env(i, port), stdout=log,
                                          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        reference = _one_process_reference(tmp_path / "one_process")   # runs while the workers do
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two processes did not finish within {TIMEOUT_S}s (a gloo/coordinator hang?):\n"
                    + "\n".join(f"--- process {i}:\n{logs[i].read_text()[-3000:]}" for i in range(NUM_PROCESSES)))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [log.read_text() for log in logs]
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{output[-5000:]}"
        assert f"process {i}/{NUM_PROCESSES}: finished at step {STEPS} with 4 devices" in output, output[-2000:]

    two, one = _losses(shared_workdir), _losses(tmp_path / "one_process")
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert len(two[step]) == 1, f"step {step} logged {len(two[step])} times: only process 0 may write TensorBoard"
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5), f"step {step}"

    # The checkpoint both processes wrote, each its own shards, restores whole and equals the reference.
    checkpointer = ckpt_lib.Checkpointer(shared_workdir / "checkpoints", every_steps=0)
    try:
        assert checkpointer.all_steps() == [2, STEPS]
        restored, step = checkpointer.restore(reference)
    finally:
        checkpointer.close()
    assert step == STEPS and int(restored["step"]) == STEPS
    for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(reference["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
