"""Generation-quality metrics: exact match, token F1, BLEU-4 and ROUGE-L, for English and CJK text.

BLEU and ROUGE depend on how text is split into tokens, and the usual English tokenizers silently
misbehave on Chinese/Japanese/Korean (rouge_score's default tokenizer keeps only ``[a-z0-9]`` and so
scores every Chinese pair 0). Each scorer therefore picks a tokenizer from the script of the references
and reports its name next to the score, so numbers from different runs are only compared like for like.

``sacrebleu`` and ``rouge-score`` are the ``deftune[metrics]`` extra and are imported lazily.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from deftune.errors import DeftuneError, require
from deftune.eval.tasks import exact_match as _exact_match
from deftune.eval.tasks import normalize_answer

__all__ = [
    "METRIC_NAMES",
    "HIGHER_IS_BETTER",
    "LANGUAGES",
    "detect_language",
    "bleu4",
    "rouge_l",
    "exact_match",
    "token_f1",
    "score_generations",
]

METRIC_NAMES: tuple[str, ...] = ("exact_match", "token_f1", "bleu4", "rougeL")
"""Names accepted by :func:`score_generations` (and the keys of the scores it returns)."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "eval_loss": False,
    "eval_ppl": False,
    "perplexity": False,
    **{name: True for name in METRIC_NAMES},
}
"""Direction of every tracked eval number, for best-checkpoint and plateau logic."""

LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "ko", "other")
"""Values :func:`detect_language` returns. ``en``: letters are ASCII only; ``other``: space-delimited
text with non-ASCII letters (accented Latin, Cyrillic, Greek, ...)."""

CJK_LANGUAGES = frozenset({"zh", "ja", "ko"})

# Code-point ranges (inclusive) of the scripts that decide the tokenizer.
_KANA = ((0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))
_HAN = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),
    (0x20000, 0x2A6DF), (0x2A700, 0x2EBEF), (0x2F800, 0x2FA1F), (0x30000, 0x3134F),
)
_HANGUL = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))
_CJK = _KANA + _HAN + _HANGUL


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    return "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in ranges)


_CJK_CLASS = _char_class(_CJK)
# One token per CJK character; runs of any other word characters (Latin words, digits) stay whole, so an
# English word inside Chinese text is one token, as in sacrebleu's "zh" tokenizer. Punctuation is dropped.
_CJK_WORD_RE = re.compile(f"[{_CJK_CLASS}]|[^\\W{_CJK_CLASS}]+")
# Same split for token F1, which has already deleted punctuation and keeps every other symbol.
_CJK_F1_RE = re.compile(f"[{_CJK_CLASS}]|[^\\s{_CJK_CLASS}]+")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def _in(ch: str, ranges: Iterable[tuple[int, int]]) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in ranges)


def detect_language(texts: Iterable[str]) -> str:
    """Guess the language family of ``texts`` from their script; one of :data:`LANGUAGES`.

    Any Hiragana/Katakana -> ``"ja"`` (Japanese mixes kana with Han characters); else any Han ->
    ``"zh"``; else any Hangul -> ``"ko"``; else any non-ASCII letter -> ``"other"``; else ``"en"``.
    Presence rather than a majority is enough because the CJK tokenizers keep Latin words whole, so
    mostly-English text detected as ``zh`` scores almost the same as with the English tokenizer.

    >>> detect_language(["今日は晴れです"]), detect_language(["今天天气很好"]), detect_language(["hi"])
    ('ja', 'zh', 'en')
    """
    han = hangul = other = False
    for text in texts:
        for ch in text or "":
            if ch.isascii():
                continue
            if _in(ch, _KANA):
                return "ja"
            if _in(ch, _HAN):
                han = True
            elif _in(ch, _HANGUL):
                hangul = True
            elif ch.isalpha():
                other = True
    if han:
        return "zh"
    if hangul:
        return "ko"
    return "other" if other else "en"


def _resolve_language(language: str, references: Sequence[str]) -> str:
    if language == "auto":
        return detect_language(references)
    if language not in LANGUAGES:
        raise DeftuneError(f"Unknown language {language!r}; use 'auto' or one of {', '.join(LANGUAGES)}.")
    return language


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


