#!/usr/bin/env bash
# The one command that runs every test of tandem: formatting, lints, the Rust tests (unit,
# integration, doctests) and the interop suite with stock Yjs clients from npm.
#
# Works on a fresh Debian 12 machine (as root it installs Node.js, PostgreSQL and Redis from apt when
# missing) and on a developer's machine. Needs: a Rust toolchain with rustfmt and clippy; Node.js
# >= 18 with npm; a PostgreSQL server for the store tests (local on 127.0.0.1:5432, started when
# down, or TANDEM_TEST_POSTGRES_URL).
#
#   scripts/test.sh
#
# Environment:
#   CI=true            set by CI: cargo runs --locked, without incremental compilation
#   CARGO_TARGET_DIR   respected; the interop suite runs $CARGO_TARGET_DIR/debug/tandem
#   TANDEM_INTEROP_VERBOSE=1   echo the tandem servers' logs during the interop suite
#   TANDEM_TEST_POSTGRES_URL   a Postgres the store tests create their databases in (as a role with
#                      CREATEDB); default: the local server as postgres@127.0.0.1:5432
#   TANDEM_TEST_REDIS_URL      the Redis the broker tests share; default redis://127.0.0.1:6379,
#                      started when down. The broker tests also run private redis-server processes
#                      and a Redis Cluster made with redis-cli (as root, both are apt-get'ed)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac

export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
# In CI the committed Cargo.lock must be used as is; locally cargo may update it.
LOCKED=()
if [[ "${CI:-}" == "true" ]]; then
  LOCKED=(--locked)
  export CARGO_INCREMENTAL=0
  export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
fi

START=$SECONDS
STEP_START=$SECONDS
STEPS_DONE=()
CURRENT_STEP=""

section() {
  if [[ -n "$CURRENT_STEP" ]]; then
    STEPS_DONE+=("$CURRENT_STEP ($((SECONDS - STEP_START))s)")
  fi
  CURRENT_STEP=$1
  STEP_START=$SECONDS
  printf '\n==> [%4ss] %s\n' "$((SECONDS - START))" "$1"
}

on_exit() {
  local status=$?
  if [[ $status -ne 0 ]]; then
    printf '\n==> FAILED at step "%s" (exit %s) after %ss\n' "$CURRENT_STEP" "$status" "$((SECONDS - START))" >&2
  fi
}
trap on_exit EXIT

die() {
  echo "error: $*" >&2
  exit 1
}

node_major() {
  node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/'
}

ensure_node() {
  local major
  major=$(node_major || true)
  if [[ -n "$major" && "$major" -ge 18 ]] && command -v npm >/dev/null; then
    return
  fi
  [[ $(id -u) -eq 0 ]] || die "Node.js >= 18 with npm is required (found: ${major:-none}); install it, or run as root to apt-get it"
  command -v apt-get >/dev/null || die "Node.js >= 18 with npm is required and apt-get is not available"
  echo "installing nodejs and npm from apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  major=$(node_major || true)
  [[ -n "$major" && "$major" -ge 18 ]] || die "apt installed Node.js ${major:-none}; >= 18 is required"
}

# The local server the store tests use unless TANDEM_TEST_POSTGRES_URL names another.
PG_HOST=127.0.0.1
PG_PORT=5432
PG_TRUST_URL="postgres://postgres@$PG_HOST:$PG_PORT/postgres"
PG_PASSWORD_URL="postgres://postgres:postgres@$PG_HOST:$PG_PORT/postgres"

pg_connects() {
  PGCONNECT_TIMEOUT=5 psql "$1" -Atqc 'SELECT 1' >/dev/null 2>&1
}

pg_ready() {
  command -v pg_isready >/dev/null && pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
}

