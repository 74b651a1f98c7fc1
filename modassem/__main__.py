from modassem.cli import entry

entry()
