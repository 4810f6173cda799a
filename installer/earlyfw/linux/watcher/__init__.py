"""earlyfw's handshake watcher (`earlyfw watch`).

The boot path loads the block; the watcher is what relaxes it, and only on
cryptographic evidence that the tunnel is live: a WireGuard handshake with a
peer at a configured endpoint, or OpenVPN's CONNECTED state to one. It locks
again when that evidence goes stale, when the tunnel interface disappears, on
suspend and on any error, and it puts earlyfw's table back the moment anything
removes or alters it.

  sources   where WireGuard peers are read from (UAPI socket, kernel netlink, `wg`)
  tunnels   what each tunnel kind considers proof (pure verdicts) and how it is polled;
            the WireGuard peer and its handshake verdict are earlyfw.handshake's,
            which the Windows watcher shares
  openvpn   the OpenVPN management-interface client
  libnft    an in-process libnftables context (owns the guard tables)
  ruleset   one-transaction state changes, the guard tables, inspection
  events    nftables and link netlink events
  daemon    the loop that ties them together
"""
