"""Child processes that are SIGKILLed at the worst moment, for the crash-safety tests.

Run as `python -m tests.helpers.crash_child MODE ...` (see `run_child`): MODE `checkpoint` trains the toy task
and dies while Orbax commits a checkpoint (test_checkpoint.py); MODE `sample` samples from a DiT export and
dies half-way through a PNG (test_generate.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import ml_collections
from etils import epath

from tests.conftest import REPO_ROOT
from tests.helpers import tiny_configs, toy_task
from xray_dit import generate
from xray_dit.train import loop


TOY_STEPS, TOY_EVERY, KILLED_SAVE = 20, 5, 10
SAMPLE_COUNT, SAMPLE_BATCH = 20, 8          # three batches on the 8 fake devices: 8, 8, 4 images
PNG_WRITES_BEFORE_KILL = 11                 # batch 0 whole and listed, 3 of batch 1, the 4th half-written


def run_child(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.helpers.crash_child", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def png_write_hook(after: int, fail):
    """(class, name, replacement) for `setattr`: the first `after` PNG writes succeed; the next one writes half
    its bytes (what a dying process or a full disk leaves) and then calls `fail`."""
    path_class = type(epath.Path("/"))
    original = path_class.write_bytes
    count = [0]

    def write_bytes(self, data):
        if self.name.endswith(".png.partial"):
            count[0] += 1
            if count[0] > after:
                original(self, data[: len(data) // 2])
                fail()
        return original(self, data)
    return path_class, "write_bytes", write_bytes


def _kill_me():
    os.kill(os.getpid(), signal.SIGKILL)


def sample_config() -> ml_collections.ConfigDict:
    config = tiny_configs.tiny_config()
    config.data.image_size = 32       # the f8 VAE → 4x4 latents, DiT patch 2
    config.mesh.shape = (-1, 1, 1)
    config.sample.update(num_images=SAMPLE_COUNT, batch_size=SAMPLE_BATCH, num_steps=2)
    return config


def _child_checkpoint(workdir: str) -> None:
    """The toy run, SIGKILLed by Orbax's background thread just before it commits (renames) step 10."""
    # Orbax's private commit step: the only place where "written but not yet complete" is certain.
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_then_die(self, *args, **kwargs):
        if self.get_final().name == str(KILLED_SAVE):
            _kill_me()
        return await finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_die
    config = toy_task.toy_config(steps=TOY_STEPS, checkpoint_every=TOY_EVERY)
    loop.train(config, workdir, toy_task.toy_task(config))


def _child_sample(dit_dir: str, out: str) -> None:
    path_class, name, hook = png_write_hook(PNG_WRITES_BEFORE_KILL, _kill_me)
    setattr(path_class, name, hook)
    generate.sample(sample_config(), epath.Path(out).parent, dit_dir=dit_dir, out_dir=out)


def _child_main(argv):
    # tests.conftest, imported above, has set the 8 fake devices and marked absl's flags parsed.
    {"checkpoint": _child_checkpoint, "sample": _child_sample}[argv[0]](*argv[1:])
    raise SystemExit("the child was meant to be killed, but it finished")


if __name__ == "__main__":
    _child_main(sys.argv[1:])
