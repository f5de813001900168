"""vlmtag: tag image datasets with vision-language models (Data-Juicer's image_tagging_vlm_mapper, done right)."""

from vlmtag.ops import ImageTaggingVLMMapper, RunAborted
from vlmtag.tags import TagParseError, parse_output

__version__ = "0.1.0"
__all__ = ["ImageTaggingVLMMapper", "RunAborted", "TagParseError", "parse_output", "__version__"]
