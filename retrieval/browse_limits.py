"""Limits of the retrieval browser's requests (torch-free, so ``python -m retrieval.browse`` checks its arguments
before importing torch)."""

MAX_QUERY_CHARS = 500  # a sentence longer than this is refused (the dictionary keeps max_len words anyway)
MAX_K = 100  # most results per view
MAX_PER_PAGE = 100  # most worst-ranked queries per evaluation page
THUMB_SIDE = 320  # longest side of a served thumbnail
THUMB_CACHE = 1024  # thumbnails kept in memory
