"""Prepares one dataset (once) into array_record files that the pipeline reads.

    python -m xray_dit.data.builders.prepare --dataset=nih_chestxray14/256 \\
        --manual_dir=/data/nih --data_dir=/data/tfds [--workers=16]

`--dataset` is `<builder>/<config>` (see `xray_dit.data.builders`); the phantom needs no
`--manual_dir`. A dataset that is already prepared is left alone. Rows with a missing or
unreadable image are skipped and listed in `prepare_report.tsv` beside the prepared files.
"""

from __future__ import annotations

from absl import app, flags

from xray_dit.data import builders

_DATASET = flags.DEFINE_string("dataset", None, "<builder>/<config>, e.g. nih_chestxray14/256", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where prepared datasets are written", required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "the downloaded dataset (not for cxr_phantom)")
_WORKERS = flags.DEFINE_integer("workers", None, "image decoding / rendering processes (default: one per core)")


def main(argv):
    del argv
    builder = builders.prepare(_DATASET.value, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
                               prepare_workers=_WORKERS.value)
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    print(f"{builder.name}/{builder.builder_config.name} prepared in {builder.data_path}: {counts}; "
          f"skipped rows: {builder.data_path / builders.REPORT_FILE}")


if __name__ == "__main__":
    app.run(main)