# Makes a Postgres server reachable for the store tests and exports TANDEM_TEST_POSTGRES_URL.
ensure_postgres() {
  if [[ -n "${TANDEM_TEST_POSTGRES_URL:-}" ]]; then
    if command -v psql >/dev/null && ! pg_connects "$TANDEM_TEST_POSTGRES_URL"; then
      die "cannot connect to TANDEM_TEST_POSTGRES_URL ($TANDEM_TEST_POSTGRES_URL)"
    fi
    export TANDEM_TEST_POSTGRES_URL
    return
  fi
  if ! pg_ready; then
    if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
      [[ $(id -u) -eq 0 ]] || die "PostgreSQL is needed on $PG_HOST:$PG_PORT for the store tests; start one, set TANDEM_TEST_POSTGRES_URL, or run as root to apt-get it"
      command -v apt-get >/dev/null || die "PostgreSQL is needed for the store tests and apt-get is not available"
      echo "installing postgresql from apt"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    fi
    local version
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    if [[ ! -d "/etc/postgresql/$version/main" ]]; then
      echo "creating PostgreSQL $version cluster main"
      pg_createcluster "$version" main >/dev/null || die "pg_createcluster $version main failed"
    fi
    # The apt install may already have started it (where services start on install).
    if ! pg_ready; then
      echo "starting PostgreSQL $version cluster main"
      pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
        die "could not start PostgreSQL $version (pg_ctlcluster needs root or the postgres user)"
    fi
    local waited=0
    until pg_ready; do
      ((waited++ < 30)) || die "PostgreSQL did not accept connections on $PG_HOST:$PG_PORT within 30s"
      sleep 1
    done
  fi
  # Trust auth (a developer's machine, CI images) needs no password; a fresh Debian install wants
  # one over TCP: give the postgres role a known one.
  if pg_connects "$PG_TRUST_URL"; then
    export TANDEM_TEST_POSTGRES_URL=$PG_TRUST_URL
  else
    if ! pg_connects "$PG_PASSWORD_URL"; then
      [[ $(id -u) -eq 0 ]] || die "cannot connect to PostgreSQL as $PG_TRUST_URL; set TANDEM_TEST_POSTGRES_URL"
      su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
      pg_connects "$PG_PASSWORD_URL" || die "cannot connect to PostgreSQL as postgres@$PG_HOST:$PG_PORT, with or without a password"
    fi
    export TANDEM_TEST_POSTGRES_URL=$PG_PASSWORD_URL
  fi
}

# The local server the broker tests share unless TANDEM_TEST_REDIS_URL names another.
REDIS_HOST=127.0.0.1
REDIS_PORT=6379

redis_up() {
  [[ $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# Installs redis-server and redis-cli when missing (the broker tests run their own instances and
# a cluster), starts a local server when none answers, and exports TANDEM_TEST_REDIS_URL.
ensure_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "redis-server and redis-cli are needed for the broker tests; install them (Debian: redis-server), or run as root to apt-get them"
    command -v apt-get >/dev/null || die "redis-server and redis-cli are needed for the broker tests and apt-get is not available"
    echo "installing redis-server from apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
  fi
  if [[ -n "${TANDEM_TEST_REDIS_URL:-}" ]]; then
    export TANDEM_TEST_REDIS_URL
    return
  fi
  if ! redis_up; then
    echo "starting redis-server on $REDIS_HOST:$REDIS_PORT"
    redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" --save "" --appendonly no \
      --dir "${TMPDIR:-/tmp}" >/dev/null || die "could not start redis-server on $REDIS_HOST:$REDIS_PORT"
    local waited=0
    until redis_up; do
      ((waited++ < 50)) || die "redis-server did not answer PING on $REDIS_HOST:$REDIS_PORT within 10s"
      sleep 0.2
    done
  fi
  export TANDEM_TEST_REDIS_URL="redis://$REDIS_HOST:$REDIS_PORT"
}

nginx_bin() {
  command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && echo /usr/sbin/nginx; }
}

# Installs nginx when missing, for tests/deploy.rs, which runs `nginx -t` on deploy/nginx.conf; nginx
# is never started (a policy-rc.d keeps apt from starting it). Exports TANDEM_TEST_NGINX=1 so that
# the test fails instead of skipping when nginx is absent.
ensure_nginx() {
  if [[ -z "$(nginx_bin)" ]]; then
    [[ $(id -u) -eq 0 ]] || die "nginx is needed to check deploy/nginx.conf (nginx -t); install it (Debian: nginx), or run as root to apt-get it"
    command -v apt-get >/dev/null || die "nginx is needed to check deploy/nginx.conf and apt-get is not available"
    echo "installing nginx from apt (not started: the tests only run nginx -t)"
    export DEBIAN_FRONTEND=noninteractive
    local policy=/usr/sbin/policy-rc.d own_policy=false status=0
    if [[ ! -e $policy ]]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=true
    fi
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx >/dev/null; } || status=$?
    if $own_policy; then rm -f "$policy"; fi
    [[ $status -eq 0 ]] || die "apt-get install nginx failed"
  fi
  export TANDEM_TEST_NGINX=1
}

