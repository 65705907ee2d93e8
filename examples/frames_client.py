#!/usr/bin/env python3
"""Reads decoded frames from a ZeroDrop stream's frames socket
(spec.outputs.frames.socketDirectory) and prints one line per frame.

    python3 examples/frames_client.py /run/zerodrop/frames/demo.cam-1.sock

Each frame is a 48-byte little-endian header followed by the picture's
planes without padding (I420: Y, then U, then V). With numpy, the luma plane
is numpy.frombuffer(picture, numpy.uint8, width * height).reshape(height, width).
"""
import socket
import struct
import sys
from datetime import datetime, timezone

HEADER = struct.Struct("<4sIII4sQqQI")  # magic, header length, width, height, format, index, sender ns, pts ns, length


def read_exactly(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def main(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    while True:
        try:
            magic, hlen, width, height, fmt, index, sender_ns, pts_ns, length = HEADER.unpack(read_exactly(sock, HEADER.size))
            assert magic == b"ZDF1" and hlen == HEADER.size, "not a ZeroDrop frames socket"
            picture = read_exactly(sock, length)
        except EOFError:
            return
        when = "-" if sender_ns < 0 else datetime.fromtimestamp(sender_ns / 1e9, timezone.utc).isoformat()
        luma = sum(picture[: width * height]) / (width * height)
        print(f"frame {index} {width}x{height} {fmt.decode()} sender-time {when} mean-luma {luma:.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
