"""earlyfw on macOS: a LaunchDaemon loading a pf anchor."""
