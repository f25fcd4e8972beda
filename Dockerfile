# The termrelay image: edges (relay-edge), metering (relay-metering) and relay-admin, from
# one image. Dependencies come from the lock (requirements/runtime.txt), hash-checked.
FROM python:3.11-slim
WORKDIR /app
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY accounts ./accounts
COPY edge ./edge
COPY metering ./metering
COPY runtime ./runtime
COPY schemas ./schemas
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && pip check && useradd --system --uid 10001 relay
USER relay
ENV RELAY_HOST=0.0.0.0 RELAY_PORT=8080
EXPOSE 8080
CMD ["relay-edge"]
