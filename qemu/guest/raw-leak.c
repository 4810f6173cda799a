/* The raw-socket leak source: an AF_PACKET socket bypasses every inet hook,
 * so only a netdev egress chain can stop what it sends. From the first moment
 * systemd runs units in the real root it tries, every 50 ms, to send one
 * hand-built IPv4/UDP frame out of every non-loopback interface that is up:
 * to 192.0.2.99 port 9999 (RFC 5737), payload "earlyfw-qemu raw leak". It
 * brings no link up itself: it leaks as soon as anything else does.
 * Built static on the host (gcc -static), so the guest needs no compiler. */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static const char PAYLOAD[] = "earlyfw-qemu raw leak";

static uint16_t checksum(const uint8_t *p, size_t n) {
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < n; i += 2) sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void send_on(int fd, const struct if_nameindex *nic) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, nic->if_name, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0 || !(ifr.ifr_flags & IFF_UP) || (ifr.ifr_flags & IFF_LOOPBACK)) return;
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) return;
    uint8_t frame[14 + 20 + 8 + sizeof PAYLOAD - 1];
    uint8_t *ip = frame + 14, *udp = ip + 20;
    memset(frame, 0xff, 6);
    memcpy(frame + 6, ifr.ifr_hwaddr.sa_data, 6);
    frame[12] = 0x08, frame[13] = 0x00;
    memset(ip, 0, 20);
    ip[0] = 0x45, ip[8] = 64, ip[9] = 17;
    uint16_t total = htons((uint16_t)(sizeof frame - 14));
    memcpy(ip + 2, &total, 2);
    inet_pton(AF_INET, "10.0.2.15", ip + 12);
    inet_pton(AF_INET, "192.0.2.99", ip + 16);
    uint16_t sum = htons(checksum(ip, 20));
    memcpy(ip + 10, &sum, 2);
    uint16_t ports[4] = {htons(40000), htons(9999), htons((uint16_t)(8 + sizeof PAYLOAD - 1)), 0};
    memcpy(udp, ports, 8);
    memcpy(udp + 8, PAYLOAD, sizeof PAYLOAD - 1);
    struct sockaddr_ll to;
    memset(&to, 0, sizeof to);
    to.sll_family = AF_PACKET;
    to.sll_ifindex = (int)nic->if_index;
    to.sll_halen = 6;
    memset(to.sll_addr, 0xff, 6);
    sendto(fd, frame, sizeof frame, 0, (struct sockaddr *)&to, sizeof to);
}

int main(void) {
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) return 1;
    const struct timespec pause = {0, 50 * 1000 * 1000};
    for (;;) {
        struct if_nameindex *nics = if_nameindex();
        for (struct if_nameindex *n = nics; n && n->if_index; n++) send_on(fd, n);
        if (nics) if_freenameindex(nics);
        nanosleep(&pause, NULL);
    }
}
