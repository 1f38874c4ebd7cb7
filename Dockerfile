# One image for both services, the one-shot migrator and the bootstrap; the command picks which.
# Two stages: `build` installs the runtime dependencies (requirements-runtime.lock: no test, lint
# or codegen tools) into a venv and precompiles everything; `runtime` gets only that venv and the
# code, runs as an unprivileged user, and never writes bytecode.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN pip install uv==0.13.8 && uv venv /venv --python /usr/local/bin/python3.11
COPY requirements-runtime.lock /tmp/requirements-runtime.lock
RUN uv pip install --python /venv/bin/python --no-cache -r /tmp/requirements-runtime.lock
WORKDIR /app
COPY common ./common
COPY sequencer ./sequencer
COPY ledger ./ledger
COPY ops ./ops
COPY clients/python/logistics ./clients/python/logistics
RUN /venv/bin/python -m compileall -q -j 0 /app /venv

FROM python:3.11-slim AS runtime
# openssl: `python -m ops bootstrap` makes the deployment's CA and server certificates with it.
RUN apt-get update && apt-get install -y --no-install-recommends openssl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home logistics \
    && mkdir /secrets && chown logistics:logistics /secrets
COPY --from=build /venv /venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/venv/bin:$PATH PYTHONPATH=/app:/app/clients/python PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
CMD ["python", "-m", "sequencer"]
