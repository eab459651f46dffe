"""Official neuralset==0.0.2 outputs for speech + words (text AND audio stages), run in a scratch virtualenv.

    python make_fixture.py OUT_DIR TEXT_MODEL_DIR AUDIO_MODEL_DIR

TEXT_MODEL_DIR: ``shared/fixtures/tribe_text_official/model``. AUDIO_MODEL_DIR: brainloop's embedded small
Wav2Vec2-BERT (``AudioFeatureExtractor(None, seed=0)``) saved with ``save_pretrained`` (model + feature
extractor). Patched as in ``tribe_text_official``: ``HuggingFaceMixin.repo_exists -> True`` and spaCy
``blank("en") + sentencizer``. Unmodified official code: ``ChunkEvents(Audio, 60, 30)``, ``AddText``,
``AddSentenceToWords(0.05)``, ``AddContextToWords(False, 1024, "")``, ``RemoveMissing``, the helper event and
100 s segments of ``tribev2/main.py``, ``HuggingFaceText`` (cache_n_layers 20) and ``Wav2VecBert``
(cache_n_layers 20) with ``allow_missing`` as ``grids/defaults.py``, and the TR rule of ``TribeModel.predict``.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_signal import signal  # noqa: E402

OUT, TEXT_MODEL, AUDIO_MODEL = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
import neuralset as ns  # noqa: E402
import neuralset.utils as nsu  # noqa: E402
import spacy  # noqa: E402
from neuralset.extractors.base import HuggingFaceMixin  # noqa: E402

HuggingFaceMixin.repo_exists = lambda self: True


def _blank(model):
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


nsu._get_model = _blank
from neuralset.events import transforms as T  # noqa: E402
from neuralset.events.utils import standardize_events  # noqa: E402
from neuralset.extractors.audio import Wav2VecBert  # noqa: E402
from neuralset.extractors.text import HuggingFaceText  # noqa: E402

words = json.loads((HERE / "words.json").read_text())
result: dict = {"rates": {}}
arrays: dict = {}
for rate in (16000, 22050):
    wav_path = OUT / f"speech_{rate}.wav"
    soundfile.write(wav_path, signal(rate), rate, subtype="PCM_16")
    rows = [dict(type="Audio", filepath=str(wav_path), start=0.0, timeline="t", subject="default")]
    rows += [dict(type="Word", text=w["text"], start=w["start"], duration=w["duration"], timeline="t",
                  subject="default", language="english") for w in words]
    events = standardize_events(pd.DataFrame(rows))
    for tr in [T.ChunkEvents(event_type_to_chunk="Audio", max_duration=60, min_duration=30), T.AddText(),
               T.AddSentenceToWords(max_unmatched_ratio=0.05),
               T.AddContextToWords(sentence_only=False, max_context_len=1024, split_field=""), T.RemoveMissing()]:
        events = tr(events)
    events = standardize_events(events)
    dummy = dict(type="CategoricalEvent", timeline="t", start=events.start.min(),
                 duration=events.stop.max() - events.start.min(), split="all", subject="default")
    seg_events = standardize_events(pd.concat([events, pd.DataFrame([dummy])]))
    segments = ns.segments.list_segments(seg_events, triggers=seg_events.type == "CategoricalEvent", stride=100.0,
                                         duration=100.0, stride_drop_incomplete=False)
    text = HuggingFaceText(model_name=TEXT_MODEL, event_types="Word", aggregation="sum", frequency=2.0,
                           contextualized=True, layers=[0.5, 0.75, 1.0], layer_aggregation="group_mean",
                           token_aggregation="mean", batch_size=4, device="cpu", cache_n_layers=20,
                           allow_missing=True)
    aud = Wav2VecBert(model_name=AUDIO_MODEL, frequency=2.0, layers=[0.5, 0.75, 1.0], layer_aggregation="group_mean",
                      cache_n_layers=20, event_types="Audio", aggregation="sum", device="cpu", allow_missing=True)
    for name, ext in (("text", text), ("audio", aud)):
        ext.infra.folder = None
        ext.prepare(seg_events)
        for k, seg in enumerate(segments):
            x = ext(seg.ns_events, start=seg.start, duration=seg.duration, trigger=seg.trigger).numpy()
            arrays[f"{rate}/{name}/segment{k}"] = x.astype(np.float32)
    kept = [int(sum(len(seg.copy(offset=t, duration=1.0).ns_events) > 0
                    for t in np.arange(0, seg.duration - 1e-2, 1.0))) for seg in segments]
    audio = events[events.type == "Audio"]
    result["rates"][str(rate)] = {
        "segment_starts": [float(s.start) for s in segments], "kept_trs": kept,
        "audio_pieces": [[float(a), float(b)] for a, b in zip(audio.start, audio.duration, strict=True)],
        "contexts": events[events.type == "Word"].context.tolist(),
    }
result["versions"] = {"neuralset": "0.0.2", "torch": torch.__version__, "spacy": spacy.__version__,
                      "numpy": np.__version__, "pandas": pd.__version__}
(OUT / "official.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
np.savez_compressed(OUT / "official.npz", **arrays)
print(json.dumps({r: (v["segment_starts"], v["kept_trs"], v["audio_pieces"]) for r, v in result["rates"].items()}))
