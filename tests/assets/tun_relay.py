"""A userspace Layer-3 tunnel, standing in for WireGuard (whose kernel module this test
kernel lacks): IP packets the node routes into the TUN device TUN are sent, whole, as UDP
datagrams over the underlay to the peer node that owns their destination; datagrams from
peers are written into TUN, so they arrive on it as a WireGuard device delivers them (no
link-layer header, link/none). No encryption: only the shape of the device matters here.

usage: tun_relay.py TUN LOCAL_IP PORT CIDR=PEER_IP [CIDR=PEER_IP ...]

Run inside the node's network namespace; TUN must exist (ip tuntap add mode tun ...).
"""
import fcntl
import ipaddress
import os
import selectors
import socket
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

name, local, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
peers = []
for route in sys.argv[4:]:
    cidr, peer = route.split("=")
    peers.append((ipaddress.ip_network(cidr), peer))

tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((local, port))

selector = selectors.DefaultSelector()
selector.register(tun, selectors.EVENT_READ, "tun")
selector.register(udp, selectors.EVENT_READ, "udp")
while True:
    for key, _ in selector.select():
        if key.data == "tun":
            packet = os.read(tun, 65535)
            if len(packet) < 20 or packet[0] >> 4 != 4:
                continue
            destination = ipaddress.ip_address(packet[16:20])
            for network, peer in peers:
                if destination in network:
                    try:
                        udp.sendto(packet, (peer, port))
                    except OSError:
                        pass  # as a tunnel loses what it cannot carry
                    break
        else:
            packet, _ = udp.recvfrom(65535)
            try:
                os.write(tun, packet)
            except OSError:
                pass
