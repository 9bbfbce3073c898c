#!/usr/bin/env bash
# A private network namespace where Janus can do WebRTC on loopback addresses.
#
#   benches/janus/netns.sh up NAME     create it (root needed: `ip netns`)
#   benches/janus/netns.sh down NAME   remove it
#
# Why: Janus 1.1 never gathers ICE candidates on a loopback interface (ice.c skips IFF_LOOPBACK,
# and libnice's own gathering skips it too), so on `lo` alone it offers no candidate a local
# client can reach. Inside this namespace a veth pair `janus0`/`janus1` carries 127.0.0.2, which
# janus.jcfg enforces (`ice_enforce_list`): Janus binds and advertises 127.0.0.2 only, and
# clients use 127.0.0.1 on the namespace's own `lo`. libnice pins its sockets to janus0
# (IP_UNICAST_IF), so its packets to 127.0.0.1 leave through the veth pair and come back in on
# janus1; the sysctls below let 127/8 addresses take that path (route_localnet) and be accepted
# with a local source (accept_local, no reverse-path filter). Nothing leaves the namespace: it
# has no link to the host's network, and every address in it is in 127.0.0.0/8.
set -euo pipefail

usage() {
  echo "usage: $0 up|down NAME" >&2
  exit 2
}
[[ $# -eq 2 ]] || usage
action=$1
name=$2

case "$action" in
  up)
    ip netns add "$name"
    ip -n "$name" link set lo up
    ip -n "$name" link add janus0 type veth peer name janus1
    ip -n "$name" addr add 127.0.0.2/32 dev janus0
    ip -n "$name" link set janus0 up
    ip -n "$name" link set janus1 up
    ip netns exec "$name" sysctl -qw \
      net.ipv4.conf.all.route_localnet=1 \
      net.ipv4.conf.all.accept_local=1 \
      net.ipv4.conf.all.rp_filter=0 \
      net.ipv4.conf.default.rp_filter=0 \
      net.ipv4.conf.janus0.route_localnet=1 \
      net.ipv4.conf.janus1.route_localnet=1 \
      net.ipv4.conf.janus1.accept_local=1 \
      net.ipv4.conf.janus1.rp_filter=0
    # No IPv6 link-local addresses on the pair: nothing but 127/8 exists to be advertised.
    ip netns exec "$name" sysctl -qw \
      net.ipv6.conf.janus0.disable_ipv6=1 net.ipv6.conf.janus1.disable_ipv6=1 2>/dev/null || true
    ;;
  down)
    ip netns del "$name" 2>/dev/null || true
    ;;
  *)
    usage
    ;;
esac
