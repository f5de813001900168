"""Names of the fields vlmtag reads or writes in a row, shared by readers, the operator and writers."""

META_KEY = "__dj__meta__"  # Data-Juicer's meta column: the tags go in here
# Image bytes a reader found for a row (WebDataset members, Parquet image columns), aligned with `images`.
# Transient: writers drop it, so the export keeps only the row's own fields.
BYTES_KEY = "__vlmtag_bytes__"
# A line of the input that is not a JSON object, kept (never dropped) with the reason.
INVALID_ROW_KEY = "__vlmtag_invalid_row__"


def error_field(tag_field: str) -> str:
    """The field beside the tags that holds, per image, `null` or why it failed."""
    return tag_field + "_errors"


def unmapped_field(tag_field: str) -> str:
    """The field that keeps tags outside the vocabulary when `unmapped: separate`."""
    return tag_field + "_unmapped"
