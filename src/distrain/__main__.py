from distrain.commands.cli import entry

entry()
