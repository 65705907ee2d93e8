# One image for the operator and the data plane:
#   docker build -t zerodrop .
#   data plane:  zerodrop pod --config /etc/zerodrop/pipeline.yaml   (the operator sets this)
#   operator:    zerodrop-operator
#   node agent:  zerodrop-agent           (DaemonSet; CAP_BPF + CAP_PERFMON)
# The data plane needs GStreamer at run time; NVDEC additionally needs the
# NVIDIA container runtime to mount the driver (libcuda, libnvcuvid).

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev \
      clang libbpf-dev linux-libc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p zerodrop --bin zerodrop \
 && cargo build --release --locked -p zerodrop-operator --bin zerodrop-operator \
 && cargo build --release --locked -p zerodrop-ebpf --bin zerodrop-agent \
 && strip target/release/zerodrop target/release/zerodrop-operator target/release/zerodrop-agent

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libgstreamer1.0-0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
      gstreamer1.0-plugins-bad gstreamer1.0-libav \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 zerodrop && useradd --uid 65532 --gid 65532 --no-create-home zerodrop
COPY --from=build /src/target/release/zerodrop /src/target/release/zerodrop-operator \
     /src/target/release/zerodrop-agent /usr/local/bin/
# The root filesystem is read-only in the pods: GStreamer keeps its plugin
# registry under a writable emptyDir-free location.
ENV GST_REGISTRY=/tmp/gstreamer-registry.bin
USER 65532:65532
EXPOSE 9464/tcp
ENTRYPOINT ["/usr/local/bin/zerodrop"]
