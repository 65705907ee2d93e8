#!/usr/bin/python3
"""GStreamer's gst-rtsp-server as an RTSP camera, for the end-to-end tests.

Serves one live test pattern, encoded for each client afresh (x264enc or
x265enc: a keyframe every 30 frames), at rtsp://ADDRESS:PORT/cam, over the
lower transports asked for, optionally behind basic and digest
authentication. Each client's access units are written, as the encoder made
them, to AU_DUMP/session-N.aus (a 4-byte big-endian length, then the Annex B
bytes, per access unit), so a test can compare what the receiver decoded with
what the server sent, frame by frame.

Prints `READY <port>` once it listens and `SESSION <n> <frames>` when a
client's media ends; runs until killed.

Usage: rtsp_server.py --port P [--address A] [--codec h264|h265] [--frames N]
       [--protocols tcp,udp] [--user U --password W] [--au-dump DIR]
       [--udp-ports LOW-HIGH]
"""
import argparse
import os
import signal
import struct
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--codec", choices=["h264", "h265"], default="h264")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--protocols", default="tcp,udp")
    ap.add_argument("--user")
    ap.add_argument("--password")
    ap.add_argument("--au-dump")
    ap.add_argument("--bitrate", type=int, default=2000, help="kbit/s")
    ap.add_argument("--udp-ports", help="LOW-HIGH: send RTP/RTCP over UDP from these ports (for a loss rule to match)")
    args = ap.parse_args()

    Gst.init(None)
    if args.codec == "h264":
        enc = (
            "x264enc name=enc tune=zerolatency speed-preset=ultrafast key-int-max=30 "
            f"bitrate={args.bitrate} option-string=scenecut=0 ! video/x-h264,profile=baseline,stream-format=byte-stream,alignment=au "
            "! rtph264pay name=pay0 pt=96"
        )
    else:
        enc = (
            "x265enc name=enc tune=zerolatency speed-preset=ultrafast key-int-max=30 "
            f"bitrate={args.bitrate} option-string=open-gop=0:scenecut=0:repeat-headers=1 "
            "! video/x-h265,stream-format=byte-stream,alignment=au ! rtph265pay name=pay0 pt=96"
        )
    launch = (
        f"( videotestsrc is-live=true num-buffers={args.frames} pattern=ball "
        "! video/x-raw,width=640,height=360,framerate=30/1 "
        f"! {enc} )"
    )

    server = GstRtspServer.RTSPServer()
    server.set_address(args.address)
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(False)
    protocols = GstRtsp.RTSPLowerTrans(0)
    for p in args.protocols.split(","):
        protocols |= {"tcp": GstRtsp.RTSPLowerTrans.TCP, "udp": GstRtsp.RTSPLowerTrans.UDP}[p.strip()]
    factory.set_protocols(protocols)
    if args.udp_ports:
        low, high = (int(x) for x in args.udp_ports.split("-"))
        pool = GstRtspServer.RTSPAddressPool()
        if not pool.add_range(args.address, args.address, low, high, 0):
            sys.exit(f"cannot use UDP ports {args.udp_ports}")
        factory.set_address_pool(pool)

    if args.user is not None:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken.new()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "camera-user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        auth.add_digest(args.user, args.password, token)
        # Digest, as cameras ask for (Python cannot combine this enum with BASIC).
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        server.set_auth(auth)
        permissions = GstRtspServer.RTSPPermissions.new()
        permissions.add_permission_for_role("camera-user", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
        permissions.add_permission_for_role("camera-user", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
        factory.set_permissions(permissions)

    sessions = {"n": 0}

    def on_configure(_factory, media):
        n = sessions["n"]
        sessions["n"] += 1
        element = media.get_element()
        encoder = element.get_by_name("enc")
        count = {"frames": 0}
        dump = None
        if args.au_dump:
            os.makedirs(args.au_dump, exist_ok=True)
            dump = open(os.path.join(args.au_dump, f"session-{n}.aus"), "wb")

        def probe(_pad, info):
            buf = info.get_buffer()
            # While the media prerolls, the server flushes what the encoder
            # pushed and the encoder pushes its first access unit again: only
            # the last push of a PTS goes out, so a repeat is not another
            # frame (the reader keeps the last of each PTS).
            if buf.pts != count.get("pts"):
                count["frames"] += 1
            count["pts"] = buf.pts
            if dump is not None:
                # extract_dup copies through introspection; Gst.MapInfo.data
                # is not usable without gst-python's overrides.
                data = buf.extract_dup(0, buf.get_size())
                dump.write(struct.pack(">QI", buf.pts, len(data)))
                dump.write(data)
                dump.flush()
            return Gst.PadProbeReturn.OK

        def on_eos(_pad, info):
            if info.get_event().type == Gst.EventType.EOS:
                print(f"SESSION {n} {count['frames']}", flush=True)
            return Gst.PadProbeReturn.OK

        pad = encoder.get_static_pad("src")
        pad.add_probe(Gst.PadProbeType.BUFFER, probe)
        pad.add_probe(Gst.PadProbeType.EVENT_DOWNSTREAM, on_eos)
        print(f"CLIENT {n}", flush=True)

    factory.connect("media-configure", on_configure)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {args.address}:{args.port}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop = GLib.MainLoop()
    signal.signal(signal.SIGTERM, lambda *_: loop.quit())
    signal.signal(signal.SIGINT, lambda *_: loop.quit())
    GLib.timeout_add(200, lambda: True)  # lets Python's signal handlers run
    loop.run()


if __name__ == "__main__":
    main()
