#!/usr/bin/env bash
# One command that runs every test on a fresh machine.
#
#   scripts/test.sh            install what is missing, then fmt, clippy, docs, tests, fuzz build
#   scripts/test.sh STEP...    only those steps, in the order given:
#                              install fmt clippy doc test fuzz
#
# CI runs exactly this script (.ci/run), as root, with CI=true and no stdin. Missing tools are
# installed with apt-get (as root, or through sudo). The script stops at the first failing step
# and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${CI:-}" == "true" ]]; then
    export CARGO_TERM_COLOR=never
fi
export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------------------------------------
# Tools the tests need: "command:debian-package". A command that is on PATH is not installed
# again.
REQUIRED_TOOLS=(
    "turnutils_uclient:coturn" # coturn's test client: end-to-end relay tests
    "openssl:openssl"
    "curl:curl"
    "c++:g++" # the fuzz build step: libfuzzer-sys compiles libFuzzer (C++)
    "iptables:iptables" # tests/strict_firewall.rs: firewalls and a NAT in network namespaces
    "ip:iproute2" # network namespaces and veth pairs (ip), socket listing (ss)
    "python3:python3-minimal" # UDP probes inside the namespaces
    "redis-server:redis-server" # control plane: store tests against a real Redis (own port)
    "jq:jq" # docs/api.md's curl walk-through, run as written by tests/control.rs
    "prometheus:prometheus" # tests/prometheus.rs: dashboards and rules against a real Prometheus
    "promtool:prometheus" # promtool check metrics / check rules / test rules
    "chromium:chromium" # tests/browser.rs: the join page and diagnostics in headless Chromium
)
# ---------------------------------------------------------------------------------------------

step() {
    printf '\n==> %s\n' "$*"
}

STEP_STARTED=0
step_done() {
    printf '==> %s: ok (%ss)\n' "$1" "$((SECONDS - STEP_STARTED))"
}

as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        echo "error: need root (or sudo) to run: $*" >&2
        return 1
    fi
}

# PIDs of running processes named turnserver (coturn's daemon), read from /proc so that no
# extra tool is needed.
turnserver_pids() {
    local d
    for d in /proc/[0-9]*; do
        if [[ "$(cat "$d/comm" 2>/dev/null)" == turnserver ]]; then
            echo "${d#/proc/}"
        fi
    done
}

step_install() {
    local missing=() entry cmd pkg
    for entry in "${REQUIRED_TOOLS[@]}"; do
        cmd="${entry%%:*}"
        pkg="${entry#*:}"
        if command -v "$cmd" >/dev/null 2>&1; then
            echo "found $cmd: $(command -v "$cmd")"
        else
            echo "missing $cmd (package $pkg)"
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get not found; install these packages by hand: ${missing[*]}" >&2
        return 1
    fi

    # Packages such as coturn start their daemon from the maintainer scripts. A policy-rc.d
    # that exits 101 tells invoke-rc.d not to start anything (Debian policy, section 9.3.3).
    # Only add one if none exists, and remove only the one we added.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e "$policy" ]]; then
        as_root sh -c "printf '#!/bin/sh\n# added by turnpike scripts/test.sh during apt-get install\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
    fi

    local rc=0
    echo "apt-get update"
    as_root apt-get update -qq || rc=$?
    if ((rc == 0)); then
        echo "apt-get install ${missing[*]}"
        as_root apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}" </dev/null || rc=$?
    fi
    if ((added_policy)); then
        as_root rm -f "$policy"
    fi
    ((rc == 0)) || return "$rc"

    # The tests run their own relays; coturn's daemon must not hold the TURN port. coturn was
    # not installed before this run, so a turnserver running now was started by the package
    # (on a system where policy-rc.d was not honoured): stop exactly those processes.
    if [[ " ${missing[*]} " == *" coturn "* ]]; then
        local pid
        for pid in $(turnserver_pids); do
            echo "stopping turnserver (pid $pid), started by the coturn package"
            as_root kill "$pid" || true
        done
        sleep 1
        for pid in $(turnserver_pids); do
            as_root kill -9 "$pid" || true
        done
    fi
    if command -v ss >/dev/null 2>&1 && ss -Hlun 'sport = :3478' | grep -q .; then
        echo "warning: something listens on UDP port 3478 (tests use their own ports):" >&2
        ss -Hlunp 'sport = :3478' >&2 || true
    fi
    for entry in "${REQUIRED_TOOLS[@]}"; do
        cmd="${entry%%:*}"
        command -v "$cmd" >/dev/null 2>&1 || {
            echo "error: $cmd still missing after installing ${entry#*:}" >&2
            return 1
        }
    done
}

