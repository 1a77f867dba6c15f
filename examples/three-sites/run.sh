#!/usr/bin/env bash
# Three levels, seven nodes, on loopback: a central archive, two regional archives and four
# sites. Studies sent to two sites with DCMTK storescu arrive at their region and the centre;
# then recollect gathers the DotCom directory and hierarchy status draws the tree.
#
# Usage: examples/three-sites/run.sh [work-dir]      (default ./three-sites-data)
#   BASE_PORT=11300  DICOM ports BASE_PORT+0..6, control ports BASE_PORT+100..106
#   KEEP=1           leave the nodes running at the end (stop them with: kill $(cat work-dir/*.pid))
#   PACSNODE=path    the pacsnode command (default: pacsnode on PATH, else this checkout's
#                    .venv/bin/pacsnode, as the README's first command installs it)
# Needs: pacsnode, DCMTK (apt-get install dcmtk).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
die() { echo "run.sh: $*" >&2; exit 1; }

# Everything the example needs, found (or refused with the reason) before any node starts.
if [ -n "${PACSNODE:-}" ]; then
  PACSNODE=$(command -v "$PACSNODE") || die "PACSNODE=$PACSNODE is not a command"
elif command -v pacsnode >/dev/null; then
  PACSNODE=$(command -v pacsnode)
elif [ -x "$CHECKOUT/.venv/bin/pacsnode" ]; then
  PACSNODE=$CHECKOUT/.venv/bin/pacsnode
else
  die "pacsnode is neither on PATH nor in $CHECKOUT/.venv; install it first:" \
      "cd $CHECKOUT && python3 -m venv .venv && .venv/bin/pip install ." \
      "(or set PACSNODE=/path/to/pacsnode)"
fi
VERSION=$("$PACSNODE" --version 2>&1) || die "$PACSNODE does not run: $VERSION"
PYTHON=${PYTHON:-$(dirname "$PACSNODE")/python}
[ -x "$PYTHON" ] || PYTHON=python3
"$PYTHON" -c "import pydicom" 2>/dev/null \
  || die "$PYTHON cannot import pydicom (make_study.py needs it); set PYTHON to the python" \
         "of pacsnode's environment"
for tool in echoscu storescu findscu; do
  [ -x "/usr/bin/$tool" ] || die "DCMTK's /usr/bin/$tool is missing: apt-get install dcmtk"
done
WORK=$(mkdir -p "${1:-./three-sites-data}" && cd "${1:-./three-sites-data}" && pwd)
BASE=${BASE_PORT:-11300}
export TCP_NODELAY=1  # DCMTK waits ~40 ms per small message on loopback without it
echo "== $VERSION ($PACSNODE)"

# name  parent  site name
NODES=(
  "central -            Central-Archive"
  "north   central      Region-North"
  "south   central      Region-South"
  "siten1  north        North-Clinic-1"
  "siten2  north        North-Clinic-2"
  "sites1  south        South-Clinic-1"
  "sites2  south        South-Clinic-2"
)
declare -A INDEX
for i in "${!NODES[@]}"; do read -r name _ <<<"${NODES[$i]}"; INDEX[$name]=$i; done
dicom_port() { echo $((BASE + INDEX[$1])); }
control_port() { echo $((BASE + 100 + INDEX[$1])); }
ae() { echo "${1^^}"; }
cfg() { echo "$WORK/$1.toml"; }

PIDS=()
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "nodes left running (KEEP=1)"; return; fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped ${#PIDS[@]} nodes; data and logs in $WORK"
}
trap cleanup EXIT

echo "== starting 7 nodes in $WORK"
for entry in "${NODES[@]}"; do
  read -r name parent site <<<"$entry"
  parent_line=""
  [ "$parent" = "-" ] || parent_line="parent = \"127.0.0.1:$(control_port "$parent")\""
  rm -rf "${WORK:?}/$name"
  cat >"$(cfg "$name")" <<TOML
