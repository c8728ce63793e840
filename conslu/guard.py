"""Loop guard: a transcript that starts repeating itself is cut back to one copy, then "|" is forced.

Whisper checkpoints hallucinate loops on audio they find hard ("set timer for eight am at eight am
at eight am ..." until the length limit). openai/whisper detects them after the fact (gzip
compression ratio) and decodes again at a higher temperature; a ConSLU decoder instead notices the
loop while it is written: when the transcript ends with the same n-gram (n <= ``MAX_PERIOD``
tokens) repeated so that at least ``MIN_REPEAT`` tokens, and at least one whole copy, are repeats,
the repeated copies are dropped and the transcript ends there. Legitimate speech rarely repeats
itself like that ("no no no" is 2 repeated tokens and passes; five equal tokens in a row, three
copies of a 2-token phrase, or two copies of a 4-token phrase or of a whole sentence do not).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_PERIOD = 24  # longest repeated n-gram looked for, in tokens (a whole repeated sentence)
MIN_REPEAT = 4  # fewest repeated tokens that count as a loop
WINDOW = 2 * MAX_PERIOD  # tokens of the tail examined


def repeated_tail(ids: Tensor, n: Tensor, start: int, *, max_period: int = MAX_PERIOD,
                  min_repeat: int = MIN_REPEAT, window: int = WINDOW) -> Tensor:
    """[R] long: how many tokens at the end of each row repeat an n-gram right before them, when
    they make a loop (whole copies, at least ``max(n, min_repeat)`` tokens); 0 elsewhere.

    ``ids`` [R, W] token rows, ``n`` [R] their lengths; only positions >= ``start`` (the
    transcript) are examined. Dropping that many tokens leaves the first copy.
    """
    device = ids.device
    j = torch.arange(window, device=device)
    idx = n[:, None] - window + j[None]
    valid = idx >= start
    x = ids.gather(1, idx.clamp(min=0))
    x = torch.where(valid, x, -1 - j[None])  # distinct fillers never match each other
    periods = torch.arange(1, max_period + 1, device=device)
    src = j[None] - periods[:, None]  # [S, W]
    y = x[:, src.clamp(min=0)]  # [R, S, W]
    eq = (y == x[:, None, :]) & (src >= 0)[None]
    run = eq.flip(-1).long().cumprod(-1).sum(-1)  # [R, S] trailing tokens equal to the one a period back
    loop = (run >= periods.clamp(min=min_repeat)[None]) & (run % periods[None] == 0)
    return torch.where(loop, run, 0).max(1).values
