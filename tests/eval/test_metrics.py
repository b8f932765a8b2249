"""Generation metrics against values computed once with sacrebleu 2.6.0 / rouge-score 0.1.2 as configured.

The expected numbers were produced by calling the reference libraries directly (``sacrebleu.corpus_bleu``
with the named tokenizer; ``RougeScorer(["rougeL"])`` with the default or a per-character tokenizer)
and checked to match deftune's wrappers; token F1 for English was also checked by hand.
"""

from __future__ import annotations

import sys

import pytest

from deftune.errors import DeftuneError, MissingExtraError
from deftune.eval import metrics as M

EN_PRED = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog",
           "Paris is the capital of France."]
EN_REF = ["the cat is sitting on the mat", "the quick brown fox jumped over the lazy dog",
          "The capital of France is Paris."]
ZH_PRED = ["今天天气很好，我们去公园散步。", "机器学习是人工智能的一个分支", "北京是中国的首都"]
ZH_REF = ["今天天气不错，我们去公园散步吧。", "机器学习是人工智能的重要分支", "中国的首都是北京"]
JA_PRED = ["今日は天気がいいです", "東京は日本の首都です"]
JA_REF = ["今日はいい天気です", "日本の首都は東京です"]

TOL = 1e-4

@pytest.fixture
def sacrebleu():
    return pytest.importorskip("sacrebleu")


@pytest.fixture
def rouge_scorer():
    return pytest.importorskip("rouge_score.rouge_scorer")


@pytest.fixture
def no_mecab(monkeypatch):
    """Pin the Japanese/Korean BLEU tokenizer to the dependency-free fallback, whatever is installed."""
    monkeypatch.setattr(M, "_sacrebleu_tokenizer_available", lambda name: False)


def test_bleu4_english_13a(sacrebleu):
    score, tok = M.bleu4(EN_PRED, EN_REF)
    assert tok == "13a"
    assert score == pytest.approx(30.479656, abs=TOL)
    assert M.bleu4(EN_REF, EN_REF)[0] == pytest.approx(100.0)


def test_bleu4_chinese_zh_tokenizer(sacrebleu):
    score, tok = M.bleu4(ZH_PRED, ZH_REF)
    assert tok == "zh"
    assert score == pytest.approx(66.303571, abs=TOL)
    # The English tokenizer sees each unspaced Chinese sentence as one word: no 4-gram matches at all.
    assert sacrebleu.corpus_bleu(ZH_PRED, [ZH_REF], tokenize="13a").score == 0.0


def test_bleu4_japanese_falls_back_to_char(sacrebleu, no_mecab):
    score, tok = M.bleu4(JA_PRED, JA_REF)
    assert tok == "char"
    assert score == pytest.approx(37.946475, abs=TOL)


def test_bleu_tokenizer_prefers_mecab_when_available(monkeypatch):
    monkeypatch.setattr(M, "_sacrebleu_tokenizer_available", lambda name: True)
    assert M._bleu_tokenizer("ja") == "ja-mecab"
    assert M._bleu_tokenizer("ko") == "ko-mecab"
    assert M._bleu_tokenizer("zh") == "zh"
    assert M._bleu_tokenizer("en") == "13a"


def test_rouge_l_english_default_tokenizer(rouge_scorer):
    score, tok = M.rouge_l(EN_PRED, EN_REF)
    assert tok == "default"
    assert score == pytest.approx(0.737892, abs=TOL)


def test_rouge_l_chinese_char_tokenizer(rouge_scorer):
    score, tok = M.rouge_l(ZH_PRED, ZH_REF)
    assert tok == "char"
    assert score == pytest.approx(0.765653, abs=TOL)
    # The bug being avoided: rouge-score's default tokenizer keeps only [a-z0-9], so Chinese scores 0.
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    assert all(default.score(r, p)["rougeL"].fmeasure == 0.0 for p, r in zip(ZH_PRED, ZH_REF))


def test_rouge_l_japanese_char_tokenizer(rouge_scorer):
    score, tok = M.rouge_l(JA_PRED, JA_REF)
    assert tok == "char"
    assert score == pytest.approx(0.718421, abs=TOL)


def test_rouge_l_non_ascii_words_not_dropped(rouge_scorer):
    score, tok = M.rouge_l(["Привет мир"], ["привет мир друг"])
    assert tok == "word"
    assert score == pytest.approx(0.8, abs=TOL)  # LCS 2, P = 1, R = 2/3


