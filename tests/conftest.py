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
