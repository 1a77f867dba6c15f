#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, start PostgreSQL, run the suite.
# Usage: scripts/test.sh [pytest args...]      (e.g. scripts/test.sh -m "not slow")
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
as_postgres() { if [ -z "$SUDO" ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }

# DCMTK (independent DICOM peers), ping, libfaketime and a PostgreSQL server, from Debian's packages.
need=()
[ -x /usr/bin/storescu ] || need+=(dcmtk)
[ -x /bin/ping ] || need+=(iputils-ping)  # `pacsnode device ping` sends ICMP with it
# libfaketime: a node run with its wall clock stepped (tests/interop/test_clock_step.py)
ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(libfaketime)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)  # its 10-line preload (tests/clockstep)
command -v pg_ctlcluster >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
  || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Start the cluster and give the tests a role that may create databases.
PG_VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h | grep -q "^$PG_VERSION main"; then
  $SUDO pg_createcluster "$PG_VERSION" main >/dev/null
fi
pg_lsclusters -h | grep "^$PG_VERSION main" | grep -q online \
  || $SUDO pg_ctlcluster "$PG_VERSION" main start
PG_PORT=$(pg_lsclusters -h | awk -v v="$PG_VERSION" '$1==v && $2=="main" {print $3}')
as_postgres psql -q -p "$PG_PORT" -v ON_ERROR_STOP=1 <<SQL >/dev/null
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pacsnode_test') THEN
    CREATE ROLE pacsnode_test LOGIN CREATEDB PASSWORD 'pacsnode_test';
  END IF;
END \$\$;
-- DROP DATABASE ... WITH (FORCE) in test teardown may have to end an autovacuum worker.
GRANT pg_signal_backend TO pacsnode_test;
SQL
export PACSNODE_TEST_PG_URL="postgresql+psycopg://pacsnode_test:pacsnode_test@127.0.0.1:$PG_PORT/postgres"
export PACSNODE_REQUIRE_POSTGRES=1 PACSNODE_REQUIRE_DCMTK=1 PACSNODE_REQUIRE_SMALL_FS=1 \
  PACSNODE_REQUIRE_FAKETIME=1

# The project and its test dependencies in a virtual environment of its own.
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
"$VENV/bin/pip" install -q -e ".[test]"

"$VENV/bin/ruff" check .
# Types of node/ and hierarchy/ ([tool.mypy] in pyproject.toml; tests/unit/test_types.py too).
"$VENV/bin/mypy"
"$VENV/bin/lint-imports" --no-cache  # the import contract in pyproject.toml
# The documentation site (mkdocs.yml): a broken link, anchor, snippet or nav entry fails here.
docs_site=$(mktemp -d)
if ! docs_log=$(NO_MKDOCS_2_WARNING=1 "$VENV/bin/mkdocs" build --strict --site-dir "$docs_site" 2>&1); then
  printf '%s\n' "$docs_log" | grep -v '^INFO' >&2
  rm -rf "$docs_site"
  echo "mkdocs build --strict failed" >&2
  exit 1
fi
rm -rf "$docs_site"
# The slowest tests are listed after every run: the whole suite must stay under 15 minutes.
exec "$VENV/bin/python" -m pytest --durations=15 "$@"
