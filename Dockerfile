# approval-bridge in a container: `docker build -t approval-bridge .`
# See docker-compose.yml for a complete example with Postgres.
#
# Build stage: a release binary without the `sandbox` feature, so the image
# carries no simulators and no `sandbox` subcommand. The migrations are
# compiled into the binary (`sqlx::migrate!`), as are the templates and the
# stylesheet: the runtime stage needs no files besides the binary.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Checked queries compile from the committed `.sqlx/` data, never a database.
ENV SQLX_OFFLINE=true
# Dependencies first, in their own layer: a change to the code alone does not
# rebuild them.
COPY Cargo.toml Cargo.lock ./
# (The placeholder test file only satisfies the manifest's `[[test]]` path.)
RUN mkdir -p src tests/api \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/api/main.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
COPY migrations migrations
# The checked queries compile from this offline data: no database at build time.
COPY .sqlx .sqlx
COPY templates templates
COPY static static
# `touch`: the sources are older than the placeholder build above.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && strip target/release/approval-bridge

# Runtime stage: Debian slim with the CA certificates (HTTPS to Phala Cloud,
# the Safe service and the RPCs), the binary, and an unprivileged user.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bridge
COPY --from=build /src/target/release/approval-bridge /usr/local/bin/approval-bridge
USER 10001:10001
# Listen on every interface inside the container; one JSON object per log line.
ENV APPROVAL_BRIDGE_LISTEN=0.0.0.0:8080 \
    APPROVAL_BRIDGE_LOG_FORMAT=json
EXPOSE 8080
# Probes: GET /healthz (the process is up) and GET /readyz (database,
# migrations, RPCs); the image has no HTTP client, so the orchestrator asks.
ENTRYPOINT ["approval-bridge"]
CMD ["serve"]
