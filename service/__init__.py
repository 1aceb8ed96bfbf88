"""Job service: deployments and jobs over HTTP, stored natively in MongoDB."""
