"""vlmtag: tag image datasets with vision-language models (Data-Juicer's image_tagging_vlm_mapper, done right).

The names below load on first use, so `import vlmtag` (or any light submodule, such as `vlmtag.tags`) does not
pull in the operator and its image codecs, HTTP client and caches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmtag.lazy import lazy_exports

if TYPE_CHECKING:
    from vlmtag.ops import ImageTaggingVLMMapper, RunAborted
    from vlmtag.tags import TagParseError, parse_output

__version__ = "0.1.0"
__all__ = ["ImageTaggingVLMMapper", "RunAborted", "TagParseError", "parse_output", "__version__"]

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    "ImageTaggingVLMMapper": "vlmtag.ops",
    "RunAborted": "vlmtag.ops",
    "TagParseError": "vlmtag.tags",
    "parse_output": "vlmtag.tags",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
