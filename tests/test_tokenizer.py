import pytest

from slu_fixtures import EXAMPLES, slu_tokenizer, whisper_tokenizer


def test_structure_tokens_are_single_new_ids():
    tok = slu_tokenizer()
    ids = [tok.open_id, tok.close_id, tok.sep_id] + list(tok.label_ids.values())
    assert len(set(ids)) == len(ids) == 3 + len(tok.grammar.labels)
    assert min(ids) >= tok.base_vocab_size == 51864  # after Whisper's text, specials and timestamps
    assert len(tok) == tok.base_vocab_size + len(ids)


def test_lf_words_are_tokenised_like_the_transcript():
    tok = slu_tokenizer()
    base = whisper_tokenizer()
    for transcript, lf in EXAMPLES:
        ids = tok.encode(transcript, lf)
        assert ids[-1] == tok.eos_token_id
        cut = ids.index(tok.sep_id)
        # transcript ids equal Whisper's own sentence tokenisation (leading space)
        assert ids[:cut] == base.encode(" " + transcript, add_special_tokens=False)
        normal = [i for i in ids[cut + 1 : -1] if i < tok.eos_token_id]
        it = iter(ids[:cut])
        assert all(any(i == j for j in it) for i in normal), "LF pieces must be a subsequence of the transcript"


def test_round_trip_and_text():
    tok = slu_tokenizer()
    for transcript, lf in EXAMPLES:
        ids = tok.prefix_ids + tok.encode(transcript, lf) + [tok.pad_token_id] * 3
        assert tok.decode(ids) == (transcript, lf)
        assert tok.text(ids) == f"{transcript} | {lf}"


def test_brackets_in_text_stay_ordinary_pieces():
    tok = slu_tokenizer()
    ids = tok.text_ids("a [b] c|d")
    assert not set(ids) & {tok.open_id, tok.close_id, tok.sep_id}
    assert tok.decode(ids + [tok.sep_id] + tok.encode_logical_form("[IN:GET_WEATHER ]"))[0] == "a [b] c|d"


def test_malformed_outputs_decode_to_none():
    tok = slu_tokenizer()
    t = tok.encode("pause the song", "[IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]")
    cut = t.index(tok.sep_id)
    assert tok.decode(t[: cut + 4])[1] is None  # unclosed
    assert tok.decode(t[:cut])[1] is None  # no separator
    assert tok.decode(t[:-1] + [tok.close_id])[1] is None  # extra bracket


def test_unknown_label_is_named():
    with pytest.raises(ValueError, match="IN:NOPE"):
        slu_tokenizer().encode("x", "[IN:NOPE x ]")


def test_whislu_is_plain_bpe():
    from conslu.targets import build_target
    from conslu.tokenizer import SLUTokenizer

    tok = SLUTokenizer(whisper_tokenizer(), None, "whislu")
    assert len(tok) == 51864 and tok.label_tokens == []
    transcript, lf = EXAMPLES[0]
    ids = tok.encode(transcript, lf, gender="female", native="yes", domain="alarm")
    text = build_target(transcript, lf, fmt="whislu", gender="female", native="yes", domain="alarm")
    assert ids[:-1] == whisper_tokenizer().encode(" " + text, add_special_tokens=False)
    assert max(ids) < 51864
    assert tok.decode(tok.prefix_ids + ids) == (transcript, lf)
