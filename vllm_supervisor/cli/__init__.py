"""The command line: click commands that parse options into typed settings, call the
lifecycle or the instances layer, render what comes back and map errors to exit codes.
`app` holds the group and the entry point; `serve` the serve and demo commands; `ops` the
operating commands; `demo` is the one place that imports the simulated vLLM."""
