#!/usr/bin/env bash
# The project's test command: installs what the tests need (real Postfix, Dovecot,
# swaks, ...), then format check, clippy with warnings as errors, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    bash scripts/install-deps.sh
else
    echo "check.sh: not root, not installing packages (run scripts/install-deps.sh as root once)" >&2
fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
