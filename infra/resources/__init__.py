"""One module per resource kind; all implement `infra.resources.base.Resource`."""
