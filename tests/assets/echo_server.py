"""Test backend: answers HTTP (one request per connection, HTTP/1.0) and UDP with its pod
name and the peer address it saw, so tests can tell which backend answered and whether the
client's address was preserved. With LINE_PORT, also a TCP server that answers every line
of a connection the same way, for connections held open across several exchanges.
Every server listens on both families (IPv6 where the pod has it), separately: an IPv4
peer shows as a.b.c.d:port, an IPv6 one as [addr]:port.

usage: echo_server.py NAME TCP_PORT UDP_PORT [LINE_PORT]
"""
import http.server
import socket
import socketserver
import sys
import threading

NAME, TCP_PORT, UDP_PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
LINE_PORT = int(sys.argv[4]) if len(sys.argv) > 4 else None


def peer_text(peer):
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{NAME} {peer_text(self.client_address)}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def udp_echo(family, address):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, UDP_PORT))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(f"{NAME} {peer_text(peer)} ".encode() + data, peer)


class Lines(socketserver.StreamRequestHandler):
    def handle(self):
        peer = peer_text(self.client_address)
        for line in self.rfile:
            self.wfile.write(f"{NAME} {peer} ".encode() + line)


class LineServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    # Hundreds of new connections a second (tests/tests/restarts.rs): socketserver's default
    # backlog of 5 overflows whenever the process is descheduled for a moment.
    request_queue_size = 256


class V6Only:
    """The IPv6 listener of a server: IPv6 only, beside the IPv4 one."""

    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


class LineServer6(V6Only, LineServer):
    pass


class HttpServer6(V6Only, http.server.ThreadingHTTPServer):
    pass


def serve(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()


def start_ipv6():
    """The IPv6 listeners; none where the namespace has IPv6 disabled."""
    try:
        if LINE_PORT:
            serve(LineServer6(("::", LINE_PORT), Lines))
        serve(HttpServer6(("::", TCP_PORT), Handler))
    except OSError:
        return
    threading.Thread(target=udp_echo, args=(socket.AF_INET6, "::"), daemon=True).start()


threading.Thread(target=udp_echo, args=(socket.AF_INET, "0.0.0.0"), daemon=True).start()
if LINE_PORT:
    serve(LineServer(("0.0.0.0", LINE_PORT), Lines))
start_ipv6()
http.server.ThreadingHTTPServer(("0.0.0.0", TCP_PORT), Handler).serve_forever()
