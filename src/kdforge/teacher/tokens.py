"""Token counts without the teacher's tokenizer: an upper bound for money, an estimate for pace.

- `prompt_bound`: one token per UTF-8 byte of every message, plus a per-message and a fixed
  template overhead. Byte-level BPE and byte-fallback tokenizers never spend more than one
  token per byte on text, so only the chat template's special tokens can add more; those are
  covered by the overhead, which `learn` raises if a teacher ever reports more (a provider's
  hidden system prompt, say). This is what the budget reserves: about 4x the real count for
  English, which costs little because max_tokens usually dominates the worst case.
- `prompt_estimate`: ~3 bytes a token (a slight overestimate for English), used to pace
  tokens-per-minute, where reserving 4x would waste the teacher's allowance.
"""

from __future__ import annotations


class TokenEstimator:
    PER_MESSAGE = 8  # template tokens around each message (ChatML uses 4-5)
    FIXED = 16  # generation prompt, BOS and similar

    def __init__(self) -> None:
        self.extra = 0  # learned: tokens the teacher counted beyond our bound

    @staticmethod
    def _bytes(messages: list[dict]) -> int:
        return sum(len(str(m.get("content", "")).encode()) for m in messages)

    def prompt_bound(self, messages: list[dict]) -> int:
        """Upper bound on the prompt tokens a teacher bills for these messages."""
        return self._bytes(messages) + self.PER_MESSAGE * len(messages) + self.FIXED + self.extra

    def prompt_estimate(self, messages: list[dict]) -> int:
        """Likely prompt tokens (for rate limits, not for money)."""
        return self._bytes(messages) // 3 + 4 * len(messages) + 3

    def learn(self, messages: list[dict], reported_prompt_tokens: int) -> bool:
        """Raise the bound if the teacher counted more than it; True if it did."""
        over = reported_prompt_tokens - self.prompt_bound(messages)
        if over > 0:
            self.extra += over
            return True
        return False
