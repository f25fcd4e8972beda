# The termrelay image: edges (relay-edge), relay-admin, and later metering, from one image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY accounts ./accounts
COPY edge ./edge
COPY metering ./metering
COPY schemas ./schemas
RUN pip install --no-cache-dir . && useradd --system --uid 10001 relay
USER relay
ENV RELAY_HOST=0.0.0.0 RELAY_PORT=8080
EXPOSE 8080
CMD ["relay-edge"]