step_fmt() {
    if [[ "${CI:-}" == "true" ]]; then
        cargo fmt --all -- --check --color never
    else
        cargo fmt --all -- --check
    fi
}

step_clippy() {
    cargo clippy --workspace --all-targets -- -D warnings
}

# Rustdoc's own lints (broken and private intra-doc links) as errors, as clippy's are: a doc
# link that resolves nowhere is a doc that lies.
step_doc() {
    RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
}

step_test() {
    local log="$WORK_DIR/cargo-test.log" rc=0
    cargo test --workspace 2>&1 | tee "$log" || rc=$?
    echo
    echo "--- test summary (one line per test binary) ---"
    awk '
        # "Running unittests src/lib.rs (target/debug/deps/conf-0123abcd)" -> "conf src/lib.rs"
        /^ *Running / {
            path = ($2 == "unittests") ? $3 : $2
            bin = $NF
            gsub(/[()]/, "", bin); sub(/.*\//, "", bin); sub(/-[0-9a-f]+$/, "", bin)
            name = bin " " path
        }
        /^ *Doc-tests / { name = $2 " doc-tests" }
        /^test result:/ {
            printf "%-45s %s\n", name, $0
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) passed += $(i - 1)
                if ($(i) ~ /^failed;?$/) failed += $(i - 1)
                if ($(i) ~ /^ignored;?$/) ignored += $(i - 1)
            }
        }
        END { printf "total: %d passed, %d failed, %d ignored\n", passed, failed, ignored }
    ' "$log"
    return "$rc"
}

step_fuzz() {
    if [[ ! -f fuzz/Cargo.toml ]]; then
        echo "fuzz/Cargo.toml not present: skipped"
        return 0
    fi
    # Builds every fuzz target on stable (no sanitizer, no run): they must keep compiling.
    # Running them needs cargo-fuzz: see fuzz/README.md.
    cargo build --manifest-path fuzz/Cargo.toml
}

ALL_STEPS=(install fmt clippy doc test fuzz)
if (($# > 0)); then
    STEPS=("$@")
else
    STEPS=("${ALL_STEPS[@]}")
fi
for s in "${STEPS[@]}"; do
    case " ${ALL_STEPS[*]} " in
        *" $s "*) ;;
        *)
            echo "unknown step '$s'; steps: ${ALL_STEPS[*]}" >&2
            exit 2
            ;;
    esac
done

# Steps are called directly (not inside `if`), so `set -e` stays in force within them; the EXIT
# trap names the step that failed.
WORK_DIR="$(mktemp -d)"
CURRENT_STEP=""
on_exit() {
    local rc=$?
    rm -rf "$WORK_DIR"
    if ((rc != 0)) && [[ -n "$CURRENT_STEP" ]]; then
        printf '\n==> FAILED: %s (exit %d after %ss)\n' "$CURRENT_STEP" "$rc" \
            "$((SECONDS - STEP_STARTED))" >&2
    fi
}
trap on_exit EXIT

SCRIPT_STARTED=$SECONDS
for s in "${STEPS[@]}"; do
    case "$s" in
        install) CURRENT_STEP="install missing test tools (apt-get)" ;;
        fmt) CURRENT_STEP="cargo fmt --all -- --check" ;;
        clippy) CURRENT_STEP="cargo clippy --workspace --all-targets -- -D warnings" ;;
        doc) CURRENT_STEP="cargo doc --workspace --no-deps (RUSTDOCFLAGS=-D warnings)" ;;
        test) CURRENT_STEP="cargo test --workspace" ;;
        fuzz) CURRENT_STEP="build the fuzz targets (fuzz/)" ;;
    esac
    step "$CURRENT_STEP"
    STEP_STARTED=$SECONDS
    "step_$s"
    step_done "$s"
done
CURRENT_STEP=""
printf '\n==> all steps passed: %s (%ss)\n' "${STEPS[*]}" "$((SECONDS - SCRIPT_STARTED))"
