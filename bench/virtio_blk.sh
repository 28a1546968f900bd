#!/bin/sh
# Issue 7 benchmark, part 1: the virtio-blk device path in-process (see
# bench/virtio_blk.rs). Usage: bench/virtio_blk.sh [seconds-per-depth]
set -eu
cd "$(dirname "$0")/.."
cargo run --quiet --release -p devices --example virtio_blk_bench -- "${1:-3}" read
cargo run --quiet --release -p devices --example virtio_blk_bench -- "${1:-3}" write
