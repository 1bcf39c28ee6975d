"""upcfan upcfan_cli."""
