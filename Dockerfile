# hoard: a pull-through caching registry mirror.
#   docker build --build-arg HOARD_GIT_COMMIT=$(git rev-parse --short=12 HEAD) \
#     --build-arg HOARD_VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1) -t hoard .
#   docker run -d -p 5000:5000 -v hoard-data:/var/lib/hoard hoard
#
# Offline or air-gapped (see the README's "Building the image offline"):
# BUILD_IMAGE and RUNTIME_IMAGE name other bases, and BINARY_FROM an image
# holding a hoard built elsewhere at /out/hoard (and /out/data, owned by
# 65532), which skips the Rust stage entirely under BuildKit.
ARG BUILD_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARY_FROM=build

# Build stage, on the toolchain CI tests with (the locked dependencies need
# 1.89 or later). Dependencies are built first against stub sources, so a
# change to src/ reuses the dependency layer (the cargo-chef idea, without
# the extra tool).
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY scripts/build_info.rs scripts/build_info.rs
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/hot.rs \
 && cargo build --release --locked \
 && rm -rf src benches
COPY src src
COPY benches benches
ARG HOARD_GIT_COMMIT=unknown
ENV HOARD_GIT_COMMIT=${HOARD_GIT_COMMIT}
# touch: make cargo rebuild hoard itself over the stub build. Line tables
# are stripped (59 -> 13 MB); symbols stay for panic backtraces.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D target/release/hoard /out/hoard \
 && strip --strip-debug /out/hoard \
 && install -d -o 65532 -g 65532 /out/data

# Where the binary comes from: the stage above, or a prebuilt image.
FROM ${BINARY_FROM} AS binary

# Runtime: glibc, CA certificates and a non-root user, nothing else
# (no shell: the health check is hoard itself).
FROM ${RUNTIME_IMAGE}
ARG HOARD_GIT_COMMIT=unknown
ARG HOARD_VERSION=unknown
LABEL org.opencontainers.image.title="hoard" \
      org.opencontainers.image.version="${HOARD_VERSION}" \
      org.opencontainers.image.description="Pull-through caching mirror for container registries" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${HOARD_GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/hoard-registry/hoard"
COPY --from=binary /out/hoard /usr/local/bin/hoard
COPY --from=binary --chown=65532:65532 /out/data /var/lib/hoard
ENV HOARD_DATA_DIR=/var/lib/hoard \
    HOARD_LISTEN=0.0.0.0:5000 \
    HOARD_LOG_FORMAT=json
USER 65532:65532
EXPOSE 5000
VOLUME ["/var/lib/hoard"]
# `hoard health` asks the listener `serve` uses, from the same HOARD_*
# variables and config file (TLS included), wherever it was moved.
HEALTHCHECK --interval=30s --timeout=6s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/hoard", "health"]
ENTRYPOINT ["/usr/local/bin/hoard"]
CMD ["serve"]
