"""Token layout of ConSLU targets on top of a Whisper tokenizer.

Simplified target (the ConSLU format), after the decoder prompt::

    <transcript pieces> "|" "[" IN:X <pieces> "[" SL:Y <pieces> "]" "]" <|endoftext|>

* Each grammar label, "[", "]" and "|" is ONE added token (ids after Whisper's own vocabulary,
  timestamps included), so the constraint tables can address them directly. The bracket and
  separator tokens are spelled "<[>", "<]>", "<|>" in the vocabulary; ``decode``/``text`` render
  them as "[", "]", "|".
* Words are tokenised one at a time with their leading space (" word") by the underlying
  byte-level BPE, bypassing added tokens. Whisper's pre-tokenizer splits a sentence into exactly
  these pieces, so a word in the logical form has the same token ids as the same word in the
  transcript: every normal token after "|" is a copy of a transcript token. A "[", "]" or "|"
  inside a word stays an ordinary BPE piece; it never turns into a structure token.
* WhiSLU (``target_format="whislu"``): the JSON-style text of ``targets.build_target`` as plain
  Whisper BPE, no added tokens at all (the baseline's tokenisation); constraints do not apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from conslu.grammar import Grammar

TARGET_FORMATS = ("simplified", "whislu")
# Structure tokens get their own contents: "[" "]" "|" are ordinary BPE pieces in Whisper's
# vocabulary, and an added token with the same content would reuse (and hijack) that id.
OPEN, CLOSE, SEP = "<[>", "<]>", "<|>"
SOT, NOTIMESTAMPS, EOT = "<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>


def _label_text(label: str) -> str:
    """Words a label stands for, used to initialise its embedding: "IN:CREATE_ALARM" -> " create alarm"."""
    name = label.split(":", 1)[-1]
    return " " + " ".join(w for w in name.lower().replace("-", "_").split("_") if w)


class SLUTokenizer:
    """A Whisper tokenizer plus the ConSLU structure tokens, with target encode/decode."""

    def __init__(self, tokenizer: Any, grammar: "Grammar | None", target_format: str = "simplified") -> None:
        if target_format not in TARGET_FORMATS:
            raise ValueError(f"unknown target format {target_format!r}; expected one of {TARGET_FORMATS}")
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.target_format = target_format
        vocab = tokenizer.get_vocab()
        for tok in (SOT, NOTIMESTAMPS, EOT):
            if tok not in vocab:
                raise ValueError(f"tokenizer has no {tok} token: not a Whisper tokenizer")
        self._add_timestamps(vocab)
        self.eos_token_id: int = tokenizer.convert_tokens_to_ids(EOT)
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = self.eos_token_id if pad is None else int(pad)
        # Whisper's own ids (text, specials, timestamps); ConSLU tokens come after.
        self.base_vocab_size: int = tokenizer.convert_tokens_to_ids(NOTIMESTAMPS) + 1 + N_TIMESTAMPS
        # openai/whisper's rule: multilingual vocabularies have 51865 ids or more (English-only 51864).
        self.multilingual: bool = self.base_vocab_size >= 51865
        self.prefix_ids: list[int] = self.prompt_ids()
        self.label_tokens: list[str] = []
        if target_format == "simplified":
            if grammar is None:
                raise ValueError("the simplified target format needs a grammar (its labels become tokens)")
            self.label_tokens = list(grammar.labels)
            self._add_structure_tokens()
        self.structure_ids: dict[str, int] = {
            t: tokenizer.convert_tokens_to_ids(t) for t in ([OPEN, CLOSE, SEP] + self.label_tokens)
        } if target_format == "simplified" else {}
        self.open_id = self.structure_ids.get(OPEN, -1)
        self.close_id = self.structure_ids.get(CLOSE, -1)
        self.sep_id = self.structure_ids.get(SEP, -1)
        self.label_ids: dict[str, int] = {lab: self.structure_ids[lab] for lab in self.label_tokens}
        self.id_to_label: dict[int, str] = {i: lab for lab, i in self.label_ids.items()}
        self._word_cache: dict[str, list[int]] = {}

    # -- vocabulary -------------------------------------------------------------------------
    def _add_timestamps(self, vocab: dict[str, int]) -> None:
        """CTranslate2 exports of tiny.en carry no timestamp tokens; add them so that new ids do
        not collide with the model's timestamp logits (ids after <|notimestamps|>)."""
        if "<|0.00|>" in vocab:
            return
        nt = vocab[NOTIMESTAMPS]
        if len(self.tokenizer) != nt + 1:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens; expected timestamps to follow {NOTIMESTAMPS} ({nt})")
        from transformers import AddedToken

        stamps = [AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(N_TIMESTAMPS)]
        self.tokenizer.add_tokens(stamps)

    def _add_structure_tokens(self) -> None:
        from transformers import AddedToken

        added = self.tokenizer.get_added_vocab()
        wanted = [OPEN, CLOSE, SEP] + self.label_tokens
        missing = [t for t in wanted if t not in added]
        if len(missing) not in (0, len(wanted)):
            raise ValueError(f"tokenizer has only some ConSLU tokens (missing {missing[:5]}...): it does not match the grammar")
        if missing:
            self.tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in wanted])

    def __len__(self) -> int:
        return len(self.tokenizer)

    def prompt_ids(self, language: str | None = None, task: str | None = None) -> list[int]:
        """The decoder prompt: ``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` for a
        multilingual Whisper (language and task as given, English transcription by default),
        ``<|startoftranscript|><|notimestamps|>`` for an English-only one."""
        if not self.multilingual:
            if language not in (None, "en") or task not in (None, "transcribe"):
                raise ValueError(f"an English-only Whisper transcribes English only (language={language!r}, task={task!r})")
            return self.tokenizer.convert_tokens_to_ids([SOT, NOTIMESTAMPS])
        tokens = [SOT, f"<|{language or 'en'}|>", f"<|{task or 'transcribe'}|>", NOTIMESTAMPS]
        vocab = self.tokenizer.get_vocab()
        for t in tokens[1:3]:
            if t not in vocab:
                raise ValueError(f"this Whisper has no {t} token (language {language!r}, task {task!r})")
        return [vocab[t] for t in tokens]

    def word_initial_flags(self) -> list[bool]:
        """For each ordinary text id (below <|endoftext|>): does the piece begin a word (leading space)?"""
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(self.eos_token_id)))
        return [bool(p) and p[0] in ("\u0120", " ") for p in pieces]

    def init_text(self, token: str) -> str:
        """Text whose ordinary pieces initialise an added token's embedding."""
        return {OPEN: " [", CLOSE: " ]", SEP: " |"}.get(token) or _label_text(token)

    # -- encoding ---------------------------------------------------------------------------
    def word_ids(self, word: str) -> list[int]:
        """Ordinary BPE ids of " word" (added tokens bypassed)."""
        ids = self._word_cache.get(word)
        if ids is None:
            bt = self.tokenizer.backend_tokenizer
            pieces = bt.pre_tokenizer.pre_tokenize_str(" " + word) if bt.pre_tokenizer else [(" " + word, None)]
            ids = [t.id for piece, _ in pieces for t in bt.model.tokenize(piece)]
            self._word_cache[word] = ids
        return ids

    def plain_ids(self, text: str) -> list[int]:
        """Whisper's own BPE of a text (sentence-level pre-tokenisation, added tokens bypassed)."""
        bt = self.tokenizer.backend_tokenizer
        pieces = bt.pre_tokenizer.pre_tokenize_str(text) if bt.pre_tokenizer else [(text, None)]
        return [t.id for piece, _ in pieces for t in bt.model.tokenize(piece)]

    def text_ids(self, text: str) -> list[int]:
        """Ids of a whitespace-separated text, word by word (single spaces, no leading space issues)."""
        return [i for w in text.split() for i in self.word_ids(w)]

    def encode(self, transcript: str, logical_form: str, **meta: Any) -> list[int]:
        """Target ids after the prompt, ending with <|endoftext|>.

        Simplified: transcript pieces, "|", structure/label tokens and word pieces of the tree.
        WhiSLU: ``targets.build_target(..., fmt="whislu", **meta)`` as plain BPE.
        """
        if self.target_format == "whislu":
            from conslu.targets import build_target

            text = build_target(transcript, logical_form, fmt="whislu", **meta)
            return self.plain_ids(" " + text) + [self.eos_token_id]
        ids = self.text_ids(transcript) + [self.sep_id]
        ids += self.encode_logical_form(logical_form)
        ids.append(self.eos_token_id)
        return ids

    def encode_logical_form(self, logical_form: str) -> list[int]:
        """Token ids of a TOP string: "[" and the label as two tokens, words as BPE pieces."""
        out: list[int] = []
        items = logical_form.replace("[", " [ ").replace("]", " ] ").split()
        expect_label = False
        for pos, item in enumerate(items):
            if expect_label:
                if item not in self.label_ids:
                    raise ValueError(f"logical form {logical_form!r}: label {item!r} (item {pos}) is not in the grammar")
                out.append(self.label_ids[item])
                expect_label = False
            elif item == "[":
                out.append(self.open_id)
                expect_label = True
            elif item == "]":
                out.append(self.close_id)
            else:
                out.extend(self.word_ids(item))
        if expect_label:
            raise ValueError(f"logical form {logical_form!r} ends with '['")
        return out

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> tuple[str, str | None]:
        """(transcript, logical_form or None when the tokens do not form one well-formed tree).

        ``ids`` may include the prompt and padding: special Whisper tokens are dropped and
        decoding stops at the first <|endoftext|> after the prompt.
        """
        ids = [int(i) for i in ids]
        body: list[int] = []
        for i in ids:
            if i == self.eos_token_id:
                if body:
                    break
                continue
            if i in self.prefix_ids or (self.eos_token_id <= i < self.base_vocab_size):
                continue  # prompt / other Whisper specials / timestamps
            body.append(i)
        if self.target_format == "whislu":
            from conslu.targets import split_target

            text = self.tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            return split_target(text, fmt="whislu")
        if self.sep_id not in body:
            return self._plain(body), None
        cut = body.index(self.sep_id)
        return self._plain(body[:cut]), self._tree_text(body[cut + 1 :])

    def text(self, ids: Sequence[int]) -> str:
        """Raw readable text of a target (structure tokens rendered as in TOP notation)."""
        t, lf = self.decode(ids)
        if self.target_format == "whislu":
            return self.tokenizer.decode([i for i in ids if i < self.eos_token_id or i >= self.base_vocab_size], skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        return f"{t} | {lf}" if lf is not None else t

    def _plain(self, ids: list[int]) -> str:
        normal = [i for i in ids if i not in self.id_to_label and i not in (self.open_id, self.close_id, self.sep_id)]
        return " ".join(self.tokenizer.decode(normal, clean_up_tokenization_spaces=False).split())

    def _tree_text(self, ids: list[int]) -> str | None:
        parts: list[str] = []
        words: list[int] = []
        depth = 0
        expect_label = False
        closed = False

        def flush() -> None:
            if words:
                parts.extend(self.tokenizer.decode(words, clean_up_tokenization_spaces=False).split())
                words.clear()

        for i in ids:
            if closed:
                return None  # tokens after the tree closed
            if expect_label:
                if i not in self.id_to_label:
                    return None
                parts.append("[" + self.id_to_label[i])
                depth += 1
                expect_label = False
            elif i == self.open_id:
                flush()
                expect_label = True
            elif i == self.close_id:
                flush()
                if depth == 0:
                    return None
                parts.append("]")
                depth -= 1
                closed = depth == 0
            elif i in self.id_to_label or i == self.sep_id or depth == 0:
                return None
            else:
                words.append(i)
        if not closed:
            return None
        return " ".join(parts)
