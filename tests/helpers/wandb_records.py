"""Read back an offline W&B run (``run-<id>.wandb``: a LevelDB-style log of protobuf Records),
so tests can check what was logged without a server."""

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7  # ":W&B", magic 0xBEE1, version
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = HEADER, b""
    while position + 7 <= len(data):
        space = BLOCK - position % BLOCK
        if space < 7:  # block trailer padding
            position += space
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished_records(path, timeout: float = 60.0) -> list:
    """The records of a finished offline run, read once its file ends with the exit record: W&B's
    writer process can still be flushing the file after ``wandb.finish()`` has returned (seen once
    in CI: the file read back without its run record, which was there a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(records(path))
        if (found and found[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def run_group(run_file) -> str:
    """The W&B group an offline run file was started in."""
    return next(
        record.run.run_group for record in finished_records(run_file) if record.WhichOneof("record_type") == "run"
    )


def history_and_config(run_file):
    """(list of logged dicts, config dict) of an offline run file."""
    history, config = [], {}
    for record in finished_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return history, config
