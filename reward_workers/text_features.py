"""Per-word contextual LLM features, TRIBE v2's text stage, in one causal forward pass per passage.

Upstream (``neuralset==0.0.2``: ``AddContextToWords`` + ``HuggingFaceText``, read, not copied):

- each word has a context string built from the passage as ``AddText`` rewrites it (spaCy sentences,
  ``capitalize().rstrip(".")``, joined by ``". "``) — see ``reward_workers.word_context``;
- the context is tokenised with ``add_special_tokens=False`` (no BOS) and run through the model with
  ``output_hidden_states=True``; the word's tokens are the last ``n_total - n_prefix`` tokens (at least
  one), where ``n_prefix = len(tokenize(context[:-len(word)].rstrip()))`` and ``word`` is the word's
  own text (the transcript's, not the rewritten spelling). A whitespace token that the tokenizer splits
  off before a word (e.g. SmolLM2's ``"Ġ"`` before digits) therefore belongs to that word;
- those tokens are mean-pooled per hidden state; hidden states are averaged in groups
  (``layers_to_use=[0.5, 0.75, 1.0]``, ``group_mean``, after the ``cache_n_layers=20`` sub-selection of
  the released config; see ``reward_workers.binning``) -> ``(groups, hidden)`` per word.

Upstream runs one forward pass per word (batches of 4, right-padded with EOS). Because the model is
causal, the hidden states of the first ``b`` tokens of a passage do not depend on later tokens. Word
contexts grow by appending (up to 1025 words), so each context is a prefix of the last one:
``context_features`` runs one pass over that longest context and reads every word off it, *provided*
the passage's first tokens are exactly the tokens of the word's context. It checks that for every
word (tokenising every context and prefix: quadratic, ~0.6 s for a full 1025-word window on two CPU
cores with SmolLM2's tokenizer) and recomputes a word where it fails with its own pass, so the result
always equals the per-word computation up to float round-off. Past 1025 words every context starts at
a different word; those words get one pass each (exact, slow; brainloop's ``max_chars`` keeps passages
far below that).

Not reproduced on purpose: upstream's batching of 4 padded contexts. Padding sits after the real
tokens of a causal model, so it changes nothing but matrix shapes (float round-off, measured ≤ 4e-5
absolute on values up to ~18 by the fixture's ``verify_fixture.py``).

``word_features(words)`` is the older path (contexts = the raw words joined by spaces, kept for the
window/fallback tests and as a baseline); the reward pipeline uses ``context_features``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from reward_workers.binning import layer_group_indices

if TYPE_CHECKING:
    import torch

# The released TRIBE v2 config caches 20 sub-selected hidden states before grouping (see binning).
UPSTREAM_TEXT_CACHE_N_LAYERS = 20


@dataclass
class PassStats:
    """What the last ``word_features`` call did (for logs and the benchmark)."""

    n_words: int = 0
    n_windows: int = 0
    n_tokens: int = 0
    fallback_words: list[int] = field(default_factory=list)


class TextFeatureExtractor:
    """Loads a Hugging Face causal LM once and turns word lists into ``(n_words, G, D)`` features."""

    def __init__(
        self,
        model_source: str,
        layers_to_use: Sequence[float] = (0.5, 0.75, 1.0),
        max_context_words: int = 1024,
        device: str = "cpu",
        dtype: torch.dtype | str = "float32",
        cache_n_layers: int | None = UPSTREAM_TEXT_CACHE_N_LAYERS,
        window_stride: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from brainloop.models import resolve_model

        if max_context_words < 0:
            raise ValueError(f"max_context_words must be >= 0, got {max_context_words}")
        self.model_source = model_source
        self.max_context_words = int(max_context_words)
        self.window_stride = max(1, int(window_stride or max(1, self.max_context_words // 4)))
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype  # "bfloat16" from a config
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch dtype or its name, got {dtype!r}")
        path = resolve_model(model_source)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            # AutoModel = the decoder without its LM head, as upstream uses for Llama: no logits needed.
            model = AutoModel.from_pretrained(path, dtype=self.dtype)
            # .to() as well: from_pretrained may keep the checkpoint's float type (seen with float64).
            self.model = model.to(device=self.device, dtype=self.dtype).eval()
        except OSError as err:  # hub ids fail here when offline or gated
            raise RuntimeError(
                f"could not load text model {model_source!r} (resolved to {path!r}): {err}. Hub ids need "
                "network access (and a licence grant for gated models) or a populated Hugging Face cache; "
                "offline, use a local checkpoint directory or 'pkg:smollm2-135m-instruct'."
            ) from err
        n_states = int(self.model.config.num_hidden_layers) + 1  # embeddings + one per layer
        self.groups = layer_group_indices(n_states, tuple(layers_to_use), cache_n_layers)
        self.hidden_size = int(self.model.config.hidden_size)
        self.last_stats = PassStats()

    @property
    def feature_dims(self) -> tuple[int, int]:
        """(layer groups, hidden size) of one word's features."""
        return len(self.groups), self.hidden_size

    # ---- pieces shared by both paths ------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _hidden_group_means(self, ids: list[int]) -> Any:
        """One forward pass; ``(G, n_tokens, D)`` group means of the hidden states (model precision)."""
        import torch

        with torch.inference_mode():
            inp = torch.tensor([ids], dtype=torch.long, device=self.device)
            states = self.model(input_ids=inp, output_hidden_states=True).hidden_states
            if len(states) <= max(g[-1] for g in self.groups):
                raise RuntimeError(f"model returned {len(states)} hidden states; groups use {self.groups}")
            return torch.stack(
                [torch.stack([states[j][0] for j in g]).mean(0) for g in self.groups]
            )

    @staticmethod
    def _pool(group_states: Any, spans: list[tuple[int, int]]) -> np.ndarray:
        """Mean over each ``[lo, hi)`` token span -> ``(n_spans, G, D)`` float32 numpy."""
        import torch

        # Pool in the model's precision, cast once at the end (upstream: ``.float()`` after pooling).
        pooled = torch.stack([group_states[:, lo:hi].mean(1) for lo, hi in spans])
        return pooled.float().cpu().numpy()

    @staticmethod
    def _clean(words: Sequence[str]) -> list[str]:
        out = [str(w).strip() for w in words]
        empty = [i for i, w in enumerate(out) if not w]
        if empty:
            raise ValueError(f"empty words at positions {empty[:10]}")  # upstream refuses empty text too
        return out

    def _context_start(self, i: int) -> int:
        return max(0, i - self.max_context_words)

    # ---- reference: one forward pass per word (upstream's way) ---------------------------------
    def word_features_per_word_reference(self, words: Sequence[str]) -> np.ndarray:
        """Upstream's computation, one forward pass per word over its own context (batch size 1)."""
        words = self._clean(words)
        out = np.zeros((len(words), *self.feature_dims), dtype=np.float32)
        for i in range(len(words)):
            out[i] = self._reference_one(words, i)
        return out

    def _reference_one(self, words: list[str], i: int) -> np.ndarray:
        context = " ".join(words[self._context_start(i) : i + 1])
        prefix = context[: -len(words[i])].rstrip()
        n_prefix = len(self._tokenize([prefix])[0]) if prefix else 0
        ids = self._tokenize([context])[0]
        n_target = max(1, len(ids) - n_prefix)
        states = self._hidden_group_means(ids)
        return self._pool(states, [(len(ids) - n_target, len(ids))])[0]

    # ---- single pass ----------------------------------------------------------------------------
    def _windows(self, n: int) -> list[tuple[int, int, list[int]]]:
        """``(first word, stop word, words taken from this window)`` for a passage of ``n`` words."""
        m = self.max_context_words
        if n <= m + 1:
            return [(0, n, list(range(n)))]
        wins = [(0, m + 1, list(range(m + 1)))]
        s = 0
        done = m + 1
        while done < n:
            s += self.window_stride
            stop = min(n, s + m + 1)
            if stop > done:  # words done..stop-1 see s..i-1: between m - stride + 1 and m words
                wins.append((s, stop, list(range(done, stop))))
                done = stop
        return wins

    def token_spans(self, words: Sequence[str]) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Token ids of ``" ".join(words)`` and each word's ``[lo, hi)`` token span in them.

        ``hi`` is the token count of the text up to the end of the word and ``lo`` the count up to
        the end of the previous word, each tokenised on its own exactly as upstream counts its
        prefix (so a split-off space token belongs to the following word). A span is None when the
        passage's first ``hi`` tokens differ from the tokens of the text up to the word (a token
        merges across the following space): that word cannot be read off this pass.
        """
        words = self._clean(words)
        text = " ".join(words)
        ends = np.cumsum([len(w) for w in words]) + np.arange(len(words))  # char end of each word
        ids = self._tokenize([text])[0]
        prefix_ids = self._tokenize([text[:e] for e in ends])
        spans: list[tuple[int, int] | None] = []
        lo = 0
        for pref in prefix_ids:
            hi = len(pref)
            spans.append((min(lo, hi - 1), hi) if ids[:hi] == pref else None)  # >= 1 token, as upstream
            lo = hi
        return ids, spans

    def word_features(self, words: Sequence[str]) -> np.ndarray:
        """``(n_words, G, D)`` float32: one forward pass per window (one per passage up to 1025 words)."""
        words = self._clean(words)
        out = np.zeros((len(words), *self.feature_dims), dtype=np.float32)
        stats = PassStats(n_words=len(words))
        for s, stop, take in self._windows(len(words)):
            ids, win_spans = self.token_spans(words[s:stop])
            rows = [i for i in take if win_spans[i - s] is not None]
            spans = [win_spans[i - s] for i in rows]
            fallback = [i for i in take if win_spans[i - s] is None]
            # Only tokens up to the last word taken are needed (causal model).
            n_needed = max((hi for _, hi in spans), default=0)
            if n_needed:
                states = self._hidden_group_means(ids[:n_needed])
                out[rows] = self._pool(states, spans)
            for i in fallback:  # rare: recompute the upstream way, so the result stays exact
                out[i] = self._reference_one(words, i)
            stats.n_windows += 1
            stats.n_tokens += n_needed
            stats.fallback_words.extend(fallback)
        self.last_stats = stats
        return out


    # ---- upstream contexts (the reward pipeline's path) ------------------------------------------
    def _word_span(self, context: str, word: str, ctx_len: int) -> tuple[int, int]:
        """``[lo, hi)`` of the word's tokens among its context's ``ctx_len`` tokens, counted as upstream."""
        prefix = context[: -len(word)].rstrip() if len(word) < len(context) else ""
        n_prefix = len(self._tokenize([prefix])[0]) if prefix else 0
        n_target = max(1, ctx_len - n_prefix)
        return ctx_len - n_target, ctx_len

    def _one_context(self, context: str, word: str) -> np.ndarray:
        ids = self._tokenize([context])[0]
        states = self._hidden_group_means(ids)
        return self._pool(states, [self._word_span(context, word, len(ids))])[0]

    @staticmethod
    def _check_contexts(contexts: Sequence[str], words: Sequence[str]) -> None:
        if len(contexts) != len(words):
            raise ValueError(f"{len(contexts)} contexts for {len(words)} words")
        empty = [i for i, (c, w) in enumerate(zip(contexts, words, strict=True)) if not c or not w]
        if empty:
            raise ValueError(f"empty context or word at positions {empty[:10]}")  # upstream refuses them too

    def context_features_per_word_reference(self, contexts: Sequence[str], words: Sequence[str]) -> np.ndarray:
        """Upstream's computation: one forward pass per word over its own context (batch size 1)."""
        self._check_contexts(contexts, words)
        out = np.zeros((len(words), *self.feature_dims), dtype=np.float32)
        for i, (context, word) in enumerate(zip(contexts, words, strict=True)):
            out[i] = self._one_context(context, word)
        return out

    def context_features(self, contexts: Sequence[str], words: Sequence[str]) -> np.ndarray:
        """``(n_words, G, D)`` float32 for upstream contexts; one pass per run of prefix-nested contexts."""
        self._check_contexts(contexts, words)
        out = np.zeros((len(words), *self.feature_dims), dtype=np.float32)
        stats = PassStats(n_words=len(words))
        start = 0
        while start < len(words):
            stop = start + 1  # a run: each context is a prefix of the next one
            while stop < len(words) and contexts[stop].startswith(contexts[stop - 1]):
                stop += 1
            passage_ids = self._tokenize([contexts[stop - 1]])[0]
            ctx_ids = self._tokenize(list(contexts[start:stop]))
            rows, spans, fallback = [], [], []
            for i, ids in zip(range(start, stop), ctx_ids, strict=True):
                if passage_ids[: len(ids)] == ids:
                    rows.append(i)
                    spans.append(self._word_span(contexts[i], words[i], len(ids)))
                else:  # a token merges across the word's end: read it off its own pass instead
                    fallback.append(i)
            n_needed = max((hi for _, hi in spans), default=0)
            if n_needed:
                states = self._hidden_group_means(passage_ids[:n_needed])
                out[rows] = self._pool(states, spans)
            for i in fallback:
                out[i] = self._one_context(contexts[i], words[i])
            stats.n_windows += 1
            stats.n_tokens += n_needed
            stats.fallback_words.extend(fallback)
            start = stop
        self.last_stats = stats
        return out


