"""The file to list under a Data-Juicer recipe's `custom_operator_paths`: it registers vlmtag's operator
`vlmtag_image_tagging_mapper` (see vlmtag.dj). `python -m vlmtag.dj` prints its path.

Data-Juicer imports this file as a module of its own; it only imports vlmtag's adapter, so loading it after the
`data_juicer.ops` entry point already did (or twice) registers nothing twice. Run from a checkout where vlmtag
is not installed, it finds vlmtag in the `src/` folder it lies in (vlmtag's dependencies must be installed).
"""

import os
import sys

try:
    import vlmtag  # noqa: F401
except ImportError:  # a checkout: this file is src/vlmtag/dj/vlmtag_image_tagging_mapper.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from vlmtag.dj.mapper import register  # importing it registers; register() again is harmless

register()
