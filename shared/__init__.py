"""upcfan core: everything the functions, the CLI and the tools share; knows nothing of Flask."""
