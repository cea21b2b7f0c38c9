# One image for every role: `flashsale serve --role api|order-worker|notify-worker`,
# `flashsale migrate` as a one-shot job.
#
# Stage 1 builds the dependencies against stub sources, so that layer stays cached until
# Cargo.toml or Cargo.lock change; stage 2 builds the real sources on top of it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src/bin bench/benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && touch bench/src/lib.rs && echo 'fn main() {}' > bench/benches/token_verify.rs \
 && cargo build --release --locked -p flashsale \
 && rm -rf src bench/src bench/benches
COPY . .
# The stub build left newer timestamps on its outputs; touch the real entry points.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked -p flashsale --bin flashsale \
 && strip target/release/flashsale

# Stage 2: a small runtime with only the binary, its config and CA certificates.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin flashsale \
 && mkdir -p /app/data \
 && chown flashsale /app/data
WORKDIR /app
COPY --from=build /src/target/release/flashsale /usr/local/bin/flashsale
# Only the default layer and the production one (a deployment mounts its own over it): the
# development and test layers hold published keys, and production refuses those anyway.
COPY config/default.toml /app/config/default.toml
COPY config/production.example.toml /app/config/production.toml
ENV FLASHSALE_ENV=production \
    FLASHSALE_CONFIG_DIR=/app/config \
    FLASHSALE__SEARCH__INDEX_DIR=/app/data/search-index
USER 10001:10001
# 8080: the API; 9090: probes and /metrics of the worker roles.
EXPOSE 8080 9090
ENTRYPOINT ["flashsale"]
CMD ["serve", "--role", "api"]
