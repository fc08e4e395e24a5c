"""Chest X-ray data: TFDS builders (`builders`), the Grain pipeline (`pipeline`), synthetic folders
(`synthetic`), patient-split safety (`splits`) and the procedural phantom (`phantom/`).

Nothing is imported here, so that `xray_dit.data.phantom` stays importable without TFDS or Grain.
"""
