"""data.py filter and curate: MetaCLIP's matching against its naive loop, its balancing against the
binomial it draws from, the same subset for any number of workers; DataComp's filter keeping exactly the
top fraction by score; hostile metadata bounded; a stopped command rerun writes everything once."""
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

import data
import naive
import train
from conftest import ROOT
from test_train import FAST

ADVERSARIAL = ["", " ", "  ", "a", "cat", "the cat", "cat.", "cat ,", "new york", "new", "york city", "new york city",
               "U.S.", "U . S .", "rock 'n' roll", "café", "naïve café", "猫", "東京 タワー", "a  b", " lead", "trail ",
               "\ttab", "x\0y", "ü", "cat cat", "what?", "!", "`quote`", "e.g", "e . g", "1,000", "1 , 000",
               "c++", "c", "++", "a b c d e f", "b c d"]
CAPTIONS = ["", " ", "a cat", "the cat.", "The cat, the dog", "cat,dog;bird:fish?yes!no`", "New York City at night",
            "new york city at night", "new  york", "U.S. flag", "U . S . flag", "rock 'n' roll!", "un café naïve café",
            "猫 と 東京 タワー", "东京塔", "a\tb\nc\rd", "a  b", "  lead and trail  ", "x\0y", "ü ü ü", "cat cat cat",
            "what? what!", "`quote`", "e.g. this", "1,000 things", "c++ and c", "a b c d e f g", "b c d e",
            "trail", "lead", "\ttab", "\u2028line\u2029sep", "emoji 🐱 cat"]


def test_matching_equals_metaclips_loop_on_adversarial_and_random_captions():
    matcher = data.Matcher(ADVERSARIAL)
    for caption in CAPTIONS:
        assert matcher(caption) == naive.substr_matching(caption, ADVERSARIAL), repr(caption)
    rng = np.random.default_rng(0)
    alphabet = list("ab ,.;:?!`\t\n\rüé猫") + ["  "]
    words = ["a", "b", "ab", "ba", "a b", "b a", "a.", ",", "", " a", "b ", "ü", "é猫", "a\tb"]
    for _ in range(300):
        entries = [str(rng.choice(words)) + "".join(rng.choice(alphabet, rng.integers(0, 4))) for _ in range(12)]
        entries = list(dict.fromkeys(entries))  # repeats are left out by read_metadata (test below)
        matcher = data.Matcher(entries)
        for _ in range(10):
            caption = "".join(rng.choice(alphabet, rng.integers(0, 30)))
            assert matcher(caption) == naive.substr_matching(caption, entries), (repr(caption), entries)


