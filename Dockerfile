# The modelwatch image: `modelwatch worker`, `tail` and the other commands
# (used by docker-compose.yml; `docker build -t modelwatch .` on its own).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY detectors detectors
COPY streams streams
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /state modelwatch \
    # Mount points owned by the user, so named volumes start writable.
    && mkdir -p /state /logs /profiles /demo \
    && chown modelwatch /state /logs /profiles /demo

USER modelwatch
EXPOSE 9108
CMD ["modelwatch", "worker"]