# ---- benchmark helper (used by bench/) ----------------------------------------------------------
_BENCH_TEXT = (
    "In 1969, Neil Armstrong's first step on the Moon was watched by roughly 650 million people. "
    "The crew of Apollo 11 - Armstrong, Aldrin and Collins - trained for years; their well-known "
    "checklists ran to thousands of pages. Back on Earth, a café in São Paulo stayed open all night "
    "so that its regulars could listen to the radio, while engineers in Houston double-checked fuel "
    "margins that were, at one point, down to about 25 seconds. Isn't it remarkable how much can "
    "hinge on a few numbers?"
).split()


def benchmark_words(n_words: int) -> list[str]:
    """A deterministic passage of ``n_words`` words (punctuation, numbers, hyphens, non-ASCII)."""
    return [_BENCH_TEXT[i % len(_BENCH_TEXT)] for i in range(n_words)]


def time_text_features(extractor: TextFeatureExtractor, n_words: int) -> tuple[float, float]:
    """Seconds for the single-pass path and for the per-word (upstream) path on one ``n_words`` passage.

    Both run on the upstream contexts of the passage (``reward_workers.word_context``), as the reward
    pipeline does; building the contexts is not timed (it is the same for both).
    """
    from reward_workers.word_context import word_contexts

    words = benchmark_words(n_words)
    ctx = word_contexts(words)
    kept = ctx.kept
    contexts, targets = [ctx.contexts[i] for i in kept], [words[i] for i in kept]
    extractor.context_features(contexts[: min(8, len(kept))], targets[: min(8, len(kept))])  # warm-up
    t0 = time.perf_counter()
    extractor.context_features(contexts, targets)
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    extractor.context_features_per_word_reference(contexts, targets)
    per_word = time.perf_counter() - t0
    return single, per_word