[node]
name = "$name"
data_dir = "$WORK/$name"
listen_host = "127.0.0.1"
log_level = "WARNING"
[bootstrap_partition]
ae_title = "$(ae "$name")"
port = $(dicom_port "$name")
folder = "$(ae "$name")"
[hierarchy]
site = "$site"
control_listen = "127.0.0.1:$(control_port "$name")"
$parent_line
heartbeat_seconds = 1
sync_seconds = 0.5
recollect_timeout = 10
[forwarding]
poll_seconds = 0.5
TOML
  "$PACSNODE" serve -c "$(cfg "$name")" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$WORK/$name.pid"
  printf '   %-8s %-16s AE %-8s DICOM %s  control %s  parent %s\n' "$name" "$site" \
    "$(ae "$name")" "$(dicom_port "$name")" "$(control_port "$name")" "$parent"
done

echo "== waiting for every node to register with its parent"
reachable() {
  "$PACSNODE" hierarchy status --json -c "$(cfg central)" 2>/dev/null \
    | "$PYTHON" -c 'import json,sys; print(sum(e["reachable"] for e in json.load(sys.stdin)))' \
    2>/dev/null || echo 0
}
all_running() {  # a node that exited (a port in use, bad settings): say which and why, stop
  local i name
  for i in "${!PIDS[@]}"; do
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    read -r name _ <<<"${NODES[$i]}"
    echo "node $name exited; the end of $WORK/$name.log:" >&2
    tail -n 5 "$WORK/$name.log" >&2
    return 1
  done
}
for i in "${!NODES[@]}"; do  # each node answers C-ECHO, or the one that exited is named
  read -r name _ <<<"${NODES[$i]}"
  for _ in $(seq 150); do
    all_running || exit 1
    # (short timeouts: another program may hold the port and never answer)
    /usr/bin/echoscu -to 2 -ta 2 -aet EXAMPLE -aec "$(ae "$name")" 127.0.0.1 \
      "$(dicom_port "$name")" >/dev/null 2>&1 && break
    sleep 0.2
  done
done
for _ in $(seq 60); do
  all_running || exit 1
  [ "$(reachable)" = 7 ] && break
  sleep 1
done
[ "$(reachable)" = 7 ] || die "not every node registered within 60 s; see $WORK/*.log"
echo "   all 7 nodes registered"

instances_at() {  # node study-uid -> number of instances of the study the node holds
  /usr/bin/findscu -S -aet EXAMPLE -aec "$(ae "$1")" 127.0.0.1 "$(dicom_port "$1")" \
    -k QueryRetrieveLevel=STUDY -k StudyInstanceUID="$2" -k NumberOfStudyRelatedInstances 2>&1 \
    | sed -n 's/.*(0020,1208) IS \[\([0-9]*\) *\].*/\1/p' | head -n 1
}

send_and_follow() {  # site count: send a study to the site, follow it up the tree
  local site=$1 count=$2 study region
  study=$("$PYTHON" "$HERE/make_study.py" "$WORK/study-$site" "PAT-$site" "$count")
  region=$(read -r _ p _ <<<"${NODES[${INDEX[$site]}]}"; echo "$p")
  echo "== storescu: $count images of study $study to $(ae "$site")"
  /usr/bin/storescu -aet MODALITY -aec "$(ae "$site")" 127.0.0.1 "$(dicom_port "$site")" \
    "$WORK/study-$site"/*.dcm
  for node in "$site" "$region" central; do
    local n=""
    for _ in $(seq 60); do
      n=$(instances_at "$node" "$study"); [ "${n:-0}" = "$count" ] && break; sleep 0.5
    done
    printf '   %-8s holds %s of %s images\n' "$node" "${n:-0}" "$count"
    [ "${n:-0}" = "$count" ] || { echo "the study did not reach $node" >&2; exit 1; }
  done
}
send_and_follow siten1 3
send_and_follow sites2 2

echo "== pacsnode recollect (from a site)"
"$PACSNODE" recollect -c "$(cfg sites1)"
echo "== pacsnode hierarchy status"
"$PACSNODE" hierarchy status -c "$(cfg siten2)"
