"""upcfan infra."""
