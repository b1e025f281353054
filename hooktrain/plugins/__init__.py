"""The built-in plugins, one file each."""
