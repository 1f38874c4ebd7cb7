# One image for both services and the one-shot migrator; the command picks which.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app:/app/clients/python
COPY requirements.lock ./
RUN pip install --no-cache-dir uv==0.13.8 && uv pip install --system --no-cache -r requirements.lock
COPY common ./common
COPY sequencer ./sequencer
COPY ledger ./ledger
COPY ops ./ops
COPY clients/python ./clients/python
USER nobody
CMD ["python", "-m", "sequencer"]
