"""Chest X-ray data: TFDS builders (`builders`), the Grain pipeline (`pipeline`), synthetic folders
(`synthetic`), patient-split safety (`splits`) and the procedural phantom (`phantom/`).

Nothing is imported here, so that `xray_dit.data.phantom` stays importable without TFDS or Grain.
"""


class DataError(Exception):
    """A problem with the data on disk, or with the dataset a config asks for, that the user can fix: a
    missing download, an unprepared or damaged dataset, a split or class with too few images, a bad
    synthetic folder. Its message is one line saying what is wrong and what to do; `xray_dit.main` prints
    it and exits with status 2."""
