from ckptkeeper.cli import entry

entry()
