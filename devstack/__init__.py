"""upcfan devstack."""
