"""Reading back what a run logged: TensorBoard event files and the train losses in them."""

import struct


def read_events(logdir):
    """Parses TFRecord event files with tensorboardX's protos (TensorBoard reads the same bytes)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    return events


def train_losses(workdir, name: str) -> dict[int, float]:
    """Step → `{name}/train/loss` as logged under `workdir`/tensorboard."""
    return {e.step: v.simple_value for e in read_events(workdir / "tensorboard") for v in e.summary.value
            if v.tag == f"{name}/train/loss"}
