#!/bin/sh
# earlyfw demo: install the bundled example config into a scratch image root,
# show what was written, then load it in a throwaway network namespace (never
# the host's own) and show what `earlyfw status` reports there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
config="$here/earlyfw.toml"
image=$(mktemp -d /tmp/earlyfw-demo.XXXXXX)
netns="earlyfw-demo-$$"
trap 'ip netns del "$netns" 2>/dev/null || true' EXIT

echo "== earlyfw install --root $image (image build; touches nothing live)"
earlyfw --config "$config" install --root "$image" --target core
echo
echo "== the blocked ruleset, as the initramfs and earlyfw-block.service load it"
sed -n '/^table inet earlyfw {/,/^}/p' "$image/etc/earlyfw/blocked.nft"
echo
echo "== loaded in a throwaway network namespace: earlyfw status"
ip netns add "$netns"
ip netns exec "$netns" earlyfw --config "$config" apply --state blocked
ip netns exec "$netns" earlyfw --config "$config" status
echo
echo "== uninstall removes exactly what install wrote"
earlyfw uninstall --root "$image"
rmdir "$image"
