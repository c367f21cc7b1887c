"""The n-gram stage: Kneser-Ney/add-k correctness, ARPA IO, KenLM interop, sampling, the stage."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from lmpipe.core.errors import InputError
from lmpipe.ngram import hashtable as nh
from lmpipe.ngram.arpa import read_arpa, write_arpa
from lmpipe.ngram.estimate import estimate
from lmpipe.ngram.model import NgramModel
from lmpipe.ngram.sampling import generate_ids, sample_next

REPO = Path(__file__).resolve().parent.parent
BOS = "<s>"

pytestmark = pytest.mark.filterwarnings("ignore:Kneser-Ney. count-of-counts:RuntimeWarning")


# ----------------------------------------------------------------------------- references
def _documents(tokens, eos):
    docs, cur = [], []
    for t in tokens:
        cur.append(int(t))
        if t == eos:
            docs.append(cur)
            cur = []
    if cur:
        docs.append(cur)
    return docs


def _context(history, eos, order):
    """<s> + tokens since the last EOS, the last order-1 symbols."""
    h = [BOS]
    for t in history:
        h = [BOS] if t == eos else h + [int(t)]
    return tuple(h[-(order - 1):]) if order > 1 else ()


def reference_kneser_ney(tokens, V, eos, order):
    """Interpolated modified Kneser-Ney in plain Python dicts, straight from the textbook.

    Chen & Goodman (1998): adjusted count a = raw count at the highest order and for n-grams
    starting with <s>, else the number of distinct words seen before the n-gram; discounts
    D1, D2, D3+ per order from the count-of-counts n1..n4 (Y = n1 / (n1 + 2 n2),
    Dk = k - (k + 1) Y n_{k+1} / n_k; KenLM's fallback 0.5, 1, 1.5 when undefined);
    p(w | h) = max(a(hw) - D(a(hw)), 0) / sum_v a(hv) + gamma(h) p(w | h'),
    gamma(h) = sum_v D(a(hv)) / sum_v a(hv), p(w | h) = p(w | h') for an unseen context,
    and the unigram interpolated with 1 / V.
    """
    counts = [None] + [Counter() for _ in range(order)]
    for doc in _documents(tokens, eos):
        seq = [BOS] + doc
        for n in range(1, order + 1):
            for i in range(len(seq) - n + 1):
                g = tuple(seq[i : i + n])
                if g != (BOS,):
                    counts[n][g] += 1
    adjusted = [None] + [Counter() for _ in range(order)]
    for n in range(1, order + 1):
        if n == order:
            adjusted[n] = Counter(counts[n])
            continue
        left = defaultdict(set)
        for g in counts[n + 1]:
            left[g[1:]].add(g[0])
        for g in counts[n]:
            adjusted[n][g] = counts[n][g] if g[0] == BOS else len(left[g])
    discounts = [None]
    for n in range(1, order + 1):
        t = [sum(1 for v in adjusted[n].values() if v == k) for k in (1, 2, 3, 4)]
        d = None
        if min(t) > 0:
            y = t[0] / (t[0] + 2 * t[1])
            d = (1 - 2 * y * t[1] / t[0], 2 - 3 * y * t[2] / t[1], 3 - 4 * y * t[3] / t[2])
            if not all(0 < dk < k for k, dk in zip((1, 2, 3), d)):
                d = None
        discounts.append(d or (0.5, 1.0, 1.5))
    total = [None] + [Counter() for _ in range(order)]
    disc = [None] + [Counter() for _ in range(order)]
    for n in range(1, order + 1):
        for g, a in adjusted[n].items():
            total[n][g[:-1]] += a
            disc[n][g[:-1]] += discounts[n][min(a, 3) - 1]

    def prob(w, h):
        h = tuple(h)
        n = len(h) + 1
        tot = total[n][h]
        if tot == 0:
            return 1.0 / V if n == 1 else prob(w, h[1:])
        a = adjusted[n].get(h + (w,), 0)
        d = discounts[n][min(a, 3) - 1] if a else 0.0
        lower = 1.0 / V if n == 1 else prob(w, h[1:])
        return max(a - d, 0) / tot + disc[n][h] / tot * lower

    return prob, discounts


def reference_add_k(tokens, V, eos, order, k):
    """(c(hw) + k) / (c(h.) + k V) on the longest context seen in training."""
    counts = Counter()
    ctx = Counter()
    for doc in _documents(tokens, eos):
        seq = [BOS] + doc
        for n in range(1, order + 1):
            for i in range(len(seq) - n + 1):
                g = tuple(seq[i : i + n])
                if g[-1] != BOS:
                    counts[g] += 1
                    ctx[g[:-1]] += 1

    def prob(w, h):
        h = tuple(h)
        while h and ctx[h] == 0:
            h = h[1:]
        return (counts[h + (w,)] + k) / (ctx[h] + k * V)

    return prob


def _corpus(n=2500, V=12, eos=1, seed=0):
    """Zipf-ish tokens with documents of varying length; ids V-2, V-1 never occur."""
    rng = np.random.default_rng(seed)
    x = np.minimum(rng.zipf(1.6, n), V - 2) - 1 + 2  # 2 .. V-3 (V-2, V-1 unseen)
    x = np.where(x >= V - 2, 0, x)
    x[rng.random(n) < 0.06] = eos
    return x.astype(np.int64)


def _histories(x, eos, rng, V):
    seen = [list(x[i : i + L]) for i in range(0, 400, 13) for L in range(0, 6)]
    unseen = [list(rng.integers(0, V, rng.integers(1, 6))) for _ in range(25)]
    partly = [list(x[i : i + 3]) + [V - 1] + list(x[i + 4 : i + 6]) for i in range(0, 200, 17)]
    after_eos = [[int(x[0]), eos] + list(x[5:8])]
    return seen + unseen + partly + after_eos


# ----------------------------------------------------------------------------- estimation
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk", [1 << 20, 97])
def test_kneser_ney_equals_the_textbook_reference(order, chunk):
    V, eos = 12, 1
    x = _corpus(V=V, eos=eos)
    prob, discounts = reference_kneser_ney(x, V, eos, order)
    model = estimate(x, V, eos, order=order, chunk_tokens=chunk)
    np.testing.assert_allclose(model.meta["discounts"], [list(d) for d in discounts[1:]], rtol=1e-12)
    if order > 1:  # the count-of-counts of the higher orders are rich enough for real discounts
        assert not all(model.meta["discount_fallback"])
    rng = np.random.default_rng(1)
    for hist in _histories(x, eos, rng, V):
        h = _context(hist, eos, order)
        ref = np.array([prob(w, h) for w in range(V)])
        got = model.next_distribution(hist)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9, err_msg=f"context {h}")
    # the streaming scorer on a held-out stream (unseen ids and contexts included)
    stream = np.concatenate([_corpus(n=300, V=V, eos=eos, seed=7), [V - 1, V - 2, 5, eos, V - 1]])
    ref = np.log([prob(int(stream[i]), _context(stream[:i], eos, order)) for i in range(len(stream))])
    np.testing.assert_allclose(model.logprobs(stream, chunk_tokens=chunk), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_add_k_equals_the_textbook_reference(order):
    V, eos, k = 12, 1, 0.05
    x = _corpus(n=800, V=V, eos=eos)
    prob = reference_add_k(x, V, eos, order, k)
    model = estimate(x, V, eos, order=order, method="add_k", k=k)
    rng = np.random.default_rng(2)
    for hist in _histories(x, eos, rng, V):
        h = _context(hist, eos, order)
        ref = np.array([prob(w, h) for w in range(V)])
        np.testing.assert_allclose(model.next_distribution(hist), ref, rtol=1e-6)
    stream = _corpus(n=200, V=V, eos=eos, seed=3)
    ref = np.log([prob(int(stream[i]), _context(stream[:i], eos, order)) for i in range(len(stream))])
    np.testing.assert_allclose(model.logprobs(stream), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["kneser_ney", "add_k"])
@pytest.mark.parametrize("order", [2, 3, 5, 6])
def test_distributions_sum_to_one_for_any_context(method, order):
    rng = np.random.default_rng(order)
    V, eos = 300, 2
    x = rng.zipf(1.3, 30_000) % V
    x[rng.random(x.shape[0]) < 0.03] = eos
    model = estimate(x, V, eos, order=order, method=method)
    histories = (
        [list(x[i : i + rng.integers(0, 8)]) for i in rng.integers(0, 29_000, 40)]  # seen
        + [list(rng.integers(0, V, rng.integers(1, 8))) for _ in range(40)]  # mostly unseen
        + [list(x[i : i + 4]) + [int(rng.integers(0, V))] for i in rng.integers(0, 29_000, 40)]
        + [[], [eos], [int(x[0]), eos, int(x[1])]]
    )
    for hist in histories:
        p = model.next_distribution(hist)
        assert p.shape == (V,)
        assert (p > 0).all()
        assert abs(p.sum() - 1.0) < 1e-6, (hist, p.sum())


def test_logprobs_follow_the_scoring_convention():
    V, eos = 12, 1
    x = _corpus(V=V, eos=eos)
    model = estimate(x, V, eos, order=3)
    a, b, c = 4, 5, 6
    lp = model.logprobs(np.array([a, b, eos, c, a]))
    assert lp.shape == (5,)
    # the first token is predicted from <s>; after EOS the context restarts at <s>
    assert lp[0] == pytest.approx(math.log(model.next_distribution([])[a]), abs=1e-9)
    assert lp[3] == pytest.approx(lp[0] if c == a else math.log(model.next_distribution([])[c]), abs=1e-9)
    assert lp[4] == pytest.approx(model.logprobs(np.array([c, a]))[1], abs=1e-12)
    assert lp[2] == pytest.approx(math.log(model.next_distribution([a, b])[eos]), abs=1e-9)
    # chunked scoring gives the same numbers
    stream = _corpus(n=1000, V=V, eos=eos, seed=5)
    np.testing.assert_array_equal(model.logprobs(stream), model.logprobs(stream, chunk_tokens=7))
    np.testing.assert_array_equal(model.logprobs(stream), model.logprobs(stream, chunk_tokens=7, threads=2))
    total, n = model.score(stream)
    assert n == 1000 and total == pytest.approx(-model.logprobs(stream).sum())


def test_chunked_estimation_gives_the_same_model():
    V, eos = 50, 2
    rng = np.random.default_rng(3)
    x = rng.zipf(1.4, 20_000) % V
    x[rng.random(x.shape[0]) < 0.05] = eos
    val = rng.zipf(1.4, 3000) % V
    for method in ("kneser_ney", "add_k"):
        whole = estimate(x, V, eos, order=4, method=method)
        chunked = estimate(x, V, eos, order=4, method=method, chunk_tokens=1111)
        threaded = estimate(x, V, eos, order=4, method=method, threads=2)
        assert whole.meta["ngrams_per_order"] == chunked.meta["ngrams_per_order"]
        np.testing.assert_allclose(whole.logprobs(val), chunked.logprobs(val), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(whole.logprobs(val), threaded.logprobs(val, chunk_tokens=500, threads=2))


def test_bad_inputs_are_input_errors():
    x = np.array([0, 1, 2, 3])
    with pytest.raises(InputError, match="outside the vocabulary"):
        estimate(np.array([0, 1, 9]), 5, 1, order=2)
    with pytest.raises(InputError, match="order"):
        estimate(x, 5, 1, order=0)
    with pytest.raises(InputError, match="method"):
        estimate(x, 5, 1, method="witten_bell")
    with pytest.raises(InputError, match="k > 0"):
        estimate(x, 5, 1, method="add_k", k=0)
    model = estimate(x, 5, 1, order=2)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.logprobs(np.array([7]))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.next_distribution([-1])


def test_empty_training_stream_is_uniform():
    model = estimate(np.zeros(0, dtype=np.int64), 10, 1, order=3)
    np.testing.assert_allclose(model.next_distribution([3, 4]), np.full(10, 0.1))


def test_save_and_load(tmp_path):
    V, eos = 40, 2
    x = _corpus(n=5000, V=V, eos=eos)
    model = estimate(x, V, eos, order=4, unk_id=0, bos_id=3)
    path = model.save(tmp_path / "m")
    assert path == tmp_path / "m" / "model.npz"
    loaded = NgramModel.load(tmp_path / "m")
    assert (loaded.order, loaded.vocab_size, loaded.eos_id, loaded.unk_id, loaded.bos_id) == (4, V, eos, 0, 3)
    assert loaded.meta["ngrams_per_order"] == model.meta["ngrams_per_order"]
    np.testing.assert_array_equal(loaded.logprobs(x[:500]), model.logprobs(x[:500]))
    with pytest.raises(InputError, match="not found"):
        NgramModel.load(tmp_path / "nothing")


def test_outputs_are_byte_identical_across_runs(tmp_path):
    V, eos = 40, 2
    x = _corpus(n=5000, V=V, eos=eos)
    files = []
    for run in ("a", "b"):
        model = estimate(x, V, eos, order=3, unk_id=0)
        files.append(model.save(tmp_path / run).read_bytes())
        files.append(write_arpa(model, tmp_path / run / "model.arpa.gz").read_bytes())
    assert files[0] == files[2] and files[1] == files[3]


# ----------------------------------------------------------------------------- hashing
def test_hash_table_insert_and_lookup():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**50, 5000).astype(np.uint64)
    batch = np.concatenate([keys, keys[::3], keys[:10]])  # duplicates
    table = nh.empty_table(nh.table_size(5000))
    slots = nh.insert(table, batch, fresh=True)
    assert np.unique(slots[:5000]).shape[0] == 5000
    np.testing.assert_array_equal(table[slots], batch)
    np.testing.assert_array_equal(slots[5000:5000 + len(keys[::3])], slots[:5000][::3])
    np.testing.assert_array_equal(nh.lookup(table, keys), slots[:5000])
    missing = rng.integers(2**51, 2**52, 100).astype(np.uint64)
    assert (nh.lookup(table, missing) == -1).all()
    # a later batch finds the keys already present
    again = nh.insert(table, keys[100:200])
    np.testing.assert_array_equal(again, slots[100:200])
    # rebuilding keeps every key reachable
    new, remap = nh.rebuild(table, nh.table_size(5000, 0.3))
    np.testing.assert_array_equal(nh.lookup(new, keys), remap[slots[:5000]])


def test_hash_table_full_is_reported():
    table = nh.empty_table(64)
    with pytest.raises(nh.TableFull):
        nh.insert(table, np.arange(1000, dtype=np.uint64))


def test_distinct_estimate_is_close():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 200_000, 800_000).astype(np.uint64)
    true = np.unique(keys).shape[0]
    assert abs(nh.estimate_distinct(keys) - true) / true < 0.03


# ----------------------------------------------------------------------------- ARPA
def _stream_with_unseen(V, eos, seed=11):
    s = _corpus(n=3000, V=V, eos=eos, seed=seed)
    return np.concatenate([[V - 1, V - 2, eos], s[:50], [V - 1, 3, V - 2], s[50:], [V - 2]])


@pytest.mark.parametrize("suffix", [".arpa.gz", ".arpa"])
def test_arpa_round_trip_scores_identically(tmp_path, suffix):
    V, eos = 60, 2
    x = _corpus(n=20_000, V=V, eos=eos)
    model = estimate(x, V, eos, order=4, unk_id=0, bos_id=1)
    path = write_arpa(model, tmp_path / f"m{suffix}")
    text = (gzip.open if suffix.endswith(".gz") else open)(path, "rt").read()
    assert text.startswith("# lmpipe-ngram ")
    assert "\\data\\\nngram 1=61\n" in text and "\t<s>\t" in text and "\\end\\" in text
    back = read_arpa(path)
    assert (back.order, back.vocab_size, back.eos_id, back.unk_id) == (4, V, eos, 0)
    assert back.ngram_counts() == model.ngram_counts()
    stream = _stream_with_unseen(V, eos)
    np.testing.assert_allclose(back.logprobs(stream), model.logprobs(stream), rtol=0, atol=1e-6)
    for hist in ([], [5, 6], [V - 1, 4, 4]):
        np.testing.assert_allclose(back.next_distribution(hist), model.next_distribution(hist), atol=1e-9)


def test_add_k_has_no_arpa_form(tmp_path):
    model = estimate(_corpus(), 12, 1, order=2, method="add_k")
    with pytest.raises(InputError, match="add-k"):
        write_arpa(model, tmp_path / "m.arpa")


def test_read_arpa_from_another_toolkit_with_missing_prefixes(tmp_path):
    """No lmpipe header, tabs or spaces, a 3-gram whose 2-gram prefix is absent (SRILM-style
    pruning): the prefix scores like a backed-off n-gram (KenLM's 'blank' rule)."""
    path = tmp_path / "other.arpa"
    path.write_text(
        "some tool's banner\n\n\\data\\\nngram 1=6\nngram 2=3\nngram 3=2\n\n"
        "\\1-grams:\n-99 <s> -0.3\n-0.5\t3\t-0.2\n-0.6\t4\t-0.25\n-0.7\t</s>\n-1.0\t<unk>\n-0.9\t5\t-0.1\n\n"
        "\\2-grams:\n-0.2\t<s> 3\t-0.15\n-0.3\t4 5\t-0.05\n-0.25\t5 </s>\n\n"
        "\\3-grams:\n-0.1\t3 4 5\n-0.05\t4 5 </s>\n\n\\end\\\n"
    )
    model = read_arpa(path)
    assert model.vocab_size == 8 and model.eos_id == 6 and model.unk_id == 7  # inferred
    got = model.log10probs(np.array([3, 4, 5, model.eos_id]))
    # p(3|<s>) = -0.2; p(4|<s> 3) = bo(<s> 3) + p(4|3) = -0.15 + (bo(3) + p(4)) = -0.95;
    # p(5|3 4) = -0.1 (the 3-gram); p(</s>|4 5) = -0.05
    np.testing.assert_allclose(got, [-0.2, -0.95, -0.1, -0.05], atol=1e-6)
    # ids the file does not know score like <unk>, after the back-off of <s>
    np.testing.assert_allclose(model.log10probs(np.array([0]))[0], -0.3 - 1.0, atol=1e-6)


def test_read_arpa_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\t</s>\n-0.5\thello\n\n\\end\\\n")
    with pytest.raises(InputError, match="'hello' is not a token id"):
        read_arpa(bad)
    bad.write_text("\\data\\\nngram 1=2\nngram 2=1\n\n\\1-grams:\n-1.0\t</s>\n-0.5\t3\n\n\\2-grams:\n-0.1\t3\n\n\\end\\\n")
    with pytest.raises(InputError, match="line 10: expected 2 words"):
        read_arpa(bad)
    with pytest.raises(InputError, match="not found"):
        read_arpa(tmp_path / "missing.arpa")
    (tmp_path / "x.arpa").write_text("hello\n")
    with pytest.raises(InputError, match="not an ARPA file"):
        read_arpa(tmp_path / "x.arpa")


def _kenlm_scores(kmodel, stream, eos, unk):
    """KenLM's per-token log10 probabilities of a stream: one sentence per document."""
    word = lambda t: "<unk>" if t == unk else str(int(t))  # noqa: E731
    out, doc = [], []
    for t in stream:
        if t == eos:
            out += [s[0] for s in kmodel.full_scores(" ".join(map(word, doc)), bos=True, eos=True)]
            doc = []
        else:
            doc.append(t)
    if doc:
        out += [s[0] for s in kmodel.full_scores(" ".join(map(word, doc)), bos=True, eos=False)]
    return np.array(out)


@pytest.mark.parametrize("order", [2, 3, 4, 5, 6])
def test_kenlm_reads_our_arpa_and_agrees(tmp_path, order):
    import kenlm  # a dev dependency (pyproject.toml): missing is a failure, not a skip
    V, eos, unk = 80, 2, 0
    rng = np.random.default_rng(order)
    x = rng.zipf(1.3, 30_000) % (V - 10) + 3  # ids 70..79 never seen (and never 0, 1, 2)
    x[rng.random(x.shape[0]) < 0.04] = eos
    model = estimate(x, V, eos, order=order, unk_id=unk, bos_id=1)
    path = write_arpa(model, tmp_path / "m.arpa.gz")
    kmodel = kenlm.Model(str(path))
    assert kmodel.order == order
    val = rng.zipf(1.3, 4000) % V  # unseen ids (70..79, 0 = <unk>, 1) and unseen contexts
    val[rng.random(val.shape[0]) < 0.04] = eos
    val = np.concatenate([[eos, 75, 1, 0, eos], val, [78, 3]])
    ours = model.log10probs(val)
    theirs = _kenlm_scores(kmodel, val, eos, unk)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- on real text
def test_kneser_ney_beats_add_k_on_the_smoke_profile_data(mirror):
    """The smoke profile's data: the first ~200 kB of TinyShakespeare, split 90/5/5 at line
    boundaries, a 384-piece BPE trained on train, order 3 (and add-k's default k)."""
    from lmpipe.core.profiles import profile_dict
    from lmpipe.tokenizer.training import train_tokenizer

    smoke = profile_dict("smoke")
    text = (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")[: smoke["download"]["max_bytes"]]
    lines = text.splitlines(keepends=True)
    cut1, cut2 = int(len(lines) * 0.9), int(len(lines) * 0.95)
    train, val = "".join(lines[:cut1]), "".join(lines[cut1:cut2])
    tok = train_tokenizer([train], smoke["tokenizer"]["vocab_size"], num_threads=1)
    train_ids, val_ids = tok.encode_documents([train]), tok.encode_documents([val])
    ppl = {}
    for method in ("kneser_ney", "add_k"):
        model = estimate(train_ids, tok.vocab_size, tok.eos_id, order=smoke["ngram"]["order"],
                         method=method, k=smoke["ngram"]["k"])
        nll, n = model.score(val_ids)
        ppl[method] = math.exp(nll / n)
    assert ppl["kneser_ney"] < ppl["add_k"], ppl


# ----------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_and_respects_temperature_and_top_k():
    V, eos = 40, 2
    x = _corpus(n=20_000, V=V, eos=eos)
    model = estimate(x, V, eos, order=3)
    a = generate_ids(model, [5, 6], 50, temperature=1.0, seed=3, stop_at_eos=False)
    b = generate_ids(model, [5, 6], 50, temperature=1.0, seed=3, stop_at_eos=False)
    c = generate_ids(model, [5, 6], 50, temperature=1.0, seed=4, stop_at_eos=False)
    assert a == b and a != c and len(a) == 50
    greedy = generate_ids(model, [5, 6], 10, temperature=0, seed=1, stop_at_eos=False)
    assert greedy == generate_ids(model, [5, 6], 10, top_k=1, seed=9, stop_at_eos=False)
    assert greedy[0] == int(np.argmax(model.next_distribution([5, 6])))
    # top-k: only the k most likely ids are ever drawn
    rng = np.random.default_rng(0)
    logp = np.log10(model.next_distribution([5]))
    allowed = set(np.argsort(-logp)[:3].tolist())
    assert {sample_next(logp, rng, 1.5, 3) for _ in range(300)} <= allowed
    # generation stops at EOS
    out = generate_ids(model, [], 500, seed=0)
    assert eos not in out and len(out) < 500
    with pytest.raises(InputError):
        sample_next(logp, rng, -1.0)


def _toy_tokenizer_project(root: Path, text: str, vocab_size: int = 384) -> dict:
    """data/tokenizer + data/tokens for `text` (three splits), made with the project tokenizer."""
    from lmpipe.data.tokens import token_dtype
    from lmpipe.tokenizer.model import save_tokenizer
    from lmpipe.tokenizer.training import train_tokenizer

    tok = train_tokenizer([text], vocab_size, num_threads=1)
    save_tokenizer(tok, root / "data" / "tokenizer" / "tokenizer.model")
    tokens = root / "data" / "tokens"
    tokens.mkdir(parents=True)
    paras = [p for p in text.split("\n\n") if p.strip()]
    n = len(paras)
    splits = {"train": paras[: int(n * 0.8)], "val": paras[int(n * 0.8) : int(n * 0.9)], "test": paras[int(n * 0.9) :]}
    meta = {"dtype": token_dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size, **tok.special_ids(), "splits": {}}
    for split, docs in splits.items():
        ids = tok.encode_documents(docs)
        ids.tofile(tokens / f"{split}.bin")
        meta["splits"][split] = {"tokens": int(ids.size), "bytes": sum(len(d.encode()) for d in docs), "documents": len(docs)}
    (tokens / "meta.json").write_text(json.dumps(meta))
    return meta


def test_generate_text_round_trips_through_the_tokenizer(tmp_path, mirror):
    from lmpipe.data.tokens import load_tokens, tokens_meta
    from lmpipe.ngram.sampling import generate_text

    _toy_tokenizer_project(tmp_path, (mirror / "tinyshakespeare.txt").read_text()[:60_000])
    meta = tokens_meta(tmp_path)
    model = estimate(np.asarray(load_tokens("train", tmp_path)), meta["vocab_size"], meta["eos_id"], order=3)
    model.save(tmp_path / "data" / "models" / "ngram")
    model_dir = tmp_path / "data" / "models" / "ngram"
    text = generate_text(model_dir, "ROMEO:", 40, temperature=0.8, top_k=20, seed=1,
                         tokenizer_dir=tmp_path / "data" / "tokenizer")
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    again = generate_text(model_dir, "ROMEO:", 40, temperature=0.8, top_k=20, seed=1,
                          tokenizer_dir=tmp_path / "data" / "tokenizer")
    assert text == again


# ----------------------------------------------------------------------------- the stage
def _run_stage(env_root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LMPIPE_ROOT=str(env_root), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "stages.ngram"], cwd=env_root, env=env, capture_output=True, text=True, timeout=600
    )


def _write_params(root: Path, **ngram) -> None:
    from lmpipe.core.profiles import deep_merge, dump_params, profile_dict

    params = deep_merge(profile_dict("smoke"), {"ngram": ngram}) if ngram else profile_dict("smoke")
    (root / "params.yaml").write_text(dump_params(params))


def test_stage_end_to_end(project, mirror, mlflow_uri):
    meta = _toy_tokenizer_project(project, (mirror / "tinyshakespeare.txt").read_text()[:120_000])
    _write_params(project)
    proc = _run_stage(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((project / "metrics" / "ngram.json").read_text())
    for key in ("val_ppl", "val_bpb", "test_ppl", "test_bpb", "train_seconds", "tokens_per_second",
                "score_tokens_per_second", "ngrams_order_1", "ngrams_order_2", "ngrams_order_3", "peak_rss_mb"):
        assert key in metrics, key
    assert 1 < metrics["val_ppl"] < meta["vocab_size"]
    out = project / "data" / "models" / "ngram"
    model = NgramModel.load(out)
    assert model.order == 3  # the smoke profile
    from lmpipe.data.tokens import load_tokens
    from lmpipe.evaluation.metrics import bits_per_byte

    val = load_tokens("val", project)
    nll, n = model.score(val)
    assert metrics["val_bpb"] == pytest.approx(bits_per_byte(nll, meta["splits"]["val"]["bytes"]))
    arpa = read_arpa(out / "model.arpa.gz")
    np.testing.assert_allclose(arpa.logprobs(val), model.logprobs(val), atol=1e-6)
    # MLflow: one run named after the stage with params, metrics and the model files
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id], "tags.`lmpipe.stage` = 'ngram'")
    assert runs, "no MLflow run for the ngram stage"
    run = runs[0]
    assert run.data.params["ngram.order"] == "3"
    assert run.data.metrics["val_ppl"] == pytest.approx(metrics["val_ppl"])
    files = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.npz", "model/model.arpa.gz"} <= files


def test_stage_add_k_writes_no_arpa(project, mirror, monkeypatch):
    monkeypatch.setenv("LMPIPE_TRACKING", "off")
    _toy_tokenizer_project(project, (mirror / "tinyshakespeare.txt").read_text()[:50_000])
    _write_params(project, method="add_k", order=2, sample_tokens=0)
    proc = _run_stage(project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = project / "data" / "models" / "ngram"
    assert (out / "model.npz").exists() and not (out / "model.arpa.gz").exists()
    assert NgramModel.load(out).method == "add_k"


def test_stage_rejects_bad_params_with_exit_2(project):
    _write_params(project, order=0)
    proc = _run_stage(project)
    assert proc.returncode == 2
    assert "ngram.order" in proc.stderr
    assert not (project / "data" / "models" / "ngram").exists()
