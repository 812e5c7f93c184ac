"""Sources translate the outside world (files, the Kubernetes API) into handler calls."""
