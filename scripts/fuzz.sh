#!/usr/bin/env bash
# Runs mailmoat's cargo-fuzz targets (tests/fuzz, issue 5), one after the other.
#
#   scripts/fuzz.sh [TIME_PER_TARGET] [TARGET...]
#
# TIME_PER_TARGET: seconds, or a number with s or m (5, 5s, 2m); CI runs 5 s each.
# Defaults: 60 seconds, every target (line_framer smtp_body smtp_session imap_session
# pop3_session mta_sts_policy outbound_session). Installs cargo-fuzz (pinned: CARGO_FUZZ_VERSION below) if
# it is missing, copies the seeds of tests/fuzz/seeds/<target>/ into
# tests/fuzz/corpus/<target>/, runs each target with -max_total_time, and prints one summary line per target. Exits
# non-zero if any target crashed (or failed to build); crash inputs stay in
# tests/fuzz/artifacts/<target>/.
#
# The toolchain is stable: cargo fuzz needs nightly flags, so RUSTC_BOOTSTRAP=1.
# Environment:
#   FUZZ_SANITIZER  address, leak, none (default: none; the crate forbids unsafe code,
#                   so AddressSanitizer mostly costs speed)
#   FUZZ_JOBS       parallel libFuzzer processes per target (default 1; more than 1
#                   runs libFuzzer's -fork mode)
#   FUZZ_KEEP_GOING 1: do not stop at the first crash (-fork mode, -ignore_crashes=1), to
#                   collect every distinct crash of a long run; still exits non-zero
#   FUZZ_ARGS       extra libFuzzer arguments, e.g. "-max_len=8192"
#   FUZZ_TARGET_DIR where the fuzz build goes (default tests/fuzz/target)
#
# Replay one input:   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz -s none TARGET FILE
# Minimise a crash:   RUSTC_BOOTSTRAP=1 cargo fuzz tmin --fuzz-dir tests/fuzz -s none TARGET FILE
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
fuzz_dir="$root/tests/fuzz"
all_targets=(line_framer smtp_body smtp_session imap_session pop3_session mta_sts_policy
    outbound_session)

# The version CI and fresh machines install (cargo install --locked).
CARGO_FUZZ_VERSION=0.13.2

time_arg=${1:-60}
case "$time_arg" in
    *m) seconds=${time_arg%m}; unit=60 ;;
    *s) seconds=${time_arg%s}; unit=1 ;;
    *) seconds=$time_arg; unit=1 ;;
esac
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: scripts/fuzz.sh [TIME_PER_TARGET (5, 5s, 2m)] [TARGET...]" >&2
    exit 64
fi
seconds=$((10#$seconds * unit))
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${all_targets[@]}")
fi
for target in "${targets[@]}"; do
    if [ ! -f "$fuzz_dir/fuzz_targets/$target.rs" ]; then
        echo "unknown target $target (known: ${all_targets[*]})" >&2
        exit 64
    fi
done

export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-1}
read -r -a extra_args <<<"${FUZZ_ARGS:-}"
mode_args=()
if [ "${FUZZ_KEEP_GOING:-0}" = 1 ]; then
    mode_args=(-fork="$jobs" -ignore_crashes=1)
elif [ "$jobs" -gt 1 ]; then
    mode_args=(-fork="$jobs")
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

target_dir=${FUZZ_TARGET_DIR:-$fuzz_dir/target}
fuzz() {
    cargo fuzz "$1" --fuzz-dir "$fuzz_dir" --target-dir "$target_dir" -s "$sanitizer" "${@:2}"
}

# One build for all targets, so that a compile error is reported once and early.
fuzz build
binary_dir="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release"

logs="$fuzz_dir/artifacts/logs"
mkdir -p "$logs"
summary=()
failed=0
for target in "${targets[@]}"; do
    corpus="$fuzz_dir/corpus/$target"
    artifacts="$fuzz_dir/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "$fuzz_dir/seeds/$target" ]; then
        cp -n "$fuzz_dir/seeds/$target"/* "$corpus"/ 2>/dev/null || true
    fi
    find "$artifacts" -type f | sort >"$logs/$target.before"
    before=$(wc -l <"$logs/$target.before")
    log="$logs/$target.log"
    echo "== $target: ${seconds}s, corpus $(find "$corpus" -type f | wc -l) inputs, log $log" >&2
    status=0
    started=$SECONDS
    (cd "$logs" && fuzz run "$target" "$corpus" -- \
        -max_total_time="$seconds" -artifact_prefix="$artifacts/" -print_final_stats=1 \
        "${mode_args[@]}" "${extra_args[@]}") >"$log" 2>&1 || status=$?
    elapsed=$((SECONDS - started))
    after=$(find "$artifacts" -type f | wc -l)
    crashes=$((after - before))
    # libFuzzer's status lines: `#RUNS<TAB>NEW cov: N ft: N ...` (one process) or
    # `#RUNS: cov: N ft: N ...` (-fork); the last one has the totals.
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$last")
    runs=${runs:-0}
    rate=$((runs / (elapsed > 0 ? elapsed : 1)))
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' <<<"$last" || echo "cov: ? ft: ?")
    corp=$(grep -Eo 'corp: [0-9]+' <<<"$last" | grep -Eo '[0-9]+' || echo "?")
    line="$target: ${elapsed}s runs=$runs exec/s=$rate $cov corpus=$corp crashes=$crashes"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        line="$line FAILED (exit $status; artifacts in ${artifacts#"$root"/}/)"
        # Replay each new artifact; group them by panic location, most frequent first,
        # with the first one's message and input as the example.
        find "$artifacts" -type f | sort | comm -13 "$logs/$target.before" - |
            while read -r input; do
                message=$("$binary_dir/$target" "$input" 2>&1 | grep -A1 'panicked at' |
                    sed -E 's/^thread .* panicked at //' | paste -s -d ' ' | cut -c1-200)
                message=${message:-"? no panic (timeout, out of memory or leak?)"}
                printf '%s\t%s\t%s\n' "${message%% *}" "$message" "${input#"$root"/}"
            done | awk -F'\t' '{n[$1]++; if (!($1 in ex)) ex[$1] = $2 " [" $3 "]"}
                END {for (k in n) printf "  %5d x %s\n", n[k], ex[k]}' |
            sort -rn >&2 || true
    fi
    echo "$line" >&2
    summary+=("$line")
done

echo
echo "fuzz summary (${seconds}s per target, sanitizer $sanitizer):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
