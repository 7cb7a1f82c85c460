"""kdforge never runs Python code that ships inside a model or tokenizer folder.

A folder whose config.json or tokenizer_config.json has an `auto_map` naming classes transformers
does not ship can only be loaded by importing the folder's own .py files. Left at its default
(None), transformers asks "Do you wish to run the custom code? [y/N]" and runs it on "y": a
downloaded folder could run anything. Every from_pretrained / from_config in kdforge passes
trust_remote_code=False, so transformers refuses with a ValueError instead; `refusal` turns that
into the exit-2 message a user can act on.
"""

from __future__ import annotations

import re

from kdforge.errors import UsageError

_REPO = re.compile(r"The repository (.+?) contains custom code")


def refusal(e: BaseException) -> UsageError | None:
    """The UsageError for transformers' refusal to load a folder without running its code (the
    folder named), or None when `e` is something else."""
    text = str(e)
    if not isinstance(e, ValueError) or "trust_remote_code" not in text:
        return None
    m = _REPO.search(text)
    where = m.group(1).strip() if m else "a model or tokenizer folder"
    return UsageError(f"{where} needs Python code of its own to load (the auto_map of its config.json or "
                      "tokenizer_config.json names classes transformers does not ship); kdforge never runs code "
                      "from a model folder (trust_remote_code=False): use a model of an architecture transformers "
                      "supports (its config.json model_type), e.g. one converted to it, or made by kdforge init-model")
