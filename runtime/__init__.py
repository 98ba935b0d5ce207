"""Entry points at the top of the stack: the roles (embedded, api, worker), the CLI and the
embedded broker launcher. Nothing below imports this package."""
