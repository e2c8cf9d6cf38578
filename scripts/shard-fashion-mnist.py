#!/usr/bin/env python3
"""Splits Fashion-MNIST (Debian's dataset-fashion-mnist IDX files) into
safetensors shards, for jobs whose training files are dealt to the workers
(`dataset.sharding`, see docs/TRAINING.md). Each shard holds `features`
(u8, [N, 1, 28, 28]) and `labels` (u8, [N]).

Usage: shard-fashion-mnist.py OUT_DIR [--train-shards 6] [--test-shards 2]
Writes OUT_DIR/train-K.safetensors and OUT_DIR/test-K.safetensors.
"""
import argparse
import gzip
import json
import os
import struct

import numpy as np

SOURCE = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndims = data[3]
    dims = struct.unpack(f">{ndims}I", data[4:4 + 4 * ndims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndims).reshape(dims)


def write_safetensors(path, tensors):
    """The safetensors layout: u64 header length, JSON header, raw bytes."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": "U8", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--train-shards", type=int, default=6)
    parser.add_argument("--test-shards", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for split, prefix, shards in (("train", "train", args.train_shards),
                                  ("test", "t10k", args.test_shards)):
        images = read_idx(f"{SOURCE}/{prefix}-images-idx3-ubyte.gz")[:, None]
        labels = read_idx(f"{SOURCE}/{prefix}-labels-idx1-ubyte.gz")
        for k, (x, y) in enumerate(zip(np.array_split(images, shards), np.array_split(labels, shards))):
            write_safetensors(os.path.join(args.out, f"{split}-{k}.safetensors"),
                              {"features": x, "labels": y})
        print(f"{split}: {len(labels)} examples in {shards} shards")


if __name__ == "__main__":
    main()
