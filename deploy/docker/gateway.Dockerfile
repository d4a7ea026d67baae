# The gateway image: `sluice` on a small Debian runtime, as a non-root user.
#   docker build -f deploy/docker/gateway.Dockerfile -t sluice-gateway .
FROM rust:1.95-bookworm AS build
# pingora builds zlib-ng with cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sluice \
 && cp target/release/sluice /usr/local/bin/sluice

FROM debian:bookworm-slim
# curl: the health check. ca-certificates: OTLP or Redis endpoints over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
COPY policies/sluice.example.toml /etc/sluice/sluice.toml
USER 10001
WORKDIR /var/lib/sluice
ENV SLUICE_LISTEN=0.0.0.0:8080 \
    SLUICE_ADMIN_LISTEN=0.0.0.0:8081 \
    SLUICE_DATA_DIR=/var/lib/sluice
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=2s --retries=3 CMD ["curl", "-fsS", "http://127.0.0.1:8080/health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["serve", "--config", "/etc/sluice/sluice.toml"]
