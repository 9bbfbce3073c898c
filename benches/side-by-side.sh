#!/usr/bin/env bash
# Side by side with Janus: the same load, the same media and the same measurements against our
# server (sfu-server) and Janus 1.1's VideoRoom plugin, in one run.
#
#   bash benches/side-by-side.sh            (as root: it may apt-get janus and uses `ip netns`)
#
# Scenarios: 1 publisher -> N subscribers for N = 50, 100, 200, and 5 rooms of a 5-person
# meeting (everyone publishes and receives the other four). Each scenario runs against a freshly
# started server, ours first, then Janus. Everything runs inside a private network namespace on
# 127.0.0.0/8 addresses only (see benches/janus/netns.sh for why Janus needs one).
#
# Output under target/side-by-side/: one sfu-load JSON and text report per run, the servers'
# logs, and table.md (the side-by-side table that docs/benchmarks.md quotes).
#
# Knobs (environment): HOLD (default 12s) how long each load is held; VIDEO_BITRATE (1.5M);
# JOIN_RATE (20 joins/s); SCENARIOS (default "1x50 1x100 1x200 meeting").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

HOLD=${HOLD:-12s}
VIDEO_BITRATE=${VIDEO_BITRATE:-1.5M}
JOIN_RATE=${JOIN_RATE:-20}
SCENARIOS=${SCENARIOS:-"1x50 1x100 1x200 meeting"}
out=$root/target/side-by-side
ns=sfu-side-by-side-$$

if [[ $(id -u) -ne 0 ]]; then
  echo "side-by-side: run as root (it installs janus with apt-get and creates a network namespace)" >&2
  exit 2
fi
if ! command -v janus >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  echo "side-by-side: installing janus and iproute2 (Debian's packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq janus iproute2 >/dev/null
fi
for tool in ip python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "side-by-side: $tool is missing" >&2; exit 2; }
done

echo "side-by-side: building sfu-server and sfu-load (release)"
cargo build --release -q -p signaling -p client --bin sfu-server --bin sfu-load
server_bin=$root/target/release/sfu-server
load_bin=$root/target/release/sfu-load

rm -rf "$out"
mkdir -p "$out"
server_pid=""
cleanup() {
  if [[ -n $server_pid ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  bash "$root/benches/janus/netns.sh" down "$ns"
}
trap cleanup EXIT
bash "$root/benches/janus/netns.sh" up "$ns"
in_ns() { ip netns exec "$ns" "$@"; }

# Waits until something in the namespace accepts TCP connections on 127.0.0.1:$1.
wait_port() {
  local port=$1 tries=0
  until in_ns bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null; do
    tries=$((tries + 1))
    if ((tries > 100)); then
      echo "side-by-side: nothing listens on 127.0.0.1:$port after 10 s" >&2
      return 1
    fi
    sleep 0.1
  done
}

# Starts one server in the namespace; sets server_pid and url. `ip netns exec` execs the server,
# so the pid is the server's own (what sfu-load reads /proc/<pid> of).
start_server() {
  local target=$1 log=$2
  case "$target" in
    ours)
      (exec ip netns exec "$ns" "$server_bin" --listen 127.0.0.1:8080 --ice-ip 127.0.0.1 \
        --max-participants-per-room 500 --log warn >"$log" 2>&1) &
      server_pid=$!
      url=ws://127.0.0.1:8080/ws
      wait_port 8080
      ;;
    janus)
      (exec ip netns exec "$ns" janus -F "$root/benches/janus" -o >"$log" 2>&1) &
      server_pid=$!
      url=ws://127.0.0.1:8188
      wait_port 8188
      ;;
  esac
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

layout() {
  case "$1" in
    1x50) echo "--rooms 1 --publishers 1 --subscribers 50" ;;
    1x100) echo "--rooms 1 --publishers 1 --subscribers 100" ;;
    1x200) echo "--rooms 1 --publishers 1 --subscribers 200" ;;
    meeting) echo "--rooms 5 --publishers 5 --subscribers 0" ;;
    *) echo "side-by-side: unknown scenario $1" >&2; return 1 ;;
  esac
}

uptime | tee "$out/uptime-start.txt"
for scenario in $SCENARIOS; do
  for target in ours janus; do
    name=$scenario-$target
    echo "side-by-side: $name (hold $HOLD, video $VIDEO_BITRATE + audio)"
    start_server "$target" "$out/$name.server.log"
    # shellcheck disable=SC2046 # the layout is several flags on purpose
    in_ns "$load_bin" --target "$target" --url "$url" --server-pid "$server_pid" \
      $(layout "$scenario") --audio --video-bitrate "$VIDEO_BITRATE" \
      --join-rate "$JOIN_RATE" --duration "$HOLD" --room-prefix "$scenario" \
      --json-out "$out/$name.json" >"$out/$name.txt" 2>"$out/$name.stderr" || true
    stop_server
    tail -n 1 "$out/$name.txt"
  done
done
uptime | tee "$out/uptime-end.txt"

python3 "$root/benches/side_by_side_table.py" "$out" "$SCENARIOS" >"$out/table.md"
echo
cat "$out/table.md"
echo
echo "side-by-side: reports and table in $out"
