# The embedded default in a container (CPU only, offline after build): the same set-up as
# scripts/setup.sh, then the demo.  docker build -f docker/cpu.Dockerfile -t brainloop-cpu .
#                                    docker run --rm -p 127.0.0.1:8265:8265 brainloop-cpu
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ git procps && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/brainloop
COPY . /opt/brainloop
RUN bash scripts/setup.sh && rm -rf /root/.cache/pip
# Convert the packaged SmolLM2 once at build time so runs start offline and fast.
RUN .venv/bin/python -c "from brainloop.models import resolve_model; resolve_model('pkg:smollm2-135m-instruct')"
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 BRAINLOOP_DASHBOARD_HOST=0.0.0.0
CMD ["bash", "scripts/demo.sh"]
