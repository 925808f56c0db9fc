"""Test backend: answers HTTP (one request per connection, HTTP/1.0) and UDP with its pod
name and the peer address it saw, so tests can tell which backend answered and whether the
client's address was preserved. With LINE_PORT, also a TCP server that answers every line
of a connection the same way, for connections held open across several exchanges.

usage: echo_server.py NAME TCP_PORT UDP_PORT [LINE_PORT]
"""
import http.server
import socket
import socketserver
import sys
import threading

NAME, TCP_PORT, UDP_PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
LINE_PORT = int(sys.argv[4]) if len(sys.argv) > 4 else None


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{NAME} {self.client_address[0]}:{self.client_address[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def udp_echo():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", UDP_PORT))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(f"{NAME} {peer[0]}:{peer[1]} ".encode() + data, peer)


class Lines(socketserver.StreamRequestHandler):
    def handle(self):
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        for line in self.rfile:
            self.wfile.write(f"{NAME} {peer} ".encode() + line)


class LineServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    # Hundreds of new connections a second (tests/tests/restarts.rs): socketserver's default
    # backlog of 5 overflows whenever the process is descheduled for a moment.
    request_queue_size = 256


threading.Thread(target=udp_echo, daemon=True).start()
if LINE_PORT:
    lines = LineServer(("0.0.0.0", LINE_PORT), Lines)
    threading.Thread(target=lines.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", TCP_PORT), Handler).serve_forever()
