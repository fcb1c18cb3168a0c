# stowage's container image, for those with a container engine:
#
#   docker build -t stowage:0.1.0 .        (or podman build / buildah bud)
#
# scripts/image builds the same image with no engine at all (mmdebstrap + umoci) and is what
# CI builds and tests (crates/stowage/tests/image_archive.rs). Both install exactly the
# packages of deploy/image/packages and trim with deploy/image/slim; the test checks that
# this file's suite, version, entrypoint and labels agree with the script.

ARG DEBIAN_SUITE=bookworm
ARG RUST_VERSION=1

# Build: the release binary, against the same Debian release (glibc) as the runtime.
FROM rust:${RUST_VERSION}-${DEBIAN_SUITE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p stowage \
 && install -m 0755 target/release/stowage /stowage

# Runtime: Debian with only the programs the driver runs (mkfs and grow tools of the
# filesystems it formats); loop devices, mounts and quotas are syscalls.
FROM debian:${DEBIAN_SUITE}-slim
ARG VERSION=0.1.0
COPY deploy/image/packages deploy/image/slim /tmp/image/
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      $(sed 's/#.*//' /tmp/image/packages) \
 && sh /tmp/image/slim
COPY --from=build /stowage /usr/local/bin/stowage
LABEL org.opencontainers.image.title="stowage" \
      org.opencontainers.image.description="stowage: a CSI driver that turns a node's disks into capacity-enforced persistent volumes." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# Pass --build-arg SOURCE=<url of the repository> to label where it came from.
ARG SOURCE=""
LABEL org.opencontainers.image.source="${SOURCE}"
# No USER: a CSI node plugin runs as root (privileged in the DaemonSet) to mount, set up loop
# devices and set quotas.
# The DaemonSet (deploy/kubernetes/daemonset.yaml) passes only `args: [serve, …]`, so the
# entrypoint must be the binary itself.
ENTRYPOINT ["/usr/local/bin/stowage"]
