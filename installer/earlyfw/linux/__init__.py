"""earlyfw on Linux: nftables from the initramfs, systemd units, the handshake watcher."""
