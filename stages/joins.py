"""Join helpers shared by the stages that join a shard back to its crawl rows.

An image id is the sha256 of the image's bytes, so one image fetched from several URLs (or listed
several times) is several crawl rows with one image id. A join keyed on the image id must take one of
them, or every later stage sees the image once per crawl row: a list naming one URL three times once
gave three caption sets and three corpus rows for one image.
"""

from __future__ import annotations

import pyarrow as pa


def first_row_per_image(table: pa.Table, column: str = "image_id") -> pa.Table:
    """``table`` with only the first row (in row order) of each value of ``column``.

    The first row is the one the crawl's dedup keeps among byte-identical copies (first in shard and
    row order), so its source, licence and attribution are the ones that travel on.
    """
    seen: set[str] = set()
    keep = []
    for index, value in enumerate(table.column(column).to_pylist()):
        if value not in seen:
            seen.add(value)
            keep.append(index)
    return table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64()))
