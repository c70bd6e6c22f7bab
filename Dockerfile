# Build: a release binary of approval-bridge, without the `sandbox` feature:
# the image carries no simulators and no `sandbox` subcommand.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
# The checked queries compile from this offline data: no database at build time.
COPY .sqlx .sqlx
COPY templates templates
COPY static static
RUN cargo build --release --locked

# Run: the binary alone (templates and static files are built in).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/approval-bridge /usr/local/bin/approval-bridge
WORKDIR /app
ENV APPROVAL_BRIDGE_LISTEN=0.0.0.0:8080
EXPOSE 8080
USER nobody
ENTRYPOINT ["approval-bridge"]
CMD ["serve"]
