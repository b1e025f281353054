"""Names of the files in a run folder, importable without torch (the command line checks them)."""

CONFIG_FILE = "config.json"