@functools.cache
def _sacrebleu_tokenizer_available(name: str) -> bool:
    """Whether sacrebleu can build tokenizer ``name`` (the MeCab ones need the sacrebleu[ja]/[ko] extras)."""
    from sacrebleu.metrics import BLEU  # sacrebleu: optional (extra `metrics`), only for BLEU

    try:
        BLEU(tokenize=name)
    except (ImportError, RuntimeError):  # sacrebleu raises RuntimeError when mecab/its dictionary is missing
        return False
    return True


def _bleu_tokenizer(language: str) -> str:
    if language == "zh":
        return "zh"
    if language in ("ja", "ko"):
        # MeCab word segmentation is the WMT convention; characters are the dependency-free fallback.
        mecab = f"{language}-mecab"
        return mecab if _sacrebleu_tokenizer_available(mecab) else "char"
    return "13a"


def bleu4(
    predictions: Sequence[str], references: Sequence[str], language: str = "auto"
) -> tuple[float, str]:
    """Corpus-level BLEU-4 on a 0-100 scale (Papineni et al. 2002, "BLEU: a Method for Automatic
    Evaluation of Machine Translation"), computed by sacrebleu with one reference per prediction.

    ``BLEU = BP * exp(sum_{n=1..4} 1/4 * log p_n)``, where ``p_n`` is the corpus n-gram precision
    (clipped counts) and ``BP = min(1, exp(1 - r / c))`` penalises a candidate length ``c`` shorter than
    the reference length ``r``. The tokenizer follows the language: ``13a`` (sacrebleu's default) for
    English and other space-delimited text, ``zh`` for Chinese, ``ja-mecab`` / ``ko-mecab`` when the
    sacrebleu extras are installed, else ``char``.

    Returns ``(score, tokenizer_name)``; an empty corpus scores 0.0.
    """
    _check_pairs(predictions, references)
    require("sacrebleu", "metrics", "BLEU-4 scoring")
    from sacrebleu.metrics import BLEU  # sacrebleu: optional (extra `metrics`), only for BLEU

    tokenizer = _bleu_tokenizer(_resolve_language(language, references))
    if not references:
        return 0.0, tokenizer
    result = BLEU(tokenize=tokenizer).corpus_score(list(predictions), [list(references)])
    return float(result.score), tokenizer


class _WordCharTokenizer:
    """rouge_score tokenizer: lowercased word-character runs, with each CJK character its own token.

    Used where rouge_score's default tokenizer, which keeps only ``[a-z0-9]``, would delete the text.
    """

    def tokenize(self, text: str) -> list[str]:
        return _CJK_WORD_RE.findall(text.lower())


def rouge_l(
    predictions: Sequence[str], references: Sequence[str], language: str = "auto"
) -> tuple[float, str]:
    """Mean ROUGE-L F1 over prediction/reference pairs, in [0, 1] (Lin 2004, "ROUGE: A Package for
    Automatic Evaluation of Summaries"), computed by rouge-score.

    With ``L = LCS(pred, ref)`` (longest common token subsequence), ``P = L / |pred|``,
    ``R = L / |ref|`` and ``F1 = 2PR / (P + R)``.

    Tokenizer: rouge-score's ``"default"`` (lowercase, ``[a-z0-9]+`` words) for ASCII text; ``"char"``
    for Chinese/Japanese/Korean (one token per CJK character, other words kept whole) and ``"word"``
    (Unicode word runs) for other non-ASCII text, because the default tokenizer drops every non-ASCII
    character and would score such pairs 0. Stemming is off for every language: the Porter stemmer is
    English-only, so leaving it off keeps English and non-English scores, and token F1, on the same
    footing (it is also the Hugging Face ``evaluate`` default). Scores are therefore lower than
    stemmed ROUGE-L reported for summarisation papers.

    Returns ``(score, tokenizer_name)``; an empty corpus scores 0.0.
    """
    _check_pairs(predictions, references)
    rouge_scorer = require("rouge_score.rouge_scorer", "metrics", "ROUGE-L scoring")
    # rouge-score announces "Using default tokenizer." through absl at INFO on every validation.
    logging.getLogger("absl").setLevel(logging.WARNING)

    lang = _resolve_language(language, references)
    if lang == "en":
        name, tokenizer = "default", None
    else:
        name, tokenizer = ("char" if lang in CJK_LANGUAGES else "word"), _WordCharTokenizer()
    if not references:
        return 0.0, name
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=tokenizer)
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
    return total / len(references), name


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after ``normalize_answer`` (see ``eval.tasks``)."""
    return _exact_match(predictions, references)


def _squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lowercase, delete punctuation, drop English articles, collapse spaces.

    Punctuation is ASCII ``string.punctuation`` (as in the SQuAD script) plus every Unicode punctuation
    character, so CJK marks such as ``，`` and ``。`` are not counted as tokens.
    """
    text = text.lower()
    text = "".join(
        ch for ch in text if ch not in string.punctuation and not unicodedata.category(ch).startswith("P")
    )
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _f1_tokens(text: str, cjk: bool) -> list[str]:
    text = _squad_normalize(text)
    return _CJK_F1_RE.findall(text) if cjk else text.split()