def test_exact_match_reuses_task_normalisation():
    assert M.exact_match(EN_PRED, EN_REF) == 0.0
    preds, refs = ["Paris\n### more", " Rome ", "Oslo"], ["Paris", "Rome", "Bergen"]
    assert M.exact_match(preds, refs) == pytest.approx(2 / 3)


def test_token_f1_english():
    # Per pair: cat/sat/on/mat vs cat/is/sitting/on/mat -> 2/3; 6 of 7 words -> 6/7; same words -> 1.
    assert M.token_f1(EN_PRED, EN_REF) == pytest.approx(0.841270, abs=TOL)
    assert M.token_f1(["The Answer!"], ["answer"]) == 1.0  # case, punctuation and articles ignored
    assert M.token_f1([""], [""]) == 1.0 and M.token_f1(["x"], [""]) == 0.0


def test_token_f1_chinese_per_character():
    assert M.token_f1(ZH_PRED, ZH_REF) == pytest.approx(0.890653, abs=TOL)
    # Without per-character tokens each sentence would be a single token and score 0.
    assert M.token_f1(ZH_PRED, ZH_REF, language="en") == 0.0
    assert M.token_f1(["北京，中国。"], ["中国北京"]) == 1.0  # CJK punctuation is not a token


def test_token_f1_japanese():
    assert M.token_f1(JA_PRED, JA_REF) == pytest.approx(0.973684, abs=TOL)


def test_detect_language():
    assert M.detect_language(EN_REF) == "en"
    assert M.detect_language(ZH_REF) == "zh"
    assert M.detect_language(JA_REF) == "ja"
    assert M.detect_language(["カタカナだけ"]) == "ja"
    assert M.detect_language(["안녕하세요 세계"]) == "ko"
    assert M.detect_language(["Привет мир", "café"]) == "other"
    assert M.detect_language(["", "123"]) == "en"


def test_score_generations_names_tokenizers(sacrebleu, rouge_scorer):
    en = M.score_generations(EN_PRED, EN_REF)
    assert en == pytest.approx({
        "exact_match": 0.0, "token_f1": 0.841270, "bleu4": 30.479656, "rougeL": 0.737892,
        "bleu_tokenizer": "13a", "rouge_tokenizer": "default", "language": "en",
    }, abs=TOL)
    zh = M.score_generations(ZH_PRED, ZH_REF)
    assert (zh["bleu_tokenizer"], zh["rouge_tokenizer"], zh["language"]) == ("zh", "char", "zh")
    assert zh["bleu4"] == pytest.approx(66.303571, abs=TOL)


def test_score_generations_normalises_predictions_only(sacrebleu, rouge_scorer):
    preds = ["the cat sat on the mat\n### Instruction: next", "  Paris is the capital of France.  "]
    scores = M.score_generations(preds, ["the cat sat on the mat", "Paris is the capital of France."])
    assert scores["exact_match"] == 1.0 and scores["token_f1"] == 1.0
    assert scores["bleu4"] == pytest.approx(100.0) and scores["rougeL"] == pytest.approx(1.0)


def test_score_generations_only_requested_metrics():
    scores = M.score_generations(["a b"], ["a b"], metrics=("exact_match", "token_f1"))
    assert set(scores) == {"exact_match", "token_f1", "language"}


def test_unknown_metric_lists_valid_names():
    with pytest.raises(DeftuneError, match="rougel.*did you mean 'rougeL'.*Valid metrics: exact_match"):
        M.score_generations(["a"], ["a"], metrics=("rougel",))


def test_unknown_language_and_length_mismatch():
    with pytest.raises(DeftuneError, match="Unknown language"):
        M.token_f1(["a"], ["a"], language="klingon")
    with pytest.raises(ValueError):
        M.token_f1(["a"], ["a", "b"])


def test_higher_is_better_covers_all_metrics():
    assert M.HIGHER_IS_BETTER["eval_loss"] is False and M.HIGHER_IS_BETTER["eval_ppl"] is False
    assert all(M.HIGHER_IS_BETTER[name] for name in M.METRIC_NAMES)


@pytest.mark.parametrize(
    ("module", "call"),
    [
        ("sacrebleu", lambda: M.bleu4(["a"], ["a"])),
        ("rouge_score.rouge_scorer", lambda: M.rouge_l(["a"], ["a"])),
    ],
)
def test_missing_extra_names_metrics_extra(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)  # a None entry makes `import module` fail
    with pytest.raises(MissingExtraError, match=r"deftune\[metrics\]"):
        call()
