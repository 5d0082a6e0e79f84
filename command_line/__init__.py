"""The `site-activity` command line, above the stages: it parses arguments and calls into the kernel
(site_activity), the stages and the dev stack. `python -m command_line <command>` is the same as
`site-activity <command>`."""
