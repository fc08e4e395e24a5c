"""Synthetic image folders: a rerun writes a folder again; manifest errors say what is wrong and what to do."""

import numpy as np
import pytest

from xray_dit.data import DataError
from xray_dit.data import synthetic as synthetic_lib


def test_a_synthetic_folder_can_be_written_again_by_a_rerun(tmp_path):
    # A study phase killed after writing its folder but before its marker writes the folder again.
    folder = tmp_path / "accepted"
    synthetic_lib.write_synthetic(folder, np.zeros((3, 8, 8), np.uint8), ["Cardiomegaly"] * 3)
    synthetic_lib.write_synthetic(folder, np.full((2, 8, 8), 9, np.uint8), ["Effusion"] * 2)
    source = synthetic_lib.SyntheticSource(folder, ("Cardiomegaly", "Effusion"))
    assert source.files == ["synthetic_000000.png", "synthetic_000001.png"]
    np.testing.assert_array_equal(source.labels, [[0, 1], [0, 1]])
    assert not (folder / (synthetic_lib.MANIFEST + ".partial")).exists()


def test_synthetic_manifest_errors_say_what_is_wrong_and_what_to_do(tmp_path):
    folder = tmp_path / "synthetic"
    synthetic_lib.write_synthetic(folder, np.zeros((3, 8, 8), np.uint8), ["Cardiomegaly", "Effusion", "Cardiomegaly"])
    labels = ("Cardiomegaly", "Effusion")
    (folder / "synthetic_000001.png").unlink()
    with pytest.raises(DataError) as error:
        synthetic_lib.SyntheticSource(folder, labels)
    assert "1 file(s) listed in" in str(error.value) and "['synthetic_000001.png']" in str(error.value)
    assert "remove their rows from the manifest" in str(error.value)

    synthetic_lib.write_synthetic(tmp_path / "typo", np.zeros((2, 8, 8), np.uint8),
                                  ["Cardiomegaly", "Cardiomegally|Effusion"])
    with pytest.raises(DataError) as error:
        synthetic_lib.SyntheticSource(tmp_path / "typo", labels)
    assert "['Cardiomegally']" in str(error.value) and "Correct the manifest's label column" in str(error.value)
