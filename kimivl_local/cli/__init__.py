"""The `kimivl-local` command: subcommands, chat REPL, info, bench, selftest, first-run setup."""
