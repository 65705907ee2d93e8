#!/usr/bin/env python3
"""Writes the small seed corpora the fuzz targets start from: a few real RTP,
RTCP and H.264/H.265 packets, ST 2022-1 and ULPFEC streams, and the
repository's example manifests.

Run from anywhere: `python3 fuzz/seeds.py`. Seeds are named `seed-*` and
committed; everything else the fuzzer adds to fuzz/corpus is ignored.
"""
import pathlib
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent


def write(target, name, data):
    d = FUZZ / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def rtp(seq, ts, payload, pt=96, marker=False, ssrc=0xDEADBEEF, csrcs=(), ext=None, padding=0):
    b0 = 0x80 | (0x20 if padding else 0) | (0x10 if ext is not None else 0) | len(csrcs)
    head = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq, ts, ssrc)
    head += b"".join(struct.pack("!I", c) for c in csrcs)
    if ext is not None:
        profile, body = ext
        head += struct.pack("!HH", profile, len(body) // 4) + body
    pad = (b"\0" * (padding - 1) + bytes([padding])) if padding else b""
    return head + payload + pad


def rtcp(fmt_or_count, pt, body):
    assert len(body) % 4 == 0
    return struct.pack("!BBH", 0x80 | fmt_or_count, pt, len(body) // 4) + body


def sdes_cname(ssrc, cname):
    item = bytes([1, len(cname)]) + cname + b"\0"
    item += b"\0" * (-len(item) % 4)
    return rtcp(1, 202, struct.pack("!I", ssrc) + item)


# H.264 NAL units (nal_unit_type in the low 5 bits of the first byte).
SPS = bytes([0x67, 0x42, 0xC0, 0x1F, 0xDA, 0x01, 0x40, 0x16, 0xE8])
PPS = bytes([0x68, 0xCE, 0x3C, 0x80])
AUD = bytes([0x09, 0xF0])
IDR = bytes([0x65, 0x88, 0x84]) + bytes(range(3, 200))
P_SLICE = bytes([0x41, 0x9A, 0x02, 0x04, 0x05, 0x06])


def stap_a(nals):
    return bytes([0x18]) + b"".join(struct.pack("!H", len(n)) + n for n in nals)


def fu_a(nal, chunk):
    body = nal[1:]
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    out = []
    for i, part in enumerate(parts):
        fu = (nal[0] & 0x1F) | (0x80 if i == 0 else 0) | (0x40 if i == len(parts) - 1 else 0)
        out.append(bytes([(nal[0] & 0xE0) | 28, fu]) + part)
    return out


# H.265 NAL units (nal_unit_type in bits 1-6 of the first byte).
VPS5 = bytes([0x40, 0x01, 0x0C, 0x01, 0xFF])
SPS5 = bytes([0x42, 0x01, 0x01, 0x01, 0x60])
PPS5 = bytes([0x44, 0x01, 0xC1, 0x72])
IDR5 = bytes([0x26, 0x01, 0xAF]) + bytes(range(0, 150))  # IDR_W_RADL
TRAIL5 = bytes([0x02, 0x01, 0xD0, 0x11, 0x22])  # TRAIL_R, first slice


def ap(nals):
    return bytes([48 << 1, 1]) + b"".join(struct.pack("!H", len(n)) + n for n in nals)


def fu5(nal, chunk):
    body = nal[2:]
    t = (nal[0] >> 1) & 0x3F
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    out = []
    for i, part in enumerate(parts):
        fu = t | (0x80 if i == 0 else 0) | (0x40 if i == len(parts) - 1 else 0)
        out.append(bytes([(nal[0] & 0x81) | (49 << 1), nal[1], fu]) + part)
    return out


def depay_input(first_ts, packets):
    """Layout read by zerodrop_fuzz::DepayInput: first timestamp, then per
    packet flags (marker, loss before, timestamp step), length, payload."""
    out = struct.pack("!I", first_ts)
    for payload, step, marker, loss in packets:
        flags = (1 if marker else 0) | (2 if loss else 0) | (step << 2)
        out += bytes([flags]) + struct.pack("!H", len(payload)) + payload
    return out


def xor(a, b):
    n = max(len(a), len(b))
    return bytes(x ^ y for x, y in zip(a.ljust(n, b"\0"), b.ljust(n, b"\0")))


def st2022_fec(media, row, columns, rows, seq, pt=97):
    """An ST 2022-1 FEC packet over `media` as GStreamer's rtpst2022-1-fecenc
    writes it: payloads (after the 12-byte header here) XORed and
    zero-padded, lengths, PT, timestamp and M XORed, SSRC 0."""
    payload, length, ptx, ts, m = b"", 0, 0, 0, 0
    for p in media:
        payload = xor(payload, p[12:])
        length ^= len(p) - 12
        ptx ^= p[1] & 0x7F
        ts ^= struct.unpack("!I", p[4:8])[0]
        m ^= p[1] >> 7
    sn_base = struct.unpack("!H", media[0][2:4])[0]
    last_ts = struct.unpack("!I", media[-1][4:8])[0]
    head = struct.pack("!BBHII", 0x80, (m << 7) | pt, seq, last_ts, 0)
    offset, na = (1, columns) if row else (columns, rows)
    fec = struct.pack("!HHB3sIBBBB", sn_base, length, 0x80 | ptx, b"\0\0\0", ts, 0x40 if row else 0, offset, na, 0)
    return head + fec + payload


def ulpfec(media, seq, pt=122):
    """A ULPFEC packet protecting `media` (consecutive, at most 16) as
    rtpulpfecenc writes it: in the media's SSRC and sequence space, the RFC
    5109 bit string over everything after the 12-byte header."""
    head, length, body, mask = bytes(8), 0, b"", 0
    sn_base = struct.unpack("!H", media[0][2:4])[0]
    for p in media:
        head = xor(head, p[:8])
        length ^= len(p) - 12
        body = xor(body, p[12:])
        mask |= 1 << (15 - (struct.unpack("!H", p[2:4])[0] - sn_base))
    ts, ssrc = media[-1][4:8], media[-1][8:12]
    fec = bytes([head[0] & 0x3F, head[1]]) + struct.pack("!H4sHHH", sn_base, head[4:8], length, len(body), mask)
    return struct.pack("!BBH", 0x80, pt, seq) + ts + ssrc + fec + body


def fec_op(kind, marker=False, lost=False):
    """The smallest op byte of the FEC targets' layout with `op % 5 == kind`
    and the checked run's marker (bit 5) and loss (bit 6) flags."""
    return next(op for op in range(256)
                if op % 5 == kind and bool(op & 0x20) == marker and bool(op & 0x40) == lost)


def fec_record(op, data=b""):
    """One record of the FEC targets' layout: op byte, then for ops 0, 1 and 4
    the length and the bytes."""
    return bytes([op]) + (struct.pack("!H", len(data)) + data if op % 5 in (0, 1, 4) else b"")


def fec_checked(header, frames, lost):
    """Header bytes, then checked payloads: `frames` packets per frame, the
    packets at the indices in `lost` lost."""
    out, i = bytes(header), 0
    for n in frames:
        for k in range(n):
            payload = bytes((i * 7 + j) & 0xFF for j in range(20 + (i * 13) % 90))
            out += fec_record(fec_op(4, marker=k == n - 1, lost=i in lost), payload)
            i += 1
    return out


def main():
    # rtp: plain packets, one with CSRCs, a header extension and padding, and an RTX.
    write("rtp", "idr", rtp(4242, 90000, IDR, marker=True))
    write("rtp", "fu-a", rtp(7, 3000, fu_a(IDR, 60)[0]))
    write("rtp", "csrc-ext-padding", rtp(65535, 0xFFFFFFF0, P_SLICE, marker=True, csrcs=(1, 2),
                                         ext=(0xBEDE, bytes([0x10, 0xAA, 0, 0])), padding=4))
    write("rtp", "rtx", rtp(9, 3000, struct.pack("!H", 4242) + P_SLICE, pt=97, ssrc=0x1111))

    # rtcp: what the receiver writes (RR, SDES, NACK, PLI) and what senders send (SR, FIR, BYE).
    report_block = struct.pack("!IBBHIIII", 0xDEADBEEF, 12, 0, 5, 0x0001_0063, 3, 0x4567_89AB, 655)
    rr = rtcp(1, 201, struct.pack("!I", 1) + report_block)
    nack = rtcp(1, 205, struct.pack("!IIHH", 1, 0xDEADBEEF, 100, 0b1000_0000_0000_0101))
    pli = rtcp(1, 206, struct.pack("!II", 1, 0xDEADBEEF))
    write("rtcp", "rr-sdes-nack-pli", rr + sdes_cname(1, b"zerodrop@test") + nack + pli)
    sr = rtcp(0, 200, struct.pack("!IQIII", 9, 0x0123_4567_89AB_CDEF, 90000, 10, 1000))
    write("rtcp", "sr-sdes", sr + sdes_cname(9, b"sender"))
    fir = rtcp(4, 206, struct.pack("!IIIB3x", 9, 0, 0xDEADBEEF, 1))
    write("rtcp", "rr-fir-bye", rtcp(0, 201, struct.pack("!I", 1)) + fir + rtcp(1, 203, struct.pack("!I", 9)))
    # REMB (draft-alvestrand-rmcat-remb): 300,000 bit/s = 150,000 x 2^1 for one SSRC.
    remb = rtcp(15, 206, struct.pack("!II4sI", 1, 0, b"REMB", (1 << 24) | (1 << 18) | 150000) + struct.pack("!I", 0xDEADBEEF))
    write("rtcp", "rr-remb", rtcp(0, 201, struct.pack("!I", 1)) + remb)

    # depay_h264: keyframe from STAP-A and FU-A, P frames, then a loss inside a frame.
    idr_parts = fu_a(IDR, 60)
    clean = [(stap_a([AUD, SPS, PPS]), 0, False, False)]
    clean += [(p, 0, i == len(idr_parts) - 1, False) for i, p in enumerate(idr_parts)]
    clean += [(P_SLICE, 2, True, False), (P_SLICE, 2, True, False)]
    write("depay_h264", "keyframe-then-p", depay_input(0, clean))
    p_parts = fu_a(bytes([0x41, 0x9A]) + bytes(range(120)), 40)
    lossy = clean + [(p_parts[0], 2, False, False), (p_parts[2], 0, True, True),
                     (P_SLICE, 2, True, False), (stap_a([SPS, PPS, IDR]), 2, True, False)]
    write("depay_h264", "loss-then-keyframe", depay_input(0xFFFF_F000, lossy))

    # depay_h265: AP of parameter sets, FU keyframe, a trailing picture, then a lost frame.
    idr5_parts = fu5(IDR5, 50)
    clean5 = [(ap([VPS5, SPS5, PPS5]), 0, False, False)]
    clean5 += [(p, 0, i == len(idr5_parts) - 1, False) for i, p in enumerate(idr5_parts)]
    clean5 += [(TRAIL5, 2, True, False)]
    write("depay_h265", "keyframe-then-trail", depay_input(1000, clean5))
    write("depay_h265", "missing-frame", depay_input(1000, clean5 + [(TRAIL5, 4, True, True)]))


    # fec_st2022_1: the checked run with a 4x3 matrix and an L-shaped loss,
    # then a raw row FEC packet that recovers one lost packet.
    # Header: L = 1 + 3 % 8, D = 3 % 9, raw window 16 << (5 % 6).
    write("fec_st2022_1", "checked-4x3-l-shape", fec_checked([3, 3, 5], [5, 3, 6, 4, 7, 5, 6, 4], {17, 21, 22}))
    write("fec_st2022_1", "checked-row-only", fec_checked([5, 0, 4], [3, 8, 2, 9], {4, 11}))
    row = [rtp(100 + i, 3000 * (1 + i // 3), bytes(range(i, 30 + 11 * i)), ssrc=0, marker=i % 3 == 2) for i in range(4)]
    raw = bytes([3, 3, 5]) + b"".join(fec_record(fec_op(0), p) for i, p in enumerate(row) if i != 2)
    raw += fec_record(fec_op(1), st2022_fec(row, True, 4, 3, 0)) + fec_record(fec_op(2)) + fec_record(fec_op(3))
    write("fec_st2022_1", "raw-row-recovers", raw)

    # fec_ulpfec: the checked run at 30 % (multipacket) and 50 % (every second
    # packet), then a raw FEC packet that recovers one lost packet.
    write("fec_ulpfec", "checked-30pct-multipacket", fec_checked([30, 1, 5], [6, 2, 1, 5, 9, 3, 1, 4], {3, 8, 14, 20}))
    write("fec_ulpfec", "checked-50pct-single", fec_checked([50, 0, 4], [4, 4, 4], {1, 5}))
    frame = [rtp(200 + i, 6000, bytes(range(i, 25 + 17 * i)), ssrc=0x1234, marker=i == 3) for i in range(4)]
    raw = bytes([30, 1, 5]) + b"".join(fec_record(fec_op(0), p) for i, p in enumerate(frame) if i != 1)
    raw += fec_record(fec_op(1), ulpfec(frame, 204)) + fec_record(fec_op(2)) + fec_record(fec_op(3))
    write("fec_ulpfec", "raw-fec-recovers", raw)

    # manifest: the repository's examples.
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        write("manifest", path.stem + ".yaml", path.read_bytes())


if __name__ == "__main__":
    main()
