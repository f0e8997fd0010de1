"""The `rac` command: dispatches each verb to the package that does it (above service, models, loadtests)."""