def _pair_f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        # SQuAD convention: two empty answers agree, one empty answer scores 0.
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str], language: str = "auto") -> float:
    """Mean SQuAD token-level F1 over pairs, in [0, 1] (Rajpurkar et al. 2016, "SQuAD: 100,000+
    Questions for Machine Comprehension of Text").

    Both texts are normalised (lowercase, punctuation and the articles a/an/the removed), split into
    tokens, and ``F1 = 2PR / (P + R)`` with ``P = |pred ∩ ref| / |pred|`` and ``R = |pred ∩ ref| / |ref|``
    over token multisets. Tokens are whitespace-separated words; for Chinese/Japanese/Korean each CJK
    character is a token (words are not space-delimited there), other words stay whole.

    An empty corpus scores 0.0.
    """
    _check_pairs(predictions, references)
    if not references:
        return 0.0
    cjk = _resolve_language(language, references) in CJK_LANGUAGES
    total = sum(_pair_f1(_f1_tokens(p, cjk), _f1_tokens(r, cjk)) for p, r in zip(predictions, references))
    return total / len(references)


def score_generations(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] = METRIC_NAMES,
    language: str = "auto",
) -> dict[str, float | str]:
    """Score generated answers against references with the requested :data:`METRIC_NAMES`.

    Predictions are first reduced with ``normalize_answer`` (cut at the first newline, unless the reference
    itself has several lines, or at ``###``, then
    stripped), so chatter a model adds after its answer is not scored; references are used as given.
    The language is detected once from the references (unless given) and shared by every metric.

    Returns the requested scores plus ``"language"`` and, where BLEU/ROUGE were requested, the
    ``"bleu_tokenizer"`` / ``"rouge_tokenizer"`` used, e.g.
    ``{"exact_match": 0.5, "bleu4": 31.2, "bleu_tokenizer": "13a", "language": "en"}``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        hints = {m: difflib.get_close_matches(m, METRIC_NAMES, n=1) for m in unknown}
        detail = "; ".join(f"{m!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for m, h in hints.items())
        raise DeftuneError(f"Unknown metric {detail}. Valid metrics: {', '.join(METRIC_NAMES)}.")
    _check_pairs(predictions, references)

    lang = _resolve_language(language, references)
    preds = [normalize_answer(p, "\n" in (r or "").strip()) for p, r in zip(predictions, references)]
    refs = list(references)
    scores: dict[str, float | str] = {}
    for name in metrics:
        if name == "exact_match":
            scores[name] = exact_match(preds, refs)
        elif name == "token_f1":
            scores[name] = token_f1(preds, refs, language=lang)
        elif name == "bleu4":
            scores[name], scores["bleu_tokenizer"] = bleu4(preds, refs, language=lang)
        elif name == "rougeL":
            scores[name], scores["rouge_tokenizer"] = rouge_l(preds, refs, language=lang)
    scores["language"] = lang
    return scores
