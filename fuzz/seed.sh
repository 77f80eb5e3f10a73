#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/corpus/<target>/ (not committed) from examples/seed.rs.
set -euo pipefail
cd "$(dirname "$0")"
cargo run --quiet --release --example seed -- corpus
ls corpus | while read -r t; do echo "$t: $(ls "corpus/$t" | wc -l) files"; done
