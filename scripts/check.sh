#!/usr/bin/env bash
# The project's test command: installs what the tests need (real Postfix, Dovecot,
# swaks, ...), then format check, clippy with warnings as errors, and every test, over
# the whole workspace (mailmoat and the load generator in bench/, which
# tests/bench_smoke.rs runs; tests/fuzz is a workspace of its own, scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
    bash scripts/install-deps.sh
else
    echo "check.sh: not root, not installing packages (run scripts/install-deps.sh as root once)" >&2
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Every wait in the tests has its own bound; this one is the last line of defence, so
# that a test that hangs anyway shows where (every process, and the stacks of the test
# binaries) and fails, instead of using up CI's time. The tests run in a session of
# their own, so that all of them can be found and stopped.
# The tests run the binaries: the product's (cargo names it to its own tests) and the
# load generator's, a workspace member whose binary `cargo test` does not build.
cargo build --workspace --bins
limit=${MAILMOAT_TEST_LIMIT:-1800}
[[ $limit =~ ^[0-9]+$ ]] || { echo "check.sh: MAILMOAT_TEST_LIMIT must be seconds" >&2; exit 64; }
deadline=$((SECONDS + limit))
# Without job control the child is no group leader, so setsid makes it a session
# leader without forking, and $! is the session's id.
set +m
setsid -w cargo test --workspace --all-targets &
tests=$!
# Whatever ends this script ends the tests too, programs they started included (those
# run in process groups of their own, within the tests' session).
trap 'pkill -KILL -s "$tests" 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
while kill -0 "$tests" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "check.sh: the tests ran longer than ${limit}s; what was running:" >&2
        ps -eo pid,ppid,pgid,etime,stat,wchan:24,args --forest >&2 || true
        for pid in $(pgrep -s "$tests" -f 'target/debug/deps/' || true); do
            echo "check.sh: stacks of $pid:" >&2
            timeout 60 gdb -p "$pid" -batch -ex 'thread apply all bt' 2>&1 |
                grep -E '^(Thread|#)' >&2 || true
        done
        pkill -KILL -s "$tests" 2>/dev/null || true
        break
    fi
    sleep 1
done
wait "$tests"