def zipf_pool(n_entries=60, n=40_000, seed=0):
    """Captions each naming one of n_entries concepts, drawn from a Zipf law (a head of thousands, a tail of
    a few), with words around it that match nothing."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_entries + 1) ** 1.1
    picks = rng.choice(n_entries, size=n, p=p / p.sum())
    entries = [f"concept{i}" for i in range(n_entries)]
    return entries, [f"a photo of {entries[i]}, taken outside" for i in picks]


def test_balancing_keeps_t_of_each_head_entry_and_every_tail_pair():
    entries, captions = zipf_pool()
    matcher = data.Matcher(entries)
    ids = [matcher(c) for c in captions]
    counts = np.bincount([i[0] for i in ids], minlength=len(entries))
    t = 400
    kept = np.zeros(len(entries), np.int64)
    for n, i in enumerate(ids):
        kept[i] += data.balanced(f"k{n}", i, counts, t, seed=1)
    head, tail = counts > t, counts <= t
    assert head.sum() >= 5 and tail.sum() >= 20  # both sides of t are tried
    sd = np.sqrt(t * (1 - t / counts[head]))  # kept ~ Binomial(count, t / count)
    assert (np.abs(kept[head] - t) <= 4 * sd).all(), (kept[head], counts[head])
    assert (kept[tail] == counts[tail]).all()
    z = (kept[head] - t) / sd  # the draws are not just within bounds but spread as a binomial's
    assert abs(z.mean()) < 4 / np.sqrt(head.sum()) and 0.3 < z.std() < 2.0, z
    other = sum(data.balanced(f"k{n}", i, counts, t, seed=2) for n, i in enumerate(ids))
    same = sum(data.balanced(f"k{n}", i, counts, t, seed=1) for n, i in enumerate(ids))
    assert same == kept.sum() and other != same  # a seed decides the draws


def test_a_pair_of_several_entries_is_kept_if_any_of_them_keeps_it():
    counts = np.array([10_000, 3])
    assert data.balanced("k", [1], counts, 5, 0)  # under t: always
    kept = sum(data.balanced(f"k{n}", [0], counts, 5, 0) for n in range(10_000))
    both = sum(data.balanced(f"k{n}", [0, 1], counts, 5, 0) for n in range(10_000))
    assert 0 < kept < 30 and both == 10_000


def pool(folder, n=24):
    folder.mkdir(exist_ok=True)
    s = data.Synthetic(0, "train", n)
    lines = ["filepath\ttitle"]
    for i in range(n):
        s.image(i).save(folder / f"{i}.png")
        lines.append(f"{i}.png\t{s.captions(i)[0][0]}")
    (folder / "pool.tsv").write_text("\n".join(lines) + "\n")
    return str(folder / "pool.tsv")


def shard_samples(folder):
    out = []
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".tar")):
        with tarfile.open(os.path.join(folder, name)) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    key = m.name[:-len(".json")]
                    out.append((key, json.load(t.extractfile(m))["key"], t.extractfile(key + ".txt").read().decode()))
    return out


def run(script, *argv, env=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc


def test_curate_keeps_the_same_pairs_for_any_number_of_workers_and_ranks(tmp_path):
    table = pool(tmp_path / "pool", 48)
    (tmp_path / "meta.txt").write_text("red\nblue\ngreen\nyellow\ncircle\nsquare\nlarge\nsmall\nnothing here\n")
    args = ["curate", "--metadata", str(tmp_path / "meta.txt"), "--data", table, "--t", "4", "--per-shard", "5"]
    run("data.py", *args, "--out", str(tmp_path / "one"))
    run("data.py", *args, "--out", str(tmp_path / "two"), "--workers", "2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "data.py"), *args, "--out", str(tmp_path / "ranks"), "--workers", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    one, two, ranks = ([(key, text) for _, key, text in shard_samples(tmp_path / d)] for d in ("one", "two", "ranks"))
    assert 0 < len(one) < 48 and sorted(one) == sorted(two) == sorted(ranks)
    assert {k for k, _ in one} <= {f"{i}.png" for i in range(48)}  # each under its row's image path
    for other in ("two", "ranks"):  # kept counts summed over workers and ranks too
        assert (tmp_path / other / "counts.tsv").read_text() == (tmp_path / "one" / "counts.tsv").read_text(), other
    rows = [line.split("\t") for line in (tmp_path / "one" / "counts.tsv").read_text().splitlines()[1:]]
    names = [r[0] for r in rows]
    captions = [line.split("\t")[1] for line in open(table).read().splitlines()[1:]]
    for j, (entry, matched, kept) in enumerate(rows):  # the counts are the naive matching's
        assert int(matched) == sum(j in naive.substr_matching(c, names) for c in captions), entry
        assert int(kept) == sum(j in naive.substr_matching(c, names) for _, c in one), entry
    assert rows[-1] == ["nothing here", "0", "0"]
    run("data.py", *args, "--out", str(tmp_path / "seed"), "--seed", "5")
    assert sorted(k for k, _, _ in shard_samples(tmp_path / "seed")) != sorted(k for k, _ in one)


def test_kth_largest_equals_a_sort_in_bounded_chunks(tmp_path):
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=5000), rng.choice([-0.5, 0.0, 0.25, 1.0], 3000), np.array([0.1]),
                   np.concatenate([rng.uniform(-1, 1, 2000), [np.nan] * 50, [-0.0, 0.0] * 20])):
        s = values.astype(np.float32)
        s.tofile(tmp_path / "s.f32")
        valid = np.sort(s[~np.isnan(s)])[::-1]
        for k in sorted(k for k in {1, 2, len(valid) // 3, len(valid) - 1, len(valid)} if 1 <= k <= len(valid)):
            key, ties = data.kth_largest(str(tmp_path / "s.f32"), k, chunk=700)
            assert key == data.sortable(valid[k - 1:k])[0], (k, valid[k - 1])
            assert ties == k - (data.sortable(valid) > key).sum() >= 1
    x = np.array([-np.inf, -2.5, -1e-30, -0.0, 0.0, 1e-30, 0.5, np.inf], np.float32)
    assert (np.diff(data.sortable(x).astype(np.int64)) >= 0).all()  # the keys keep the floats' order


class Scorer:
    """A stand-in teacher whose score of a pair is fixed by its caption's last word (a number)."""
    def __init__(self):
        import torch

        self.p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self.p

    def transform(self, train):
        import torch

        return lambda sample, rng: {"image": torch.zeros(1)}

    def encode_image(self, pixels, normalize=True):
        import torch

        return torch.ones(len(pixels), 1)

    def encode_texts(self, texts):
        import torch

        return torch.tensor([[float(t.split()[-1])] for t in texts])


