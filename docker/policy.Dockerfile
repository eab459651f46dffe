# Sampler and learner image (GPU): CUDA vLLM + PEFT + Ray. Not built on the CPU dev machines (no
# Docker engine there); build on a machine with Docker:  docker build -f docker/policy.Dockerfile .
FROM rayproject/ray:2.60.0-py311-cu128
USER root
RUN apt-get update && apt-get install -y --no-install-recommends libespeak-ng1 && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/brainloop
# brainloop[gpu]: CUDA vLLM (which brings its own CUDA torch) + the core roles; [report] for figures.
COPY --chown=ray:users . /home/ray/brainloop
RUN pip install --no-cache-dir -e ".[gpu,report]"
ENV VLLM_ENABLE_V1_MULTIPROCESSING=0 RAY_AUTH_MODE=token
