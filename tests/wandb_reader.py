"""Reads an offline W&B run file (.wandb: a LevelDB-style log of protobuf records) without a server."""
import struct

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7  # file header ':W&B' + magic + version; record header crc32, length, type
FULL, FIRST, LAST = 1, 2, 4


def read_records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pieces, records = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pieces = chunk if kind in (FULL, FIRST) else pieces + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def history_and_config(path):
    """(list of {key: value_json} history rows, set of config keys) of one offline run."""
    rows, config = [], set()
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
        elif kind == "run":
            config |= {item.key for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key for item in record.config.update}
    return rows, config