def scored_pool(folder, scores):
    folder.mkdir()
    lines = ["filepath\ttitle"]
    for i, s in enumerate(scores):
        data.Synthetic(0, "train", 1).image(0).save(folder / f"{i}.png")
        lines.append(f"{i}.png\tpair {s}")
    (folder / "pool.tsv").write_text("\n".join(lines) + "\n")
    return data.CsvData(str(folder / "pool.tsv"))


def test_filter_keeps_exactly_the_top_fraction_and_every_pair_at_a_threshold(tmp_path):
    scores = [0.5, -0.25, 0.125, 0.5, 0.75, -1.0, 0.5, 0.0, 0.25, 0.5]  # ties at 0.5 across the cut
    table = scored_pool(tmp_path / "pool", scores)
    for fraction, want in ((0.3, ["4.png", "0.png", "3.png"]), (0.5, ["4.png", "0.png", "3.png", "6.png", "9.png"]),
                           (0.04, []), (1.0, [f"{i}.png" for i in range(10)])):
        out = str(tmp_path / f"f{fraction}")
        kept, scored, _ = data.filter_pool(Scorer(), table, out, fraction=fraction, batch_size=3)
        rows = [json.loads(line) for line in open(os.path.join(out, "scores.jsonl"))]
        assert [r["key"] for r in rows] == [f"{i}.png" for i in range(10)] and [r["score"] for r in rows] == scores
        assert kept == len(want) and sorted(r["key"] for r in rows if r["kept"]) == sorted(want)
        assert sorted(k for _, k, _ in shard_samples(out)) == sorted(want)
        assert sorted(os.listdir(out)) == sorted(["scores.jsonl", *[f"{n:05d}.tar" for n in range(bool(want))]])
    out = str(tmp_path / "t")
    kept, _, _ = data.filter_pool(Scorer(), table, out, threshold=0.25)
    assert sorted(k for _, k, _ in shard_samples(out)) == ["0.png", "3.png", "4.png", "6.png", "8.png", "9.png"]


def test_filter_skips_and_counts_what_does_not_decode(tmp_path):
    table = scored_pool(tmp_path / "pool", [0.5, 0.25, 0.75, 0.0])
    (tmp_path / "pool" / "1.png").write_bytes(b"not an image")
    (tmp_path / "pool" / "3.png").unlink()
    kept, scored, problems = data.filter_pool(Scorer(), table, str(tmp_path / "out"), fraction=0.5)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "scores.jsonl")]
    assert scored == 2 and kept == 1 and sorted(problems) == ["missing image", "unreadable image"]
    assert [r["key"] for r in rows] == ["0.png", "1.png", "2.png", "3.png"]  # a row for every sample
    assert rows[1]["skipped"] == "unreadable image" and rows[3]["skipped"] == "missing image"
    assert [r.get("kept") for r in rows] == [False, None, True, None]


