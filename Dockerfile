# syntax=docker/dockerfile:1
# drover's image: one binary (api | worker | scheduler | migrate | …), non-root, made for a
# read-only root filesystem (it writes only to /tmp, mounted as a volume in k8s/).
#
#   docker build -t drover:dev .
#
# Dependencies are compiled in a layer of their own (cargo-chef): editing drover's sources
# rebuilds only drover's crates.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
# Line tables only in the release profile (Cargo.toml) would double the image: none here.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_TERM_COLOR=never
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Changes only when Cargo.toml / Cargo.lock change.
RUN cargo chef cook --release --locked --bin drover --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin drover \
 && cp target/release/drover /usr/local/bin/drover

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# postgresql-client: pg_dump/pg_restore for the backups family; tini: reaps pg_dump's children
# and forwards signals (drover drains on SIGTERM); ca-certificates: TLS to S3 and brokers.
# Versions float with the Debian release's security updates, hence no pins.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 drover \
 && useradd --system --uid 10001 --gid drover --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin drover \
 && install -d -o drover -g drover -m 0750 /var/lib/drover
COPY --from=builder /usr/local/bin/drover /usr/local/bin/drover
# `drover dev` keeps its SQLite files in the working directory.
WORKDIR /var/lib/drover
USER 10001:10001
ENV DROVER_LISTEN=0.0.0.0:8080 \
    DROVER_WORKER_LISTEN=0.0.0.0:9091 \
    DROVER_LOG_FORMAT=json
EXPOSE 8080 9091
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/drover"]
CMD ["api"]
