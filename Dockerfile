# One image for the operator and the proxies: `llmproxy operator`, `llmproxy proxy`.
# Build: docker build -t ghcr.io/llmproxy/llmproxy:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin llmproxy \
 && strip target/release/llmproxy

# glibc, libgcc, CA certificates and a non-root user (65532), nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/llmproxy /usr/local/bin/llmproxy
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/llmproxy"]
CMD ["--help"]
