from vlmtag.cli import entry

entry()
