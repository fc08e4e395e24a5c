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


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """`../shared` beside the project root; tests that need it skip, saying why, when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"reference material not found at {SHARED} (the ../shared folder beside the project root)")
    return SHARED


@pytest.fixture(scope="session")
def golden_dir(shared_dir) -> pathlib.Path:
    path = shared_dir / "golden"
    if not path.is_dir():
        pytest.skip(f"golden reference tensors not found at {path}")
    return path


@pytest.fixture(scope="session")
def nih_sample_dir(shared_dir) -> pathlib.Path:
    path = shared_dir / "data" / "nih_sample"
    if not path.is_dir():
        pytest.skip(f"real NIH sample not found at {path}")
    return path


@pytest.fixture
def artifacts_dir(request) -> pathlib.Path:
    """Where tests save pictures for a human to look at (kept after the run)."""
    path = REPO_ROOT / "test_artifacts" / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path
