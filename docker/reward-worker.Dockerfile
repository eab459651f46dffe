# TRIBE v2 reward-worker image (GPU): the official tribev2 package (pins torch<2.7), WhisperX (pins its
# own CUDA torch) and gTTS. Their pins conflict with vLLM's torch, so reward workers run from this image
# (ray_cluster.yaml: reward_l40s.docker.worker_image) or a Ray runtime_env with its own environment.
FROM rayproject/ray:2.60.0-py311-cu121
USER root
RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg libespeak-ng1 git \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/brainloop
RUN pip install --no-cache-dir "torch==2.6.0" "torchaudio==2.6.0" \
 && pip install --no-cache-dir "whisperx==3.4.2" "gTTS==2.5.4" "faster-whisper==1.2.1" \
 && pip install --no-cache-dir "git+https://github.com/facebookresearch/tribev2.git" \
 && pip install --no-cache-dir "transformers>=4.50,<5.20" "pyarrow>=26" "pydantic>=2.14,<3" "nilearn==0.14.1" \
      "nibabel>=5.4" "espeakng-loader==0.2.4" "safetensors>=0.5" \
 && pip install --no-cache-dir "spacy==3.8.18" "Levenshtein==0.27.5" \
 && python -m spacy download en_core_web_lg-3.8.0 --direct
# en_core_web_lg is the sentence splitter upstream's word contexts use (README "Fidelity to TRIBE v2");
# without it the workers fall back to spaCy's rule-based sentencizer and record so per sample.
COPY --chown=ray:users . /home/ray/brainloop
RUN pip install --no-cache-dir --no-deps -e .
# Llama-3.2-3B is gated: pass HF_TOKEN at run time (never bake it into the image).
ENV RAY_AUTH_MODE=token
