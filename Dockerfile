# Muster container image: a release build in the Rust image, run as a non-root user on
# debian-slim. Build: docker build --build-arg MUSTER_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t muster .
# Run:   docker run -p 443:443 -p 8883:8883 -p 5671:5671 -v muster-data:/var/lib/muster muster \
#          serve --listen 0.0.0.0 --dps-host dps.example.lan
# The toolchain CI builds and tests with (the workspace's rust-version is the floor, not what
# the locked dependencies were checked with).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# .git is not copied (.dockerignore): the commit comes in as a build argument.
ARG MUSTER_GIT_COMMIT=unknown
ENV MUSTER_GIT_COMMIT=${MUSTER_GIT_COMMIT}
RUN cargo build --release --locked -p muster \
    && install -m 0755 target/release/muster /usr/local/bin/muster

FROM debian:bookworm-slim
# ca-certificates: the system roots for linked Azure hubs, webhooks and `muster` client
# commands; curl: the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/muster --shell /usr/sbin/nologin muster \
    && install -d -o muster -g muster -m 0700 /var/lib/muster
COPY --from=build /usr/local/bin/muster /usr/local/bin/muster
USER muster
ENV MUSTER_DATA_DIR=/var/lib/muster
VOLUME ["/var/lib/muster"]
EXPOSE 443 8883 5671
# Binding 443 as a non-root user: the kernel's unprivileged port floor is 0 in a container
# network namespace on current Docker and Podman; otherwise map another port, e.g.
# --https-port 8443 -p 443:8443.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD curl -fsS --insecure "https://127.0.0.1:${MUSTER_HTTPS_PORT:-443}/healthz" || exit 1
ENTRYPOINT ["/usr/local/bin/muster"]
CMD ["serve", "--listen", "0.0.0.0", "--dps-host", "localhost"]
