"""What one request may ask of `kdforge serve`: caps on its body and its work, so one client
cannot hold the event loop or queue hours of compute (3000 prompts x n=16 were accepted before)."""

DEFAULT_MAX_BODY_BYTES = 16 << 20  # 256 prompts of ~10k token ids as JSON fit; 413 above
MAX_PROMPTS = 256  # prompts in one /v1/completions call
MAX_ROWS = 256  # rows (prompts x n) generated for one request
