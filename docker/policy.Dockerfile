# Sampler and learner image (GPU): CUDA vLLM + PEFT + Ray. Not built on the CPU dev machines (no
# Docker engine there); build on a machine with Docker:  docker build -f docker/policy.Dockerfile .
FROM rayproject/ray:2.60.0-py311-cu128
USER root
RUN apt-get update && apt-get install -y --no-install-recommends libespeak-ng1 && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/brainloop
# vLLM brings its own CUDA torch; pin what breaks across versions.
RUN pip install --no-cache-dir "vllm==0.32.0" "peft==0.21.2" "transformers>=5.19,<5.20" "pyarrow>=26" \
      "pydantic>=2.14,<3" "nilearn==0.14.1" "nibabel>=5.4" "matplotlib>=3.11" "espeakng-loader==0.2.4" gguf
COPY --chown=ray:users . /home/ray/brainloop
RUN pip install --no-cache-dir --no-deps -e .
ENV VLLM_ENABLE_V1_MULTIPROCESSING=0 RAY_AUTH_MODE=token