def test_a_stopped_command_is_rerun_whole_and_a_finished_folder_refused(tmp_path):
    table = scored_pool(tmp_path / "pool", [0.5, 0.25, 0.75, 0.0])
    out = tmp_path / "out"
    out.mkdir()
    (out / ".filter-unfinished").write_text("")  # what a killed filter leaves: its marker, a shard, rows
    (out / "part00000-00000.tar.tmp").write_bytes(b"half")
    (out / "00000.tar").write_bytes(b"a shard of the stopped run")
    (out / "scores.partial").write_text('{"key": "0.png", "score": 0.5}\n')
    data.filter_pool(Scorer(), table, str(out), fraction=0.5)
    assert sorted(os.listdir(out)) == ["00000.tar", "scores.jsonl"]
    assert len(shard_samples(out)) == 2 and len(open(out / "scores.jsonl").readlines()) == 4
    with pytest.raises(ValueError, match="already holds 00000.tar: give a new folder"):
        data.filter_pool(Scorer(), table, str(out), fraction=0.5)
    other = tmp_path / "other"
    other.mkdir()
    (other / "00003.tar").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match="already holds"):
        data.curate(str(tmp_path / "pool" / "pool.tsv"), table, str(other), 2)
    assert (other / "00003.tar").read_bytes() == b"someone else's"


def test_hostile_metadata_is_bounded_and_reported(tmp_path, capsys):
    big = "x" * (10 << 20)
    entries = ["cat", big, "dog", "a\0b", *(["cat"] * 1_000_000), "bird"]
    (tmp_path / "m.json").write_text(json.dumps(entries))
    start = time.time()
    read = data.read_metadata(str(tmp_path / "m.json"))
    matcher = data.Matcher(read)
    assert time.time() - start < 30
    err = capsys.readouterr().err
    assert "1 entries over 1000 characters" in err and "1000000 entries repeating an earlier one" in err
    assert matcher("a cat and a dog, a\0b") == [0, 2, 3]  # ids are the positions in the file
    assert matcher("bird") == [len(entries) - 1]
    start = time.time()
    assert data.Matcher([" ".join(["a"] * 499)])(" ".join(["a"] * 4000)) == [0]  # the longest run, every word
    assert time.time() - start < 10
    for payload, said in ((b'{"cat": 1}', "not a JSON list of strings"), (b"[1, 2]", "not a JSON list of strings"),
                          (b"[NaN]", "not JSON"), (b"\xff[", "not JSON")):
        (tmp_path / "bad.json").write_bytes(payload)
        with pytest.raises(ValueError, match=said):
            data.read_metadata(str(tmp_path / "bad.json"))
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(Exception, match="fifo.txt"):
        data.read_metadata(str(tmp_path / "fifo.txt"))
    (tmp_path / "lines.txt").write_text("cat\ndog\n\nsea horse\n")
    assert data.read_metadata(str(tmp_path / "lines.txt")) == ["cat", "dog", "", "sea horse"]


def test_each_entry_draws_on_its_own_and_the_caps_hold_at_their_edge(tmp_path, monkeypatch):
    counts = np.array([1000, 1000])  # two entries at t / count = 0.1 each: kept unless both draws miss
    kept = np.mean([data.balanced(f"k{n}", [0, 1], counts, 100, 0) for n in range(20_000)])
    assert abs(kept - (1 - 0.9 ** 2)) < 0.015, kept
    (tmp_path / "m.txt").write_text("a" * 1000 + "\n" + "b" * 1001 + "\n")
    assert data.read_metadata(str(tmp_path / "m.txt")) == ["a" * 1000, None]  # at the cap kept, one past left out
    monkeypatch.setattr(data, "MAX_ENTRIES", 3)
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    assert data.read_metadata(str(tmp_path / "three.txt")) == ["x", "y", "z"]
    (tmp_path / "four.txt").write_text("x\ny\nz\nw\n")
    with pytest.raises(ValueError, match="4 entries, over 3"):
        data.read_metadata(str(tmp_path / "four.txt"))


def test_the_top_fraction_rounds_and_the_score_is_a_cosine(tmp_path):
    table = scored_pool(tmp_path / "pool", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    kept, _, _ = data.filter_pool(Scorer(), table, str(tmp_path / "f"), fraction=0.66)
    assert kept == 7  # round(6.6), not its floor

    class Unnormalised(Scorer):
        def encode_image(self, pixels, normalize=False):
            import torch

            return torch.ones(len(pixels), 1) * (1.0 if normalize else 3.0)

    table = scored_pool(tmp_path / "one", [0.5])
    rows = list(data.clip_scores(Unnormalised(), [("0.png", s) for _, s in data.raw_samples(table, 0, [])], 4, []))
    assert rows[0][-1] == pytest.approx(0.5)