section "toolchain"
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup)"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
ensure_node
ensure_postgres
ensure_redis
ensure_nginx
NEXTEST=false
if cargo nextest --version >/dev/null 2>&1; then NEXTEST=true; fi
echo "$(cargo --version); $(cargo clippy --version); node $(node --version); npm $(npm --version 2>/dev/null); nextest: $NEXTEST"
# Without the password, if the URL has one.
echo "postgres for the store tests: $(sed -E 's#://([^:/@]+):[^@]*@#://\1:***@#' <<<"$TANDEM_TEST_POSTGRES_URL")"
echo "redis for the broker tests: $(sed -E 's#://([^@/]*)@#://***@#' <<<"$TANDEM_TEST_REDIS_URL"); $(redis-server --version | cut -d' ' -f1-3)"
echo "nginx for the deploy tests: $("$(nginx_bin)" -v 2>&1)"

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy"
cargo clippy --workspace --all-targets "${LOCKED[@]}" -- -D warnings

section "cargo build --bin tandem"
cargo build "${LOCKED[@]}" --bin tandem

if $NEXTEST; then
  section "cargo nextest run --workspace"
  cargo nextest run --workspace "${LOCKED[@]}" --no-tests=warn
  section "cargo test --doc --workspace"
  cargo test --doc --workspace "${LOCKED[@]}"
else
  section "cargo test --workspace"
  cargo test --workspace "${LOCKED[@]}"
fi

section "npm ci (tests/interop)"
INTEROP=$ROOT/tests/interop
if [[ ! -d "$INTEROP/node_modules" ||
      "$INTEROP/package-lock.json" -nt "$INTEROP/node_modules/.package-lock.json" ||
      "$INTEROP/package.json" -nt "$INTEROP/node_modules/.package-lock.json" ]]; then
  # No install scripts are needed (y-websocket v1's optional leveldb backend stays unbuilt).
  (cd "$INTEROP" && npm ci --ignore-scripts --no-audit --no-fund)
else
  echo "node_modules is up to date with package-lock.json"
fi

section "interop suite: stock yjs + y-websocket providers against $TARGET_DIR/debug/tandem"
# The hard timeout only guards against a hung run; each test has its own, much shorter, deadline.
(cd "$INTEROP" && TANDEM_BIN="$TARGET_DIR/debug/tandem" timeout --kill-after=10 600 npm test)

# tests/otlp.rs: spans exported to an OTLP/HTTP collector (cargo feature `otlp`). Last, since it
# rebuilds $TARGET_DIR/debug/tandem with the feature and the interop suite runs the default build.
if $NEXTEST; then
  section "cargo nextest run --features otlp --test otlp"
  cargo nextest run "${LOCKED[@]}" --features otlp --test otlp
else
  section "cargo test --features otlp --test otlp"
  cargo test "${LOCKED[@]}" --features otlp --test otlp
fi

section "done"
summary=$(printf '%s; ' "${STEPS_DONE[@]}")
echo "summary: all ${#STEPS_DONE[@]} steps passed in $((SECONDS - START))s: ${summary%; }"
