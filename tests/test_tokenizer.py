"""Tokenizer: OpenAI's algorithm, written here from its description, against clip.Tokenizer."""
import collections
import gzip
import html
import re

import pytest
import torch

import clip

# OpenAI's pattern in Python's re: letters are [^\W\d_], numbers \d, the rest runs of non-space non-word.
PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")
CORPUS = ["a photo of a dog", "two cats sleeping on the red sofa", "the quick brown fox jumps over the lazy dog",
          "a painting of a lighthouse at sunset", "people walking in the rain with umbrellas",
          "a bowl of fresh fruit on the kitchen table", "dogs and cats are friends", "photos of photographs"] * 3


def learn_merges(corpus, n):
    words = collections.Counter()
    enc = clip.bytes_to_unicode()
    for line in corpus:
        for w in PATTERN.findall(line.lower()):
            chars = [enc[b] for b in w.encode()]
            words[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
    merges = []
    for _ in range(n):
        pairs = collections.Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i < len(w) - 1 and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


class ReferenceTokenizer:
    """OpenAI's simple_tokenizer: greedy lowest-rank merges per pre-token, SOT/EOT, truncate keeping EOT."""

    def __init__(self, merges):
        enc = list(clip.bytes_to_unicode().values())
        vocab = enc + [v + "</w>" for v in enc] + ["".join(m) for m in merges] + [clip.SOT, clip.EOT]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = clip.bytes_to_unicode()

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return word

    def encode(self, text):
        text = re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip().lower()
        ids = []
        for tok in PATTERN.findall(text):
            if tok in (clip.SOT, clip.EOT):
                ids.append(self.encoder[tok])
                continue
            ids += [self.encoder[p] for p in self.bpe("".join(self.byte_encoder[b] for b in tok.encode()))]
        return ids

    def __call__(self, texts, context=77):
        out = torch.zeros(len(texts), context, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.encoder[clip.SOT]] + self.encode(t) + [self.encoder[clip.EOT]]
            if len(ids) > context:
                ids = ids[:context]
                ids[-1] = self.encoder[clip.EOT]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


TEXTS = ["A photo of a DOG.", "  two   cats\tsleeping\n on the sofa  ", "it's the dog's toy, isn't it?",
         "Fox & hounds &amp; more &lt;3", "price: $12.50 (approx.) 2023", "café naïve résumé", "东京的夜景 and ramen",
         "snake_case__words!!! ...", "emoji 🐕 dog", "unseenwordzzz qqq", "<|endoftext|> in text"]


@pytest.fixture(scope="module")
def merges_file(tmp_path_factory):
    merges = learn_merges(CORPUS, 200)
    path = tmp_path_factory.mktemp("bpe") / "bpe_simple_vocab_test.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(path), merges


def test_openai_merges_file_reproduces_reference_ids(merges_file):
    path, merges = merges_file
    ours, ref = clip.Tokenizer.from_file(path), ReferenceTokenizer(merges)
    assert ours.vocab_size == 512 + len(merges) + 2
    torch.testing.assert_close(ours(TEXTS), ref(TEXTS), rtol=0, atol=0)


def test_truncation_keeps_eot_last(merges_file):
    path, merges = merges_file
    tok = clip.Tokenizer.from_file(path, context_length=8)
    ids = tok(["the quick brown fox jumps over the lazy dog again and again"])[0]
    assert ids[0] == tok.sot and ids[-1] == tok.eot and (ids != 0).all()
    torch.testing.assert_close(ids, ReferenceTokenizer(merges)(["the quick brown fox jumps over the lazy dog again "
                                                                "and again"], context=8)[0], rtol=0, atol=0)


def test_tokenizer_json_round_trip(merges_file, tmp_path):
    # An HF tokenizer.json with HF CLIP's own normalizer (NFC, whitespace, lower-case) gives the same ids.
    from tokenizers import Regex, normalizers

    path, _ = merges_file
    tok = clip.Tokenizer.from_file(path)
    tok.tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                     normalizers.Lowercase()])
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    again = clip.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    torch.testing.assert_close(again(TEXTS), clip.Tokenizer.from_file(path)(TEXTS), rtol=0, atol=0)


def test_trained_tokenizer_has_eot_highest_and_round_trips():
    tok = clip.train_bpe(CORPUS, vocab_size=300, context_length=16)
    assert tok.eot == tok.vocab_size - 1 and tok.sot == tok.vocab_size - 2
    ids = tok(["a photo of a dog"])[0]
    assert ids.argmax() == (ids != 0).sum() - 1  # the text tower finds EOT with argmax
    byte_of = {c: b for b, c in clip.bytes_to_unicode().items()}  # the byte-level symbols back to UTF-8 text
    text = "".join(tok.tokenizer.id_to_token(i) for i in ids.tolist() if i not in (0, tok.sot, tok.eot))
    assert " ".join(bytes(byte_of[c] for c in w).decode() for w in text.split("</w>")).strip() == "a photo of a dog"
    again = clip.Tokenizer.from_str(tok.to_str(), 16)
    torch.testing.assert_close(again(TEXTS), tok(TEXTS), rtol=0, atol=0)


def test_missing_tokenizer_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        clip.Tokenizer.from_file(str(tmp_path / "nope.json"))


def test_training_is_deterministic():
    # The tokenizers library's trainer breaks ties differently from call to call; the same captions
    # (and so the same seed) must always give the same vocabulary, or runs are not reproducible.
    corpus = CORPUS + [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green") for s in ("circle", "square")
                       for b in ("gray", "black")]
    first = clip.train_bpe(corpus, vocab_size=600).to_str()
    assert all(clip.train_bpe(corpus, vocab_size=600).to_str() == first for _ in range(4))
