"""Test set-up: 8 fake CPU devices (set before JAX is imported) and parsed absl flags (Grain needs them)."""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
import pytest  # noqa: E402

flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(path: pathlib.Path, what: str) -> pathlib.Path:
    """`path` when it exists. Otherwise the test skips, saying why; under CI (the variable CI set) it fails
    instead, because CI always has ../shared and the configs, so a missing one there is breakage, not
    an optional extra."""
    if path.exists():
        return path
    message = f"{what} not found at {path}"
    if in_ci():
        pytest.fail(f"{message}; CI is set, where it must be present")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """`../shared` beside the project root; tests that need it skip, saying why, when it is absent (fail under CI)."""
    return require(SHARED, "reference material (the ../shared folder beside the project root)")


@pytest.fixture(scope="session")
def golden_dir(shared_dir) -> pathlib.Path:
    return require(shared_dir / "golden", "golden reference tensors")


@pytest.fixture(scope="session")
def nih_sample_dir(shared_dir) -> pathlib.Path:
    return require(shared_dir / "data" / "nih_sample", "real NIH sample")


@pytest.fixture
def artifacts_dir(request) -> pathlib.Path:
    """Where tests save pictures for a human to look at (kept after the run)."""
    path = REPO_ROOT / "test_artifacts" / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- Tiny trained models, made once per session: the trainer and generation tests share them ----------
@pytest.fixture(scope="session")
def phantom_data_dir(tmp_path_factory) -> pathlib.Path:
    """The 300-image phantom, prepared into one data dir."""
    from tests.helpers import tiny_configs
    directory = tmp_path_factory.mktemp("tfds")
    tiny_configs.prepare_phantom(directory)
    return directory


@pytest.fixture(scope="session")
def trained_vae(tmp_path_factory, phantom_data_dir):
    """(workdir, config, result). One device: the VAE's conv backward pass compiles several times slower
    partitioned 8 ways on CPU; the classifier and DiT runs cover the 8-device paths of the same loop. The DiT
    then reads an export saved from another mesh than its own, as when the VAE was trained elsewhere."""
    import jax
    from tests.helpers import tiny_configs
    from xray_dit import sharding
    from xray_dit.train import vae
    workdir = tmp_path_factory.mktemp("vae")
    config = tiny_configs.tiny_config(phantom_data_dir)
    config.task = "train_vae"
    result = vae.train_vae(config, workdir, mesh=sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    return workdir, config, result


@pytest.fixture(scope="session")
def trained_dit(tmp_path_factory, trained_vae):
    """(workdir, config, result) of the tiny DiT on an FSDP mesh (1, 8, 1), loss logged at every step."""
    from tests.helpers import tiny_configs
    from xray_dit.train import dit
    workdir = tmp_path_factory.mktemp("dit")
    config = tiny_configs.tiny_config(trained_vae[1].data.data_dir)
    config.task = "train_dit"
    config.mesh.shape = (1, 8, 1)
    config.dit.train.log_every = 1
    result = dit.train_dit(config, workdir, vae_dir=str(trained_vae[0] / "export"))
    return workdir, config, result


# ---- Order for two workers (pytest-xdist, --dist loadfile: a file's tests stay on one worker) ------------
# The micro study's module fixture alone takes about a third of the suite: started last it would run on one
# worker while the other idles, so it goes first.
LONGEST_FILES = ("test_study_phases.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)
