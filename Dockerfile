# Loop Service: one image for the API (`loopservice run`) and the workers (`loopservice worker`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the sources the package installs (no .venv, var/ or local databases in the image).
WORKDIR /src
COPY pyproject.toml ./
COPY domain/ domain/
COPY streams/ streams/
COPY projections/ projections/
COPY infra/ infra/
COPY loopservice/ loopservice/
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/loopservice loop
USER loop
WORKDIR /var/lib/loopservice
ENV LOOP_DATA_DIR=/var/lib/loopservice

EXPOSE 8080
CMD ["loopservice", "run"]
