# syntax=docker/dockerfile:1
# Small, non-root image with the project installed as a wheel.
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatbot ./chatbot
COPY web ./web
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin chatbot
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels chatbot && rm -rf /wheels
USER chatbot
ENV CHATBOT_HOST=0.0.0.0 \
    CHATBOT_PORT=8080 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
STOPSIGNAL SIGTERM
CMD ["chatbot", "serve"]
