"""The command adapters: one module per ``shunt`` command, turning flags into settings, making one call and
rendering the result (``render`` holds the shared number formatters). No logic beyond flag handling."""
