# The backend image: `sluice-backend` (simulated engine by default, or the native engine with
# model files mounted at /models), as a non-root user.
#   docker build -f deploy/docker/backend.Dockerfile -t sluice-backend .
# CUDA: build the same binary on nvidia/cuda:12.8.0-runtime-ubuntu24.04 as the runtime base;
# it loads libcuda, NVRTC and cuBLAS at run time (see docs/operations.md).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sluice-backend \
 && cp target/release/sluice-backend /usr/local/bin/sluice-backend

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10002 --no-create-home sluice
COPY --from=build /usr/local/bin/sluice-backend /usr/local/bin/sluice-backend
USER 10002
EXPOSE 9000
HEALTHCHECK --interval=10s --timeout=2s --retries=3 CMD ["curl", "-fsS", "http://127.0.0.1:9000/health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sluice-backend", "--listen", "0.0.0.0:9000"]
CMD ["--engine", "sim", "--model", "sluice-sim"]
